"""`alignkit data-stats`: token-length percentiles, to choose prompt and response limits."""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from .chat import tokenize_chat, tokenize_prompt
from .loading import load_rows
from .prepare import cap
from .schema import detect_schema, first_turn, normalise

PERCENTILES = (50, 90, 95, 99)


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES} | {"max": int(arr.max())}


def data_stats(cfg) -> dict:
    from ..models import load_tokenizer

    chat = load_tokenizer(ModelConfig(name_or_path=cfg.tokenizer))
    tok = chat.tokenizer
    rows, source = load_rows(cfg.dataset, cfg.split, cfg.subset)
    rows, row_ids = cap(rows, cfg.max_examples, cfg.seed)
    schema = detect_schema(rows.column_names)
    lengths: dict[str, list[int]] = {}
    if schema == "preference":
        for pair in normalise(rows, source, "preference", cfg.skip_invalid, row_ids):
            prompt = tokenize_prompt(tok, pair["prompt"])
            lengths.setdefault("prompt", []).append(len(prompt))
            for side in ("chosen", "rejected"):
                reply = tok(pair[side] + chat.end_of_turn, add_special_tokens=False)["input_ids"]
                lengths.setdefault(side, []).append(len(reply))
    elif schema == "language_modeling":
        for row in normalise(rows, source, "text", cfg.skip_invalid, row_ids):
            lengths.setdefault("text", []).append(len(tok(row["text"], add_special_tokens=False)["input_ids"]))
    else:
        for conv in normalise(rows, source, "conversation", cfg.skip_invalid, row_ids):
            messages = first_turn(conv["messages"]) if cfg.first_turn_only else conv["messages"]
            t = tokenize_chat(tok, messages, chat.end_of_turn)
            lengths.setdefault("prompt", []).append(t.prompt_tokens)
            lengths.setdefault("response", []).extend(t.response_tokens)
            lengths.setdefault("total", []).append(len(t.input_ids))
    table = {name: percentiles(v) for name, v in lengths.items()}
    print(f"{source.name}: {len(rows)} rows ({schema} schema), tokens by {cfg.tokenizer}")
    print(f"{'':10}" + "".join(f"{k:>8}" for k in [f"p{p}" for p in PERCENTILES] + ["max"]) + f"{'n':>8}")
    for name, stats in table.items():
        print(f"{name:10}" + "".join(f"{v:>8}" for v in stats.values()) + f"{len(lengths[name]):>8}")
    return None
