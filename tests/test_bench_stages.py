"""bench/stages.py compares like with like: TRL's SFT side trains on exactly the tokens alignkit's does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import need_shared

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_stages", ROOT / "bench" / "stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_trl_training_template_masks_the_tokens_alignkit_labels(qwen_chat):
    """TRL's assistant_only_loss mask under stages.TRAINING_TEMPLATE: the same ids as the checkpoint's
    template and the same trained positions as alignkit's labels (reply and <|im_end|>), on real chats."""
    from alignkit.data.chat import IGNORE_INDEX, tokenize_chat

    bench = load_bench()
    tok = qwen_chat.tokenizer
    rows = []
    with open(need_shared("data", "smoltalk_like", "train.jsonl")) as f:
        for line in f:
            m = json.loads(line)["messages"][:2]
            if [x["role"] for x in m] == ["user", "assistant"]:
                rows.append(m)
            if len(rows) == 8:
                break
    rows.append([{"role": "system", "content": "Be brief."}] + rows[0])
    for messages in rows:
        ours = tokenize_chat(tok, messages, qwen_chat.end_of_turn)
        theirs = tok.apply_chat_template(messages, chat_template=bench.TRAINING_TEMPLATE, tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert theirs["input_ids"][: len(ours.input_ids)] == ours.input_ids  # TRL's row also holds the "\n" after <|im_end|>
        trained = [i for i, m in enumerate(theirs["assistant_masks"]) if m]
        assert trained == [i for i, label in enumerate(ours.labels) if label != IGNORE_INDEX]


def test_length_reward_is_the_same_function_on_both_sides():
    bench = load_bench()
    assert bench.length_reward("p", "x" * 60) == 0.0 and bench.length_reward("p", "") == -1.0
    completions = [[{"role": "assistant", "content": "x" * 30}], [{"role": "assistant", "content": "x" * 90}]]
    assert bench.trl_length_reward(["p", "p"], completions) == [-0.5, -0.5]
