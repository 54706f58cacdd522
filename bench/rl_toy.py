"""RLOO on the demo's toy world: does RL make the SFT model better on held-out prompts?

Builds the demo world, trains the demo's SFT model (600 steps) for a seed, runs RLOO from it on
`world/prompts/train.jsonl` with the toy verifier, and compares greedy replies of the RL model
and the SFT model on the 160 held-out prompts: exact match, wins / losses per prompt, and the
exact sign test. Prints one JSON line.

    python bench/rl_toy.py --seed 0 --output-dir runs/rl-toy-0
    python bench/rl_toy.py --seed 0 --sign-off-share 0   # the world as of 2026-11-29: bare SFT replies

The README's figures of 2026-11-29 were measured on bare SFT replies (`--sign-off-share 0`); the
demo's world now gives 70% of them a sign-off that the verifier scores 0 (the default here).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignkit.cli import quiet_third_party
from alignkit.config import ModelConfig, TrainConfig
from alignkit.demo.run import demo_sft_config, write_world_data
from alignkit.demo.world import N_HELD_OUT, SIGN_OFF_SHARE, build_tokenizer, write_chat_data, write_model_config
from alignkit.winrate import sign_test
from alignkit.generation import PromptSource, SamplingParams, generate
from alignkit.models import init_model, load_causal_lm, load_tokenizer
from alignkit.rewards.backends import RewardConfig
from alignkit.rewards.toy import toy_reward
from alignkit.train.rl import RLConfig, RLParams, run_rl
from alignkit.train.sft import run_sft


def held_out_scores(model_dir: Path, test: list[dict]) -> list[float]:
    chat = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = load_causal_lm(ModelConfig(name_or_path=str(model_dir)), chat)
    outs = generate(model, chat, [p["messages"][:1] for p in test], SamplingParams(max_new_tokens=24), batch_size=64)
    return [toy_reward(p["messages"][0]["content"], o[0].text) for p, o in zip(test, outs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/rl-toy")
    ap.add_argument("--steps", type=int, default=100, help="RLOO optimizer steps")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--sign-off-share", type=float, default=SIGN_OFF_SHARE, help="share of SFT replies with the sign-off")
    args = ap.parse_args()
    quiet_third_party()
    root, world = Path(args.output_dir), Path(args.output_dir) / "world"
    tok = build_tokenizer(world / "tokenizer")
    write_model_config(world / "model-config", vocab_size=len(load_tokenizer(ModelConfig(name_or_path=str(tok))).tokenizer))
    init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok), seed=args.seed)
    write_world_data(world)
    write_chat_data(world / "data", n_train=4000, n_test=N_HELD_OUT, sign_off_share=args.sign_off_share)
    run_sft(demo_sft_config(world, root / "sft", 600, True, args.seed))
    start = time.perf_counter()
    run_rl(RLConfig(
        output_dir=str(root / "rl"), seed=args.seed, quiet=True, model=ModelConfig(name_or_path=str(root / "sft" / "final")),
        prompts=PromptSource(dataset=str(world / "prompts"), split="train"), reward=RewardConfig(kind="rule", rule="toy"),
        rl=RLParams(algo="rloo", k=4, max_new_tokens=24, beta=args.beta, temperature=1.0, log_samples_steps=0),
        train=TrainConfig(max_steps=args.steps, batch_size=16, learning_rate=args.lr, scheduler="constant", save_steps=None,
                          logging_steps=10, precision="fp32"),
    ))
    rl_seconds = time.perf_counter() - start
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().split("\n") if line.strip()]
    rl, sft = held_out_scores(root / "rl" / "final", test), held_out_scores(root / "sft" / "final", test)
    wins, losses = sum(a > b for a, b in zip(rl, sft)), sum(a < b for a, b in zip(rl, sft))
    logs = [json.loads(line) for line in (root / "rl" / "metrics.jsonl").read_text().split("\n") if line.strip()]
    rewards = [m["reward"] for m in logs if "reward" in m]
    print(json.dumps({"seed": args.seed, "steps": args.steps, "lr": args.lr, "beta": args.beta, "rl_seconds": round(rl_seconds),
                      "train_reward_first_last": [round(rewards[0], 3), round(rewards[-1], 3)],
                      "held_out_sft": round(sum(sft) / len(sft), 3), "held_out_rl": round(sum(rl) / len(rl), 3),
                      "wins": wins, "losses": losses, "sign_test_p": round(sign_test(wins, losses), 4)}))


if __name__ == "__main__":
    main()
