"""One `self` round on the demo's toy world: does DPO on the model's own pairs beat the SFT model?

Builds the demo world (today's `alignkit.demo.world` functions, the demo's tokenizer), trains the
demo's SFT model (--sft-steps, default the demo's 1,200) for a seed, then one round of iterative DPO:
`alignkit pairs` in mode self (K = 8 samples per training prompt at 0.2 x 2, 0.7 x 3, 1.2 x 3, scored
by the toy verifier; chosen = the best, rejected = a seeded one of the bottom three; prompts whose samples all tie dropped), then
`alignkit dpo` (DPO-Positive, the demo's settings) from the SFT model on those pairs. Greedy replies
of both models to the 160 held-out prompts are compared per prompt: exact match (what the verifier
wants) and content ("right ignoring the sign-off" that 30% of the SFT replies carry), each with
wins / losses and the exact two-sided sign test. Prints one JSON line (and writes result.json).
`alignkit demo --full` runs the same round as its self-pairs and self-dpo stages (on the RL prompts, 100
DPO steps); this script runs it alone, with its settings as options.

    nice -n 10 python bench/self_improve_toy.py --seed 0 --output-dir runs/self-improve-toy-0
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from alignkit.cli import quiet_third_party
from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.demo.run import demo_sft_config, without_sign_off, write_world_data
from alignkit.demo.world import DEMO_MODEL, DEMO_VOCAB, build_tokenizer, write_model_config
from alignkit.generation import SamplingParams, generate
from alignkit.data.prompts import PromptSource
from alignkit.loops.pairs import PairsConfig, run_pairs
from alignkit.models import init_model, load_causal_lm, load_tokenizer
from alignkit.rewards.backends import RewardConfig
from alignkit.rewards.toy import toy_reward
from alignkit.train.dpo import DPOConfig, DPOParams, run_dpo
from alignkit.train.sft import run_sft
from alignkit.winrate import paired_counts


def held_out(model_dir: Path, test: list[dict]) -> dict:
    """Per held-out prompt: exact match and content (right once a trailing sign-off is removed)."""
    cfg = ModelConfig(name_or_path=str(model_dir))
    chat = load_tokenizer(cfg)
    model = load_causal_lm(cfg, chat)
    outs = generate(model, chat, [p["messages"][:1] for p in test], SamplingParams(max_new_tokens=24), batch_size=64)
    q = [p["messages"][0]["content"] for p in test]
    texts = [o[0].text for o in outs]
    return {"exact": [toy_reward(a, t) for a, t in zip(q, texts)],
            "content": [toy_reward(a, without_sign_off(t)) for a, t in zip(q, texts)],
            "sign_off": [t.rstrip().endswith("helps!") for t in texts]}


def compare(a: list[float], b: list[float]) -> dict:
    return {"dpo": round(sum(a) / len(a), 3), "sft": round(sum(b) / len(b), 3), **paired_counts(a, b)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--sft-steps", type=int, default=1200)
    ap.add_argument("--dpo-steps", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=1000, help="training prompts sampled (world/prompts/train.jsonl)")
    ap.add_argument("--dpop-lambda", type=float, default=5.0)
    args = ap.parse_args()
    quiet_third_party()
    root = Path(args.output_dir or f"runs/self-improve-toy-{args.seed}")
    world = root / "world"
    t0 = time.perf_counter()
    if not (world / "prompts" / "train.jsonl").is_file():  # the world's files, written last
        tok = build_tokenizer(world / "tokenizer", vocab_size=DEMO_VOCAB)
        vocab = len(load_tokenizer(ModelConfig(name_or_path=str(tok))).tokenizer)
        write_model_config(world / "model-config", vocab_size=vocab, **DEMO_MODEL)
        init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok), seed=args.seed)
        write_world_data(world)
    if not (root / "sft" / "final").is_dir():
        shutil.rmtree(root / "sft", ignore_errors=True)  # a killed run's partial SFT (other steps) starts afresh
        run_sft(demo_sft_config(world, root / "sft", args.sft_steps, True, args.seed))
    t_sft = time.perf_counter()
    sft = root / "sft" / "final"
    pairs = run_pairs(PairsConfig(
        output_dir=str(root / "pairs"), mode="self", model=ModelConfig(name_or_path=str(sft)),
        prompts=PromptSource(dataset=str(world / "prompts"), split="train", max_prompts=args.prompts),
        sampling=SamplingParams(max_new_tokens=24, seed=args.seed), temperatures=[0.2, 0.7, 1.2],
        samples_per_temperature=[2, 3, 3], reward=RewardConfig(kind="rule", rule="toy"), batch_size=64,
        eval_share=0.05, seed=args.seed, quiet=True))
    t_pairs = time.perf_counter()
    run_dpo(DPOConfig(
        output_dir=str(root / "dpo"), seed=args.seed, quiet=True, model=ModelConfig(name_or_path=str(sft)),
        data=DataConfig(dataset=str(pairs / "dataset"), split="train", eval_split="test"),
        train=TrainConfig(max_steps=args.dpo_steps, batch_size=16, grad_accum=1, learning_rate=3e-4, scheduler="cosine",
                          warmup_steps=10, logging_steps=50, eval_steps=100, save_steps=100, precision="fp32"),
        dpo=DPOParams(beta=0.1, dpop_lambda=args.dpop_lambda)))
    t_dpo = time.perf_counter()
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().split("\n") if line.strip()]
    a, b = held_out(root / "dpo" / "final", test), held_out(sft, test)
    card = json.loads((pairs / "card.json").read_text())
    result = {
        "seed": args.seed, "held_out_prompts": len(test), "pairs": card["counts"], "dropped": card["dropped"],
        "exact_match": compare(a["exact"], b["exact"]), "content": compare(a["content"], b["content"]),
        "sign_off_rate": {"dpo": round(sum(a["sign_off"]) / len(test), 3), "sft": round(sum(b["sign_off"]) / len(test), 3)},
        "seconds": {"world_sft": round(t_sft - t0), "pairs": round(t_pairs - t_sft), "dpo": round(t_dpo - t_pairs)},
        "settings": {"sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps, "prompts": args.prompts,
                     "dpop_lambda": args.dpop_lambda},
    }
    (root / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
