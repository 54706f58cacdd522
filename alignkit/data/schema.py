"""Detect a dataset's schema, validate every row up front, and normalise rows to three shapes.

Shapes used by the rest of the toolkit:
  conversation: {"messages": [{"role", "content"}, ...]}               (SFT)
  text:         {"text": str}                                          (SFT on plain text, all tokens)
  preference:   {"prompt": [messages], "chosen": str, "rejected": str}  (DPO, reward models)
  unpaired:     {"prompt": [messages], "completion": str, "label": bool}  (KTO)

Schemas understood (TRL's standard and conversational formats, and the raw forms of common sets):
  chat                `messages` (smol-smoltalk)
  language_modeling   `text`: plain text, trained on every token (SFT only)
  prompt_completion   `prompt` + `completion`: strings, or a prompt message list and a completion
                      that is either the assistant message(s) alone (TRL) or the whole conversation
  preference          `prompt` + `chosen` + `rejected`: message lists (ultrafeedback_binarized; `chosen`
                      / `rejected` either whole conversations or the assistant message(s) alone, TRL's
                      explicit prompt) or strings, including "Human: ... Assistant:" transcripts as the
                      prompt; also `chosen` + `rejected` alone (TRL's implicit prompt): conversations
                      whose shared part is the prompt, raw Anthropic/hh-rlhf transcripts split at the final
                      "Assistant:" reply, or strings whose common prefix is the prompt (as TRL's extract_prompt)
  prompt_only         `prompt`: prompts for generate / eval, not training rows (a clear error there)
  unpaired_preference `prompt` + `completion` + `label` (KTO): `label` true for a desirable completion,
                      false for an undesirable one; `alignkit dpo` with dpo.loss_type kto trains on it
                      (and on preference pairs, each read as two unpaired rows)

Simplification: standard (string) prompts are wrapped as one user turn and go through the chat
template like conversational ones; TRL applies no template to standard rows.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Iterable

from .loading import DataError, Source

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


def detect_schema(columns: Iterable[str]) -> str:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if "messages" in cols:
        return "chat"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired_preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "language_modeling"
    if "prompt" in cols:
        return "prompt_only"
    raise DataError(
        f"cannot tell the dataset's schema from its columns {sorted(cols)}: expected 'messages' (chat), 'text' "
        "(language modelling), 'prompt' + 'completion', 'prompt' + 'chosen' + 'rejected' or 'chosen' + 'rejected' "
        "(preference pairs)"
    )


# Schemas no training shape can use, and what to do instead.
UNUSABLE = {
    "prompt_only": "prompt-only rows (a 'prompt' column) have no reply to train on; use them as prompts "
    "(prompts.dataset of generate, eval or rl), or add a 'completion' column",
    "unpaired_preference": "unpaired preference rows ('prompt', 'completion', 'label': KTO's format) cannot be "
    "trained on here: DPO and reward models need 'chosen' and 'rejected' replies to one prompt, and SFT a "
    "'completion' without a label (drop the 'label' column to fine-tune on every completion); "
    "alignkit dpo trains on them with dpo.loss_type: kto",
}


def check_usable(schema: str, shape: str) -> None:
    """Raise DataError when rows of `schema` cannot give examples of `shape`, saying what can."""
    if shape == "unpaired":
        if schema not in ("unpaired_preference", "preference"):
            raise DataError(
                "KTO (dpo.loss_type: kto) trains on unpaired rows with 'prompt', 'completion' and a "
                f"true/false 'label' column, or on preference pairs; this dataset is {schema}"
            )
        return
    if schema in UNUSABLE:
        raise DataError(UNUSABLE[schema])
    if schema == "language_modeling" and shape != "text":
        stage = "preference pairs" if shape == "preference" else "conversations"
        raise DataError(
            f"language-modelling rows (a 'text' column) have no prompt/reply turns, and this stage needs {stage}; "
            "plain text can be fine-tuned on with alignkit sft"
        )
    if shape == "preference" and schema != "preference":
        raise DataError(f"preference pairs need 'chosen' and 'rejected' columns; this dataset is {schema}")


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
    if isinstance(value, list) and value and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        return assistant_reply(value, field), None  # TRL: the assistant message(s) alone; the prompt is separate
    if isinstance(value, list):
        msgs = check_messages(value, field)
        if msgs[-1]["role"] != "assistant":
            raise RowError(field, "last message is not the assistant's response")
        text = msgs[-1]["content"]
        if not text.strip():
            raise RowError(f"{field}[-1].content", "empty response")
        return text, msgs[:-1]
    return check_text(value, field), None


def assistant_reply(value: list, field: str) -> str:
    """The reply of a TRL completion given as assistant message(s) only: exactly one assistant message."""
    if len(value) != 1:
        raise RowError(field, f"{len(value)} messages; a completion without its prompt must be one assistant message")
    content = value[0].get("content")
    if not isinstance(content, str):
        raise RowError(f"{field}[0].content", "missing" if content is None else f"expected a string, got {type(content).__name__}")
    if not content.strip():
        raise RowError(f"{field}[0].content", "empty response")
    return content


def common_prefix_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt of two strings: their common prefix (ending before a space), and the rests."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":  # the space belongs to the replies
                idx -= 1
            break
    else:
        idx = min(len(chosen), len(rejected))
    return chosen[:idx], chosen[idx:], rejected[idx:]


def to_text(row: dict, schema: str) -> dict:
    """SFT rows: plain text for language-modelling rows, a conversation for every other schema."""
    if schema == "language_modeling":
        return {"text": check_text(row.get("text"), "text")}
    return to_conversation(row, schema)


def to_conversation(row: dict, schema: str) -> dict:
    if schema == "chat":
        return {"messages": check_messages(row.get("messages"), "messages")}
    if schema == "prompt_completion":
        prompt = prompt_messages(row.get("prompt"), "prompt")
        completion, _ = response_of(row.get("completion"), "completion")
        return {"messages": prompt + [{"role": "assistant", "content": completion}], "context_replies": assistant_turns(prompt)}
    if schema == "preference":
        pair = to_preference(row, schema)
        return {"messages": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}],
                "context_replies": assistant_turns(pair["prompt"])}
    raise DataError(f"unknown schema {schema}")


def assistant_turns(messages: list[dict]) -> int:
    """Assistant turns inside a prompt: context for the completion, not trained on."""
    return sum(m["role"] == "assistant" for m in messages)


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
    elif isinstance(row["chosen"], list):
        raise RowError("prompt", "missing (and 'chosen' holds the assistant reply alone, without its conversation)")
    elif parse_transcript(chosen) is not None:  # raw hh-rlhf: two whole transcripts
        prompt, chosen, rejected = split_transcripts(chosen, rejected)
    else:  # TRL's standard implicit prompt: the common prefix of the two texts
        text, chosen, rejected = common_prefix_prompt(chosen, rejected)
        if not text.strip():
            raise RowError("prompt", "missing, and 'chosen' and 'rejected' share no text that could be the prompt")
        if not chosen.strip() or not rejected.strip():
            raise RowError("chosen", "one reply is a prefix of the other: nothing is left after the shared prompt")
        prompt = [{"role": "user", "content": text}]
    if rejected_ctx and rejected_ctx != prompt:
        raise RowError("rejected", "conversation before the response differs from the chosen one")
    if chosen.strip() == rejected.strip():
        raise RowError("chosen", "identical to rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def to_unpaired(row: dict, schema: str) -> dict | list[dict]:
    """A KTO row: the prompt as messages, the completion's text, and whether it is desirable.

    A preference pair gives two rows, chosen desirable and rejected not (TRL's unpair_preference_dataset).
    """
    if schema == "preference":
        pair = to_preference(row, schema)
        return [{"prompt": list(pair["prompt"]), "completion": pair[side], "label": side == "chosen"}
                for side in ("chosen", "rejected")]
    if schema != "unpaired_preference":
        raise DataError(f"unpaired rows need 'prompt', 'completion' and 'label' columns; this dataset is "
                        f"{schema}")
    if row.get("prompt") is None:
        raise RowError("prompt", "missing")
    prompt = prompt_messages(row["prompt"], "prompt")
    if row.get("completion") is None:
        raise RowError("completion", "missing")
    completion, _ = response_of(row["completion"], "completion")
    label = row.get("label")
    if label is None:
        raise RowError("label", "missing")
    if not isinstance(label, bool):
        raise RowError("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    return {"prompt": prompt, "completion": completion, "label": label}


# --------------------------------------------------------------------------- whole datasets


def normalise(rows, source: Source, shape: str, skip_invalid: bool = False, row_ids: list[int] | None = None) -> list[dict]:
    """Validate and convert every row; raise DataError listing problems unless skip_invalid.

    shape: 'conversation', 'preference', 'unpaired' (KTO), or 'text' (conversations, or {"text"} for
    language-modelling rows).
    row_ids: each row's index in the source, when `rows` is a selection of it (errors name the source's line).
    """
    schema = detect_schema(rows.column_names)
    check_usable(schema, shape)
    convert = {"conversation": to_conversation, "text": to_text, "preference": to_preference,
               "unpaired": to_unpaired}[shape]
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
        for one in item if isinstance(item, list) else [item]:
            for c in keep_columns:
                one[c] = row[c]
            out.append(one)
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
    if shape == "unpaired" and schema == "preference":
        log.info("KTO: %s: %d preference pairs read as %d unpaired rows (chosen desirable, rejected not)",
                 source.name, len(out) // 2, len(out))
    if not out:
        why = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(5))
        raise DataError(f"{source.name}: no valid rows: read {len(rows)} row(s), all invalid ({why or 'no rows'})")
    return out


def first_turn(messages: list[dict]) -> list[dict]:
    """Leading system message(s), the first user turn, and the assistant reply to it."""
    out = []
    for m in messages:
        out.append(m)
        if m["role"] == "assistant":
            break
    return out
