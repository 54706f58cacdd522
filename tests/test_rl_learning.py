"""RL learns, not just runs (#8): RLOO and GRPO each raise the toy verifier's mean reward of a tiny SFT model.

The tiny SFT model knows the answers to 12 toy prompts, but half of its training replies end with a
chatty sign-off (" Hope this helps!") that the verifier, which wants the bare answer, scores 0. Its
mean reward is measured exactly enough to compare: 16 seeded samples at temperature 1 for each of
the 12 prompts (192 scored samples), before and after 15 RL steps on those prompts.
Measured 2026-11-30 (2-core CPU, about 5 s in all): mean reward 0.38 -> 0.51 (RLOO) and 0.55 (GRPO), sign-offs
41% -> 4% and 7%; the test asks for a rise of at least 0.1, fewer sign-offs, and a rising logged reward.
"""

import json
import random

import pytest

from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.demo.world import SIGN_OFF, build_tokenizer, write_jsonl, write_model_config
from alignkit.generation import PromptSource, SamplingParams, generate
from alignkit.models import init_model, load_causal_lm, load_tokenizer
from alignkit.rewards.backends import RewardConfig
from alignkit.rewards.toy import solve, toy_reward
from alignkit.train.rl import RLConfig, RLParams, run_rl
from alignkit.train.sft import SFTConfig, run_sft

PROMPTS = [
    "Repeat the word cat 2 times.", "Repeat the word sun 3 times.", "Write dog in capital letters.",
    "Write moon in capital letters.", "Spell fish backwards.", "Spell tree backwards.", "What is 3 plus 4?",
    "What is 7 plus 8?", "What is 2 plus 9?", "Sort these numbers: 3 1 2", "Sort these numbers: 9 4 7 1",
    "Sort these numbers: 5 0 8",
]


@pytest.fixture(scope="module")
def chatty_sft(tmp_path_factory):
    """A 2-layer model after 100 SFT steps on 256 chats of the 12 prompts, half with the sign-off."""
    root = tmp_path_factory.mktemp("chatty")
    tok = build_tokenizer(root / "tokenizer")
    chat = load_tokenizer(ModelConfig(name_or_path=str(tok)))
    write_model_config(root / "config", vocab_size=len(chat.tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2)
    base = init_model(str(root / "config"), root / "base", tokenizer_source=str(tok), seed=0)
    rng = random.Random(0)
    chats = [{"messages": [{"role": "user", "content": p},
                           {"role": "assistant", "content": solve(p) + (SIGN_OFF if rng.random() < 0.5 else "")}]}
             for p in PROMPTS * 22]
    write_jsonl(chats[:256], root / "data" / "train.jsonl")
    write_jsonl([{"prompt": p} for p in PROMPTS * 8], root / "prompts" / "train.jsonl")
    run_sft(SFTConfig(output_dir=str(root / "sft"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(base)),
                      data=DataConfig(dataset=str(root / "data")),
                      train=TrainConfig(max_steps=100, batch_size=16, learning_rate=1e-2, warmup_steps=10,
                                        save_steps=None, precision="fp32", logging_steps=50)))
    return root


def mean_reward(model_dir) -> tuple[float, float]:
    """Mean verifier reward and sign-off share over 16 seeded samples per prompt at temperature 1."""
    cfg = ModelConfig(name_or_path=str(model_dir))
    chat = load_tokenizer(cfg)
    outs = generate(load_causal_lm(cfg, chat), chat, [[{"role": "user", "content": p}] for p in PROMPTS],
                    SamplingParams(max_new_tokens=24, temperature=1.0, n=16, seed=123), batch_size=96)
    rewards = [toy_reward(p, c.text) for p, cs in zip(PROMPTS, outs) for c in cs]
    sign_offs = [SIGN_OFF.strip() in c.text for cs in outs for c in cs]
    return sum(rewards) / len(rewards), sum(sign_offs) / len(sign_offs)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rl_raises_the_verifiers_mean_reward(chatty_sft, algo):
    """#8: RLOO and GRPO each raise the verifier's mean reward of a tiny SFT model within a CI budget."""
    out = chatty_sft / f"rl-{algo}"
    run_rl(RLConfig(
        output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(chatty_sft / "sft" / "final")),
        prompts=PromptSource(dataset=str(chatty_sft / "prompts"), split="train"),
        reward=RewardConfig(kind="rule", rule="toy"),
        rl=RLParams(algo=algo, k=4, max_new_tokens=24, beta=0.0, temperature=1.0, log_samples_steps=0),
        train=TrainConfig(max_steps=15, batch_size=16, learning_rate=1e-3, scheduler="constant", save_steps=None,
                          logging_steps=5, precision="fp32"),
    ))
    before, sign_offs_before = mean_reward(chatty_sft / "sft" / "final")
    after, sign_offs_after = mean_reward(out / "final")
    assert after >= before + 0.1, (algo, before, after)
    assert sign_offs_after < sign_offs_before, (sign_offs_before, sign_offs_after)
    logged = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] > logged[0], logged
