"""RL on the demo's toy world: does RL make the SFT model's answers better on held-out prompts?

Builds the demo world, trains the demo's SFT model for a seed (the pipeline's `sft` stage), then
runs one of the demo pipeline's RL stages from it with its settings (`rloo`: against the verifier;
`rloo-rm`: against the reward model of the pipeline's `rm` stage, trained first), optionally as
GRPO (`--algo grpo`), and compares greedy replies of the RL model and the SFT model on the 160
held-out prompts: exact match, content (right once a trailing sign-off is cut), wins / losses per
prompt on each, and the exact sign test. Prints one JSON line.

    python bench/rl_toy.py --seed 0                  # RLOO against the verifier, as the demo runs it
    python bench/rl_toy.py --seed 0 --algo grpo      # the same stage as GRPO
    python bench/rl_toy.py --seed 0 --stage rloo-rm  # RLOO against the demo's reward model

`--keep` reuses the SFT (and reward) model of an earlier run in the same --output-dir; `--from-demo
DIR` those of a finished `alignkit demo --output-dir DIR` (same seed), so that only the RL stage runs:

    python bench/rl_toy.py --seed 1 --algo grpo --from-demo runs/demo-1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignkit.cli import quiet_third_party
from alignkit.config import ModelConfig
from alignkit.demo.run import PIPELINE, demo_vars, toy_scores, write_world_data
from alignkit.demo.world import DEMO_MODEL, DEMO_VOCAB, build_tokenizer, write_model_config
from alignkit.models import init_model, load_tokenizer
from alignkit.pipeline import read_pipeline
from alignkit.train.rl import run_rl
from alignkit.train.rm import run_rm
from alignkit.train.sft import run_sft
from alignkit.winrate import paired_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None, help="default runs/rl-toy-<stage>-<algo>-<seed>")
    ap.add_argument("--stage", default="rloo", choices=["rloo", "rloo-rm"], help="the demo pipeline's RL stage to run")
    ap.add_argument("--algo", default=None, choices=["rloo", "grpo"], help="default: the stage's")
    ap.add_argument("--steps", type=int, default=None, help="RL optimizer steps (default: the demo's)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps (default: the demo's)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--keep", action="store_true", help="reuse sft/ (and rm/) from an earlier run in --output-dir")
    ap.add_argument("--from-demo", default=None, help="a finished demo's --output-dir: its world, SFT and reward model")
    args = ap.parse_args()
    quiet_third_party()
    out = Path(args.output_dir or f"runs/rl-toy-{args.stage}-{args.algo or 'stage'}-{args.seed}")
    root = Path(args.from_demo) if args.from_demo else out
    args.keep |= bool(args.from_demo)
    world = root / "world"
    timings = {}
    fresh = not (args.keep and (root / "sft" / "final").is_dir())
    if fresh:
        tok = build_tokenizer(world / "tokenizer", vocab_size=DEMO_VOCAB)
        vocab = len(load_tokenizer(ModelConfig(name_or_path=str(tok))).tokenizer)
        write_model_config(world / "model-config", vocab_size=vocab, **DEMO_MODEL)
        init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok), seed=args.seed)
        write_world_data(world)
    overrides = {k: v for k, v in (("steps", args.sft_steps), ("rl_steps", args.steps)) if v is not None}
    variables = demo_vars(world, overrides.get("steps", 0), 1, args.seed, overrides.get("rl_steps", 0))
    pipe = read_pipeline(PIPELINE, [v for v in variables if v.split("=")[0] in {"world", "seed", *overrides}],
                         run_dir=str(root))
    stages = {s.name: s.config for s in pipe.stages}
    for cfg in stages.values():
        if hasattr(cfg, "quiet"):
            cfg.quiet = True
    if fresh:
        start = time.perf_counter()
        run_sft(stages["sft"])
        timings["sft_s"] = round(time.perf_counter() - start)
    if args.stage == "rloo-rm" and not (args.keep and (root / "rm" / "final").is_dir()):
        start = time.perf_counter()
        run_rm(stages["rm"])
        timings["rm_s"] = round(time.perf_counter() - start)
    rl = stages[args.stage]
    rl.output_dir = str(out / f"{args.stage}-{args.algo or rl.rl.algo}")
    if args.algo:
        rl.rl.algo = args.algo
    if args.lr:
        rl.train.learning_rate = args.lr
    rl.train.save_steps = None
    start = time.perf_counter()
    run_rl(rl)
    timings["rl_s"] = round(time.perf_counter() - start)
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    after, before = toy_scores(Path(rl.output_dir) / "final", test), toy_scores(root / "sft" / "final", test)
    logs = [json.loads(line) for line in (Path(rl.output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [m["reward"] for m in logs if "reward" in m]
    result = {"seed": args.seed, "stage": args.stage, "algo": rl.rl.algo, "rl_steps": rl.train.max_steps,
              "lr": rl.train.learning_rate, **timings,
              "train_reward_first_last": [round(rewards[0], 3), round(rewards[-1], 3)]}
    if (root / "rm" / "rm_eval.json").is_file():
        result["rm_eval"] = json.loads((root / "rm" / "rm_eval.json").read_text())
    for name, key in (("exact", "correct"), ("content", "content")):
        a, b = [s[key] for s in after["samples"]], [s[key] for s in before["samples"]]
        result[name] = {"sft": round(sum(b) / len(b), 3), "rl": round(sum(a) / len(a), 3), **paired_counts(a, b)}
    result["content_per_kind"] = {"sft": before["content_per_task"], "rl": after["content_per_task"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
