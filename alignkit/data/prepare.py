"""From a DataConfig to validated, tokenised, filtered train/eval examples."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from ..config import ConfigError, DataConfig, eval_origin
from .chat import tokenize_chat, tokenize_reply
from .loading import Source, load_rows
from .schema import DataError, first_turn, normalise

log = logging.getLogger(__name__)


def load_examples(
    cfg: DataConfig, shape: str, seed: int, default_eval_split: str | None = None
) -> tuple[list[dict], list[dict] | None]:
    """Validated rows in `shape` ('conversation', 'preference', or 'text': conversations or plain-text
    language-modelling rows, as SFT takes them) for training and evaluation.

    Where eval rows come from (one rule, logged at start):
      1. data.eval_dataset: that dataset (its data.eval_split when it has splits);
      2. data.eval_ratio > 0: that fraction of the training rows, held out (seeded);
      3. data.eval_split: that split of data.dataset, when data.dataset has splits;
      4. none.
    `default_eval_split` is the stage's own default (DPO, RM: test_prefs). Unlike a split the user asked
    for, it gives way to eval_ratio and is skipped (with a log line) where the dataset has no such split.
    Eval rows never come from the file the training rows come from.
    """
    where = eval_origin(cfg, default_eval_split)  # settings that cannot work stop before any data is read
    rows, source = load_rows(cfg.dataset, cfg.split, cfg.subset)
    rows, row_ids = cap(rows, cfg.max_examples, seed)
    train = normalise(rows, source, shape, cfg.skip_invalid, row_ids)
    if where is None:
        return train, None
    if isinstance(where, str):
        log.info("eval: none (%s)", where)
        return train, None
    if where[0] == "ratio":
        n_eval = max(1, round(len(train) * cfg.eval_ratio))
        if n_eval >= len(train):
            raise DataError(f"data.eval_ratio {cfg.eval_ratio} of {len(train)} rows leaves no training rows")
        order = datasets.Dataset.from_dict({"i": list(range(len(train)))}).shuffle(seed=seed)["i"]
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
        if cfg.max_eval_examples:
            evals = evals[: cfg.max_eval_examples]
        log.info("eval: %d rows held out from the training rows of %s (data.eval_ratio %g)", len(evals), source.name, cfg.eval_ratio)
        return train, evals
    _, spec, split = where
    eval_rows, eval_source = load_rows(spec, split, cfg.subset)
    if same_rows(eval_source, source):
        raise ConfigError(
            f"the eval rows would be the training rows ({source.name}): set data.eval_dataset to another "
            "dataset or split, or data.eval_ratio to hold out part of the training rows"
        )
    eval_rows, eval_ids = cap(eval_rows, cfg.max_eval_examples, seed)
    evals = normalise(eval_rows, eval_source, shape, cfg.skip_invalid, eval_ids)
    log.info("eval: %d rows from %s", len(evals), eval_source.name)
    return train, evals


def same_rows(a: Source, b: Source) -> bool:
    if a.is_file and b.is_file:
        return Path(a.name).resolve() == Path(b.name).resolve()
    return a.name == b.name


def cap(rows: datasets.Dataset, limit: int | None, seed: int) -> tuple[datasets.Dataset, list[int] | None]:
    """A seeded random `limit` rows (all when unset), and their indices in `rows` (None: all, in order)."""
    if limit is None or limit >= len(rows):
        return rows, None
    ids = np.random.default_rng(seed).permutation(len(rows))[:limit].tolist()  # what Dataset.shuffle(seed) picks
    return rows.select(ids), ids


def tokenize_conversations(rows: list[dict], chat, cfg: DataConfig, desc: str = "tokenise") -> datasets.Dataset:
    """Tokenise through the chat template, apply the filters, log what was dropped and why."""

    def one(row: dict) -> dict:
        if row["text"] is not None:
            return one_text(row["text"])
        context = row.get("context_replies") or 0
        if cfg.first_turn_only and context:
            return {"input_ids": [], "labels": [], "prompt_tokens": 0, "truncated": False,
                    "drop": "completion follows earlier assistant turns (first_turn_only)"}
        messages = first_turn(row["messages"]) if cfg.first_turn_only else row["messages"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"][context:]
        reason = ""
        if cfg.min_response_chars and min(len(r.strip()) for r in replies) < cfg.min_response_chars:
            reason = f"response shorter than {cfg.min_response_chars} characters"
        tok = tokenize_chat(chat.tokenizer, messages, chat.end_of_turn, cfg.max_response_tokens, context)
        if not reason and cfg.max_prompt_tokens is not None and tok.prompt_tokens > cfg.max_prompt_tokens:
            reason = f"prompt longer than {cfg.max_prompt_tokens} tokens"
        return {
            "input_ids": tok.input_ids,
            "labels": tok.labels,
            "prompt_tokens": tok.prompt_tokens,
            "truncated": tok.truncated,
            "drop": reason,
        }

    def one_text(text: str) -> dict:
        # TRL's language modelling: the text and the tokenizer's EOS token, every token trained on.
        reason = f"text shorter than {cfg.min_response_chars} characters" if len(text.strip()) < cfg.min_response_chars else ""
        eos = chat.tokenizer.eos_token or chat.end_of_turn
        ids = chat.tokenizer(text if text.endswith(eos) else text + eos, add_special_tokens=False)["input_ids"]
        truncated = cfg.max_response_tokens is not None and len(ids) > cfg.max_response_tokens
        ids = ids[: cfg.max_response_tokens] if truncated else ids
        return {"input_ids": ids, "labels": list(ids), "prompt_tokens": 0, "truncated": truncated, "drop": reason}

    ds = datasets.Dataset.from_list([{"messages": r.get("messages"), "text": r.get("text"), "context_replies": r.get("context_replies", 0)}
                                     for r in rows])
    ds = ds.map(one, remove_columns=["messages", "text", "context_replies"], num_proc=cfg.num_proc, desc=desc, new_fingerprint=uuid.uuid4().hex)
    return keep_undropped(ds, len(rows), desc)


def tokenize_pairs(rows: list[dict], chat, cfg: DataConfig, desc: str = "tokenise pairs") -> datasets.Dataset:
    """prompt_ids / chosen_ids / rejected_ids per pair, with the same limits as SFT."""

    def one(row: dict) -> dict:
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "truncated": False, "drop": pair_drop_reason(row, cfg)}
        if out["drop"]:
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


def tokenize_unpaired(rows: list[dict], chat, cfg: DataConfig, desc: str = "tokenise unpaired rows"):
    """KTO rows -> a Dataset of prompt_ids / completion_ids / label, with the limits of preference pairs."""

    def one(row: dict) -> dict:
        out = {"prompt_ids": [], "completion_ids": [], "truncated": False, "drop": ""}
        if cfg.min_response_chars and len(row["completion"].strip()) < cfg.min_response_chars:
            out["drop"] = f"response shorter than {cfg.min_response_chars} characters"
        elif cfg.first_turn_only and sum(m["role"] == "user" for m in row["prompt"]) > 1:
            out["drop"] = "prompt has more than one user turn (first_turn_only)"
        if out["drop"]:
            return out
        prompt_ids, reply_ids = tokenize_reply(chat.tokenizer, row["prompt"], row["completion"],
                                               chat.end_of_turn)
        if cfg.max_response_tokens is not None and len(reply_ids) > cfg.max_response_tokens:
            reply_ids, out["truncated"] = reply_ids[: cfg.max_response_tokens], True
        if cfg.max_prompt_tokens is not None and len(prompt_ids) > cfg.max_prompt_tokens:
            out["drop"] = f"prompt longer than {cfg.max_prompt_tokens} tokens"
        out["prompt_ids"], out["completion_ids"] = prompt_ids, reply_ids
        return out

    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")} for r in rows])
    ds = ds.map(one, remove_columns=["prompt", "completion"], num_proc=cfg.num_proc, desc=desc,
                new_fingerprint=uuid.uuid4().hex)
    return keep_undropped(ds, len(rows), desc)


def pair_drop_reason(row: dict, cfg: DataConfig) -> str:
    """The filters on a preference pair that need no tokenizer (shared by DPO and reward models); '' keeps it.

    first_turn_only keeps pairs that answer the first user turn: a pair about a later turn cannot be cut
    to the first one (its replies answer the last turn), so it is dropped.
    """
    if cfg.min_response_chars and min(len(row["chosen"].strip()), len(row["rejected"].strip())) < cfg.min_response_chars:
        return f"response shorter than {cfg.min_response_chars} characters"
    if cfg.first_turn_only and sum(m["role"] == "user" for m in row["prompt"]) > 1:
        return "prompt has more than one user turn (first_turn_only)"
    return ""


def truncate_text(tokenizer, text: str, max_tokens: int | None) -> tuple[str, bool]:
    """`text` cut after its first max_tokens tokens (at a token boundary), and whether it was cut."""
    if max_tokens is None:
        return text, False
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    if len(enc["input_ids"]) <= max_tokens:
        return text, False
    if not fast:
        return tokenizer.decode(enc["input_ids"][:max_tokens]), True
    return text[: enc["offset_mapping"][max_tokens - 1][1]], True


def keep_undropped(ds: datasets.Dataset, n_rows: int, desc: str) -> datasets.Dataset:
    dropped = Counter(r for r in ds["drop"] if r)
    truncated = sum(ds["truncated"])
    ds = ds.filter(lambda r: not r, input_columns="drop", new_fingerprint=uuid.uuid4().hex).remove_columns(["drop"])
    if dropped or truncated:
        log.info("%s: kept %d of %d examples; dropped %s; truncated responses in %d", desc, len(ds), n_rows, dict(dropped), truncated)
    if len(ds) == 0:
        why = "; ".join(f"{n} {reason}" for reason, n in dropped.most_common())
        raise DataError(
            f"{desc}: every example was filtered out: {n_rows} valid row(s) read, all dropped by the data limits ({why}); "
            "loosen data.max_prompt_tokens / data.min_response_chars / data.first_turn_only"
        )
    return ds
