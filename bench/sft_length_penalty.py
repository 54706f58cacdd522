"""SFT with a length penalty on the demo's toy world: does it shorten replies that are too long?

Builds the demo world (tokenizer, tiny model, data) for a seed, then makes the SFT chats verbose:
a share of the replies (every other one by default) end in a chatty sign-off, " Hope this helps!",
which the toy verifier counts as a wrong answer. The penalty's reference is each row's own reply,
as `alignkit sft` defines it, so a terse row penalises a sampled sign-off and a signed-off row does
not: the penalty pushes the sign-off out where the data leave it to chance, while the NLL keeps
the answers. As in the reference experiment, the penalty fights an already verbose SFT model: a
plain SFT run (--warm-steps, the demo's SFT recipe) makes it, then SFT continues from it for --steps
more steps (constant learning rate --lr) without and with `sft.length_penalty` (one run per λ of
--penalties; same seed, same steps; λ 0 is the run without). An exploratory run of an earlier
version of this script (the penalty from the first step, on a random model's samples; one seed)
cost far more accuracy; that setting is not offered here. Greedy replies (at most 48 new tokens) to the 160 held-out
prompts (world/data/test.jsonl) are scored: mean reply length in tokens, share of replies with the sign-off, exact match (the verifier), and
exact match ignoring a trailing sign-off (is the answer itself right). Prints one JSON line per
run and a summary line.

    python bench/sft_length_penalty.py --seeds 0 1 2 --output-dir runs/sft-lenpen

Measured (2026-11-30, 2 CPU cores, seeds 0-2, re-run from a clean checkout with the same figures, 600 warm-up steps + 100, 16 samples every 2nd
step; means over seeds of the 160 held-out prompts; answer right = exact match ignoring a sign-off):

    λ        reply tokens   sign-off   exact match   answer right (per seed)
    (warm)   12.3           40%        24.6%         39.6% (33.8, 45.0, 40.0)   the model after 600 steps
    0        18.8           86%        4.8%          31.7% (22.5, 38.1, 34.4)
    0.0001   17.1           76%        7.7%          33.3% (30.0, 38.8, 31.2)
    0.0003   12.9           45%        14.6%         27.5% (28.7, 27.5, 26.3)
    0.001     9.6           20%        17.5%         22.3% (25.0, 26.9, 15.0)

The penalty halves the replies and removes most sign-offs, so the verifier's exact match rises, but
the answers themselves get worse as λ grows (about 4 points at 0.0003, 9 at 0.001): the REINFORCE
term's noise slows the NLL's learning on this tiny model.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from alignkit.cli import quiet_third_party
from alignkit.config import ModelConfig
from alignkit.demo.run import demo_sft_config, write_world_data
from alignkit.demo.world import SIGN_OFF, build_tokenizer, write_jsonl, write_model_config
from alignkit.generation import SamplingParams, generate
from alignkit.models import init_model, load_causal_lm, load_tokenizer
from alignkit.rewards.toy import solve, toy_reward
from alignkit.train.sft import SFTParams, run_sft


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def verbose_data(world: Path, share: float) -> Path:
    """world/data with a sign-off on `share` of the training replies (evenly spread; the demo's own
    seeded sign-offs are replaced by the bare answer first); test.jsonl unchanged."""
    out = world / "data-verbose"
    rows = read_jsonl(world / "data" / "train.jsonl")
    for i, r in enumerate(rows):
        r["messages"][1]["content"] = solve(r["messages"][0]["content"])
        if int((i + 1) * share) > int(i * share):
            r["messages"][1]["content"] += SIGN_OFF
    write_jsonl(rows, out / "train.jsonl")
    write_jsonl(read_jsonl(world / "data" / "test.jsonl"), out / "test.jsonl")
    return out


def held_out(model_dir: Path, test: list[dict]) -> dict:
    chat = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = load_causal_lm(ModelConfig(name_or_path=str(model_dir)), chat)
    outs = [c[0] for c in generate(model, chat, [p["messages"][:1] for p in test], SamplingParams(max_new_tokens=48), batch_size=64)]
    prompts = [p["messages"][0]["content"] for p in test]
    signed = [o.text.rstrip().endswith(SIGN_OFF.strip()) for o in outs]
    answers = [o.text.rstrip()[: -len(SIGN_OFF.strip())] if s else o.text for o, s in zip(outs, signed)]
    n = len(test)
    return {
        "length_tokens": round(sum(len(o.token_ids) for o in outs) / n, 2),
        "sign_off": round(sum(signed) / n, 3),
        "exact_match": round(sum(toy_reward(p, o.text) for p, o in zip(prompts, outs)) / n, 3),
        "answer_correct": round(sum(toy_reward(p, a) for p, a in zip(prompts, answers)) / n, 3),
        "stopped": round(sum(o.finish_reason == "stop" for o in outs) / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--output-dir", default="runs/sft-lenpen")
    ap.add_argument("--warm-steps", type=int, default=600, help="plain SFT steps that make the verbose model (batch 32, as the demo)")
    ap.add_argument("--steps", type=int, default=100, help="SFT steps from it, without and with the penalty")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of those steps (constant)")
    ap.add_argument("--share", type=float, default=0.5, help="share of training replies with the sign-off")
    ap.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.0001, 0.0003, 0.001], help="sft.length_penalty (λ) of each run; 0: plain SFT")
    ap.add_argument("--every", type=int, default=2, help="sft.length_penalty_every")
    ap.add_argument("--samples", type=int, default=16, help="sft.length_penalty_samples")
    args = ap.parse_args()
    quiet_third_party()
    results = []
    for seed in args.seeds:
        root = Path(args.output_dir) / f"seed-{seed}"
        world = root / "world"
        tok = build_tokenizer(world / "tokenizer")
        write_model_config(world / "model-config", vocab_size=len(load_tokenizer(ModelConfig(name_or_path=str(tok))).tokenizer))
        init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok), seed=seed)
        write_world_data(world)
        data = verbose_data(world, args.share)
        test = read_jsonl(world / "data" / "test.jsonl")
        warm = demo_sft_config(world, root / "warm", args.warm_steps, True, seed)
        warm.data.dataset, warm.data.eval_split = str(data), None
        warm.train.eval_steps = warm.train.save_steps = None
        if not (root / "warm" / "final").is_dir():
            run_sft(warm)
        row = {"seed": seed, "run": "warm", "steps": args.warm_steps, **held_out(root / "warm" / "final", test)}
        print(json.dumps(row), flush=True)
        for lam in args.penalties:
            name = f"lambda-{lam:g}"
            cfg = copy.deepcopy(warm)
            cfg.output_dir, cfg.model.name_or_path = str(root / name), str(root / "warm" / "final")
            cfg.train.max_steps, cfg.train.learning_rate, cfg.train.scheduler, cfg.train.warmup_steps = args.steps, args.lr, "constant", 0
            cfg.sft = SFTParams(length_penalty=lam, length_penalty_every=args.every, length_penalty_samples=args.samples,
                                length_penalty_max_new_tokens=48)
            start = time.perf_counter()
            run_sft(cfg)
            seconds = time.perf_counter() - start
            row = {"seed": seed, "run": name, "steps": f"{args.warm_steps}+{args.steps}", "lambda": lam, "train_seconds": round(seconds),
                   **held_out(Path(cfg.output_dir) / "final", test)}
            logs = [m for m in read_jsonl(Path(cfg.output_dir) / "metrics.jsonl") if "sampled_length" in m]
            if logs:
                row["train_sampled_length_first_last"] = [round(logs[0]["sampled_length"], 1), round(logs[-1]["sampled_length"], 1)]
            print(json.dumps(row), flush=True)
            results.append(row)
    summary = {}
    for lam in args.penalties:
        name = f"lambda-{lam:g}"
        rows = [r for r in results if r["run"] == name]
        summary[name] = {k: round(sum(r[k] for r in rows) / len(rows), 3)
                         for k in ("length_tokens", "sign_off", "exact_match", "answer_correct", "stopped")}
    print(json.dumps({"summary_over_seeds": args.seeds, "warm_steps": args.warm_steps, "steps": args.steps, "lr": args.lr,
                      "share": args.share, "every": args.every,
                      "samples": args.samples, **summary}))


if __name__ == "__main__":
    main()
