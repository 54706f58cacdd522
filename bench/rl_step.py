"""RL step time before and after removing work that need not be done (issue 19), in the same run.

The Countdown recipe's RL settings (GRPO, k = 8 at the temperatures [0.2, 0.2, 0.7, 0.7, 0.7, 1.2,
1.2, 1.2], one iteration per batch, beta 0; and with --beta, a reference model) on a small random
Qwen2 with the demo's tokenizer, on the demo's prompts and toy reward. "before" switches the old
code paths back on: one decoding call per distinct temperature (`RolloutSource.one_sampling_call`),
the no-grad policy pass every step (`rl.ALWAYS_OLD_PASS`), and full forwards with every layer's
hidden states in no-grad passes (`logprobs.BASE_MODEL_NO_GRAD`). Runs alternate before/after
(--repeats pairs) so that load on the machine hits both alike; prints per-step medians and their
ratio as one JSON line (step_s: the median gap between step ends, the first step left out).

    python bench/rl_step.py --steps 5 --repeats 3
    python bench/rl_step.py --steps 5 --repeats 3 --beta 0.04
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from alignkit.cli import quiet_third_party
from alignkit.config import ModelConfig, TrainConfig
from alignkit.demo.world import build_tokenizer, write_chat_data, write_model_config
from alignkit.generation import PromptSource
from alignkit.models import init_model, load_tokenizer
from alignkit.rewards.backends import RewardConfig
from alignkit.train import logprobs, rl
from alignkit.train.loop import Callback, read_metrics

TEMPERATURES = [0.2, 0.2, 0.7, 0.7, 0.7, 1.2, 1.2, 1.2]


@contextmanager
def old_code_paths(on: bool):
    saved = rl.RolloutSource.one_sampling_call, rl.ALWAYS_OLD_PASS, logprobs.BASE_MODEL_NO_GRAD
    rl.RolloutSource.one_sampling_call, rl.ALWAYS_OLD_PASS, logprobs.BASE_MODEL_NO_GRAD = not on, on, not on
    try:
        yield
    finally:
        rl.RolloutSource.one_sampling_call, rl.ALWAYS_OLD_PASS, logprobs.BASE_MODEL_NO_GRAD = saved


class StepClock(Callback):
    """When each optimizer step ended: step times are the gaps (the first step, with warm-up, left out)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, state, logs) -> None:
        self.ends.append(time.perf_counter())


def run(root: Path, model: Path, data: Path, args, name: str) -> dict:
    out = root / name
    cfg = rl.RLConfig(
        output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(model)),
        prompts=PromptSource(dataset=str(data), split="train"), reward=RewardConfig(kind="rule", rule="toy"),
        rl=rl.RLParams(algo="grpo", k=8, temperatures=TEMPERATURES, max_new_tokens=args.max_new_tokens, beta=args.beta,
                       epsilon_high=0.28, scale_rewards=False, loss_agg="constant", log_samples_steps=0),
        train=TrainConfig(max_steps=args.steps, batch_size=2, grad_accum=2, learning_rate=1e-6, scheduler="constant",
                          save_steps=None, logging_steps=1, precision="fp32"),
    )
    clock = StepClock()
    rl.run_rl(cfg, callbacks=[clock])
    rows = read_metrics(out)[1:]
    return {"step_s": statistics.median(b - a for a, b in zip(clock.ends, clock.ends[1:])),
            "time_sample_s": statistics.median(r["time_sample_s"] for r in rows),
            "time_logprobs_s": statistics.median(r["time_logprobs_s"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=3, help="before/after pairs, alternated")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--beta", type=float, default=0.0, help="> 0 adds the reference model's pass to both")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    quiet_third_party()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(root / "tokenizer")
        vocab = len(load_tokenizer(ModelConfig(name_or_path=str(tok))).tokenizer)
        write_model_config(root / "config", vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_hidden_layers=args.layers)
        model = init_model(str(root / "config"), root / "model", tokenizer_source=str(tok), seed=0)
        data = write_chat_data(root / "data", n_train=64, n_test=8)
        results = {"before": [], "after": []}
        for r in range(args.repeats):
            for name in ("before", "after"):
                with old_code_paths(name == "before"):
                    results[name].append(run(root, model, data, args, f"{name}-{r}"))
    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for name, rows in results.items()}
    print(json.dumps({
        "setting": {"steps": args.steps, "repeats": args.repeats, "max_new_tokens": args.max_new_tokens, "beta": args.beta,
                    "hidden": args.hidden, "layers": args.layers, "k": 8, "temperatures": TEMPERATURES},
        "before": med["before"], "after": med["after"],
        "ratio_before_over_after": {k: med["before"][k] / med["after"][k] for k in med["after"] if med["after"][k] > 0},
    }))


if __name__ == "__main__":
    main()
