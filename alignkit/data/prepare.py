"""From a DataConfig to validated, tokenised, filtered train/eval examples."""

from __future__ import annotations

import logging
import uuid
from collections import Counter

import datasets

from ..config import DataConfig
from .chat import tokenize_chat, tokenize_reply
from .loading import load_rows
from .schema import DataError, first_turn, normalise

log = logging.getLogger(__name__)


def load_examples(cfg: DataConfig, shape: str, seed: int) -> tuple[list[dict], list[dict] | None]:
    """Validated rows in `shape` ('conversation' or 'preference') for training and evaluation."""
    rows, source = load_rows(cfg.dataset, cfg.split, cfg.subset)
    rows = cap(rows, cfg.max_examples, seed)
    train = normalise(rows, source, shape, cfg.skip_invalid)
    evals = None
    if cfg.eval_split:
        eval_rows, eval_source = load_rows(cfg.eval_dataset or cfg.dataset, cfg.eval_split, cfg.subset)
        eval_rows = cap(eval_rows, cfg.max_eval_examples, seed)
        evals = normalise(eval_rows, eval_source, shape, cfg.skip_invalid)
    elif cfg.eval_ratio > 0:
        if not 0 < cfg.eval_ratio < 1:
            raise DataError(f"data.eval_ratio must be between 0 and 1, got {cfg.eval_ratio}")
        n_eval = max(1, round(len(train) * cfg.eval_ratio))
        order = datasets.Dataset.from_dict({"i": list(range(len(train)))}).shuffle(seed=seed)["i"]
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
        if cfg.max_eval_examples:
            evals = evals[: cfg.max_eval_examples]
    return train, evals


def cap(rows: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= len(rows):
        return rows
    return rows.shuffle(seed=seed).select(range(limit))


def tokenize_conversations(rows: list[dict], chat, cfg: DataConfig, desc: str = "tokenise") -> datasets.Dataset:
    """Tokenise through the chat template, apply the filters, log what was dropped and why."""

    def one(row: dict) -> dict:
        messages = first_turn(row["messages"]) if cfg.first_turn_only else row["messages"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        reason = ""
        if cfg.min_response_chars and min(len(r.strip()) for r in replies) < cfg.min_response_chars:
            reason = f"response shorter than {cfg.min_response_chars} characters"
        tok = tokenize_chat(chat.tokenizer, messages, chat.end_of_turn, cfg.max_response_tokens)
        if not reason and cfg.max_prompt_tokens is not None and tok.prompt_tokens > cfg.max_prompt_tokens:
            reason = f"prompt longer than {cfg.max_prompt_tokens} tokens"
        return {
            "input_ids": tok.input_ids,
            "labels": tok.labels,
            "prompt_tokens": tok.prompt_tokens,
            "truncated": tok.truncated,
            "drop": reason,
        }

    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    ds = ds.map(one, remove_columns=["messages"], num_proc=cfg.num_proc, desc=desc, new_fingerprint=uuid.uuid4().hex)
    return keep_undropped(ds, len(rows), desc)


def tokenize_pairs(rows: list[dict], chat, cfg: DataConfig, desc: str = "tokenise pairs") -> datasets.Dataset:
    """prompt_ids / chosen_ids / rejected_ids per pair, with the same limits as SFT."""

    def one(row: dict) -> dict:
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "truncated": False, "drop": ""}
        if cfg.min_response_chars and min(len(row["chosen"].strip()), len(row["rejected"].strip())) < cfg.min_response_chars:
            out["drop"] = f"response shorter than {cfg.min_response_chars} characters"
            return out
        for side in ("chosen", "rejected"):
            prompt_ids, reply_ids = tokenize_reply(chat.tokenizer, row["prompt"], row[side], chat.end_of_turn)
            if cfg.max_response_tokens is not None and len(reply_ids) > cfg.max_response_tokens:
                reply_ids = reply_ids[: cfg.max_response_tokens]
                out["truncated"] = True
            out["prompt_ids"], out[f"{side}_ids"] = prompt_ids, reply_ids
        if cfg.max_prompt_tokens is not None and len(out["prompt_ids"]) > cfg.max_prompt_tokens:
            out["drop"] = f"prompt longer than {cfg.max_prompt_tokens} tokens"
        return out

    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    ds = ds.map(one, remove_columns=["prompt", "chosen", "rejected"], num_proc=cfg.num_proc, desc=desc, new_fingerprint=uuid.uuid4().hex)
    return keep_undropped(ds, len(rows), desc)


def keep_undropped(ds: datasets.Dataset, n_rows: int, desc: str) -> datasets.Dataset:
    dropped = Counter(r for r in ds["drop"] if r)
    truncated = sum(ds["truncated"])
    ds = ds.filter(lambda r: not r, input_columns="drop", new_fingerprint=uuid.uuid4().hex).remove_columns(["drop"])
    if dropped or truncated:
        log.info("%s: kept %d of %d examples; dropped %s; truncated responses in %d", desc, len(ds), n_rows, dict(dropped), truncated)
    if len(ds) == 0:
        raise DataError(f"{desc}: every example was filtered out ({dict(dropped)}); loosen the data limits")
    return ds
