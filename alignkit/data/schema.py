"""Detect a dataset's schema, validate every row up front, and normalise rows to two shapes.

Shapes used by the rest of the toolkit:
  conversation: {"messages": [{"role", "content"}, ...]}               (SFT)
  preference:   {"prompt": [messages], "chosen": str, "rejected": str}  (DPO, reward models)

Schemas understood:
  chat               `messages` (smol-smoltalk)
  prompt_completion  `prompt` + `completion` (strings or message lists)
  preference         `prompt` + `chosen` + `rejected`: message lists (ultrafeedback_binarized)
                     or strings, including "Human: ... Assistant:" transcripts as the prompt;
                     also `chosen` + `rejected` alone as two whole transcripts (raw Anthropic/hh-rlhf),
                     split at the final "Assistant:" reply
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Iterable

from .loading import Source

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Invalid rows, reported with source, row and field before any training starts."""


class RowError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


def detect_schema(columns: Iterable[str]) -> str:
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols or {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "chat"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    raise DataError(
        f"cannot tell the dataset's schema from its columns {sorted(cols)}: expected 'messages' (chat), "
        "'prompt' + 'completion', or 'prompt' + 'chosen' + 'rejected' (preference pairs)"
    )


# --------------------------------------------------------------------------- row checks


def check_messages(value: Any, field: str, need_assistant: bool = True) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(field, "empty conversation")
    out = []
    seen_user = False
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected a message object, got {type(m).__name__}")
        if "role" not in m:
            raise RowError(f"{where}.role", "missing")
        if "content" not in m or m["content"] is None:
            raise RowError(f"{where}.content", "missing")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RowError(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if role == "assistant" and not seen_user:
            raise RowError(f"{where}.role", "assistant turn before any user turn")
        seen_user |= role == "user"
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RowError(field, "no assistant turn")
    return out


def check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "missing")
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty")
    return value


HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def parse_transcript(text: str) -> list[dict] | None:
    """'Human: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> messages, or None if not that format."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()  # the open "Assistant:" that the response completes
    return msgs


def split_transcripts(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Raw hh-rlhf rows: (prompt, chosen reply, rejected reply) from two whole transcripts.

    The transcripts share everything before their final 'Assistant:' reply; that shared part is the prompt.
    """
    replies = []
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        msgs = parse_transcript(text)
        if msgs is None:
            raise RowError(field, "not a 'Human: ... Assistant: ...' transcript like 'chosen'")
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise RowError(field, "transcript does not end with a non-empty 'Assistant:' reply")
        replies.append(msgs)
    (*prompt, chosen_msg), (*rejected_prompt, rejected_msg) = replies
    if rejected_prompt != prompt:
        raise RowError("rejected", "transcript before the final reply differs from the chosen one")
    prompt = check_messages(prompt, "chosen", need_assistant=False)
    if prompt[-1]["role"] != "user":
        raise RowError("chosen", "the final 'Assistant:' reply does not follow a 'Human:' turn")
    return prompt, chosen_msg["content"], rejected_msg["content"]


def prompt_messages(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        check_text(value, field)
        return parse_transcript(value) or [{"role": "user", "content": value}]
    msgs = check_messages(value, field, need_assistant=False)
    if msgs[-1]["role"] == "assistant":
        raise RowError(field, "prompt ends with an assistant turn")
    return msgs


def response_of(value: Any, field: str) -> tuple[str, list[dict] | None]:
    """A response given as a string, or as a message list ending in the assistant reply."""
    if isinstance(value, list):
        msgs = check_messages(value, field)
        if msgs[-1]["role"] != "assistant":
            raise RowError(field, "last message is not the assistant's response")
        text = msgs[-1]["content"]
        if not text.strip():
            raise RowError(f"{field}[-1].content", "empty response")
        return text, msgs[:-1]
    return check_text(value, field), None


def to_conversation(row: dict, schema: str) -> dict:
    if schema == "chat":
        return {"messages": check_messages(row.get("messages"), "messages")}
    if schema == "prompt_completion":
        prompt = prompt_messages(row.get("prompt"), "prompt")
        completion, _ = response_of(row.get("completion"), "completion")
        return {"messages": prompt + [{"role": "assistant", "content": completion}]}
    if schema == "preference":
        pair = to_preference(row, schema)
        return {"messages": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]}
    raise DataError(f"unknown schema {schema}")


def to_preference(row: dict, schema: str) -> dict:
    if schema != "preference":
        raise DataError(f"preference pairs need 'chosen' and 'rejected' columns; this dataset is {schema}")
    if row.get("chosen") is None:
        raise RowError("chosen", "missing")
    if row.get("rejected") is None:
        raise RowError("rejected", "missing")
    chosen, chosen_ctx = response_of(row["chosen"], "chosen")
    rejected, rejected_ctx = response_of(row["rejected"], "rejected")
    if chosen_ctx:  # message lists carry the whole conversation; it is the prompt
        prompt = chosen_ctx
    elif row.get("prompt") is not None:
        prompt = prompt_messages(row["prompt"], "prompt")
    elif parse_transcript(chosen) is not None:  # raw hh-rlhf: two whole transcripts
        prompt, chosen, rejected = split_transcripts(chosen, rejected)
    else:
        raise RowError("prompt", "missing (and 'chosen' is neither a conversation nor a 'Human: ... Assistant: ...' transcript)")
    if rejected_ctx and rejected_ctx != prompt:
        raise RowError("rejected", "conversation before the response differs from the chosen one")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen", "identical to rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------- whole datasets


def normalise(rows, source: Source, shape: str, skip_invalid: bool = False, row_ids: list[int] | None = None) -> list[dict]:
    """Validate and convert every row; raise DataError listing problems unless skip_invalid.

    row_ids: each row's index in the source, when `rows` is a selection of it (errors name the source's line).
    """
    schema = detect_schema(rows.column_names)
    convert = to_conversation if shape == "conversation" else to_preference
    keep_columns = [c for c in ("category", "source", "prompt_id") if c in rows.column_names]
    out, problems = [], []
    reasons: Counter = Counter()
    for i, row in enumerate(rows):
        try:
            item = convert(row, schema)
        except RowError as e:
            problems.append(f"{source.where(row_ids[i] if row_ids is not None else i)}: {e}")
            reasons[e.message] += 1
            continue
        for c in keep_columns:
            item[c] = row[c]
        out.append(item)
    if problems:
        if not skip_invalid:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(
                f"{len(problems)} invalid row(s) in {source.name} ({schema} schema):\n  {shown}{more}\n"
                "Fix the data, or set data.skip_invalid: true to skip such rows."
            )
        log.warning(
            "skipped %d invalid row(s) of %d in %s: %s",
            len(problems), len(rows), source.name, dict(reasons),
        )
    if not out:
        raise DataError(f"{source.name}: no valid rows")
    return out


def first_turn(messages: list[dict]) -> list[dict]:
    """Leading system message(s), the first user turn, and the assistant reply to it."""
    out = []
    for m in messages:
        out.append(m)
        if m["role"] == "assistant":
            break
    return out
