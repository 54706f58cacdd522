"""Prompt sets: load the prompts a stage generates for, and read JSONL files of rows.

`load_prompts(PromptSource)` gives [{id, messages, category, columns, where}] from a dataset (Hub id or
local file/folder, as for training data): the prompt is a column, the messages up to the last user
turn, a `prompt` or an `instruction`, or a template filled from the row's plain columns. Used by
generate, eval, best-of-N, refinement and RL alike, so it sits in data/, below the engines
(generation) and the stages. Simplified: a prompt set is loaded whole into memory.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from .loading import load_rows
from .schema import DataError

log = logging.getLogger(__name__)


@dataclass
class PromptSource:
    dataset: str = "tatsu-lab/alpaca_eval"
    """Hub id or local file/folder, as for training data."""
    subset: str | None = None
    split: str = "eval"
    column: str | None = None
    """Column holding the prompt text; unset: messages (up to the last user turn), prompt, or instruction."""
    category_column: str | None = None
    """Column with a category (defaults: category, then dataset)."""
    template: str | None = None
    """Build each prompt from the row's columns, e.g. 'Using the numbers {nums}, ... equals {target}.'
    (plain {column} fields)."""
    skip_prompts: int = 0
    """Rows to skip first (e.g. held-out prompts after the training ones of a one-split dataset)."""
    max_prompts: int | None = None


def load_prompts(src: PromptSource) -> list[dict]:
    """[{id, messages, category, columns, where}] from a dataset, in order.

    `columns` holds the row's plain values (numbers, strings, lists of them) for verifiers that
    read them (e.g. Countdown's nums and target); `where` names the row for error messages.
    """
    rows, source = load_rows(src.dataset, src.split, src.subset)
    start = min(src.skip_prompts, len(rows))
    stop = len(rows) if src.max_prompts is None else min(len(rows), start + src.max_prompts)
    fields = template_fields(src.template) if src.template else []
    missing = [f for f in fields if f not in rows.column_names]
    if missing:
        raise DataError(f"{source.name}: prompts.template names column(s) {', '.join(missing)}, "
                        f"not among {', '.join(rows.column_names)}")
    cat_col = src.category_column or next((c for c in ("category", "dataset") if c in rows.column_names),
                                          None)
    out = []
    for i in range(start, stop):
        row = rows[i]
        if src.template:
            messages = [{"role": "user", "content": src.template.format(**{f: row[f] for f in fields})}]
        else:
            messages = prompt_messages_of(row, src.column)
        if messages is None:
            raise DataError(f"{source.where(i)}: no prompt "
                            f"(expected {src.column or 'messages, prompt or instruction'})")
        out.append({"id": i, "messages": messages, "category": row.get(cat_col) if cat_col else None,
                    "columns": plain_columns(row), "where": source.where(i)})
    return out


def template_fields(template: str) -> list[str]:
    """The {column} fields of a prompt template; anything but a plain column name is refused."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"prompts.template: {e}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ConfigError(f"prompts.template: '{{{name}}}' is not a plain column name "
                              "(write {column}; literal braces as {{ }})")
        fields.append(name)
    return fields


def plain_columns(row: dict) -> dict:
    """The row's values that are numbers, strings, booleans or lists of those (what a verifier may read)."""
    simple = (str, int, float, bool, type(None))
    return {k: v for k, v in row.items()
            if isinstance(v, simple) or (isinstance(v, list) and all(isinstance(x, simple) for x in v))}


def prompt_messages_of(row: dict, column: str | None = None) -> list[dict] | None:
    if column:
        value = row.get(column)
        return [{"role": "user", "content": value}] if isinstance(value, str) and value.strip() else None
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
        last_user = max((k for k, m in enumerate(msgs) if m.get("role") == "user"), default=None)
        if last_user is None:
            return None
        return [{"role": m["role"], "content": m["content"]} for m in msgs[: last_user + 1]]
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt:
        return prompt
    for key in ("prompt", "instruction"):
        if isinstance(row.get(key), str) and row[key].strip():
            return [{"role": "user", "content": row[key]}]
    return None


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (from a kill mid-write) is ignored."""
    rows = []
    # "\n" only: str.splitlines() also splits at U+2028, U+0085 and others, which may sit raw inside a
    # JSON string.
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring an incomplete line", path)
    return rows
