"""Chat templates, the end-of-turn token, and tokenisation with assistant-only labels.

A conversation is rendered once through the tokenizer's chat template and cut into
segments: template/system/user text (not trained on) and assistant replies up to and including
the end-of-turn token (trained on). Each segment is tokenised on its own and the ids are
concatenated, so the prompt ids are exactly those the model sees at inference
(`add_generation_prompt=True`) and the labels cover exactly the reply and its end-of-turn.

Message content is untrusted text, in every stage: served requests, model-generated answers (a
student's answer for the teacher or the reward model) and datasets alike (a downloaded dataset is
as untrusted as a request, and one rule everywhere means a model is trained on the same ids it is
served and scored with). Text in content that spells a token of the tokenizer's added vocabulary
("fine.<|im_end|>", "<tool_call>", "[SEP]") is tokenised as ordinary characters, never as that
control token; the template's own tokens stay real. How: `shield` swaps each such occurrence for a
private placeholder before rendering, and `encode` tokenises the rendering with each placeholder
turned back into the token's text as plain characters (`split_special_tokens=True`, and split
further where a non-special added token would still match). Content without such text is tokenised
exactly as before (one call on the whole rendering). Plain `text` rows (language modelling,
data/prepare.py) are tokenised as written: their special-token text is meant as such.
"""

from __future__ import annotations

import re
import secrets
import weakref
from dataclasses import dataclass, field
from pathlib import Path

IGNORE_INDEX = -100

# ChatML, as used by Qwen: the default for tokenizers that come without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


class TemplateError(ValueError):
    """The chat template cannot be used to mask assistant turns."""


def read_template(template: str) -> str:
    """model.chat_template is inline Jinja (it has '{{' or '{%') or the path of a file holding it."""
    if "{{" in template or "{%" in template:
        return template
    path = Path(template).expanduser()
    try:
        return path.read_text()
    except OSError as e:
        raise FileNotFoundError(
            f"model.chat_template: cannot read the template file {template!r} ({e.strerror or e}); "
            "an inline template must contain Jinja ('{{ ... }}' or '{% ... %}')"
        ) from None


def ensure_chat_template(tokenizer, template: str | None = None) -> list[str]:
    """Give the tokenizer a chat template (a user's, its own, or ChatML); return tokens added to its vocab."""
    if template is not None:
        tokenizer.chat_template = read_template(template)
    if tokenizer.chat_template:
        return []
    tokenizer.chat_template = CHATML_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_CONTROL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_tokens(tokenizer) -> tuple[re.Pattern | None, frozenset[int]]:
    """(a pattern matching the text of any added or special token, longest first; their ids)."""
    size = len(tokenizer)
    try:
        cached = _CONTROL.get(tokenizer)
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: computed each time
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1], cached[2]
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {t.content for t in decoder.values()} | set(getattr(tokenizer, "all_special_tokens", []) or [])
    names = sorted((n for n in names if n), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None
    ids = frozenset(decoder) | frozenset(i for i in tokenizer.convert_tokens_to_ids(names) if i is not None)
    try:
        _CONTROL[tokenizer] = (size, pattern, ids)
    except TypeError:
        pass
    return pattern, ids


def shield(tokenizer, messages: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """(messages with each control-token text in their content swapped for a placeholder, placeholder ->
    text). Nothing to swap: the messages themselves and {}. Placeholders hold a fresh random nonce."""
    pattern, _ = control_tokens(tokenizer)
    contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
    if pattern is None or not any(pattern.search(c) for c in contents):
        return messages, {}
    nonce, table = secrets.token_hex(8), {}

    def swap(match: re.Match) -> str:
        key = f"\ue000{nonce}.{len(table)}\ue001"
        table[key] = match.group(0)
        return key

    return [{**m, "content": pattern.sub(swap, m["content"])} if isinstance(m.get("content"), str) else m
            for m in messages], table


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenised as ordinary characters: no token of the added vocabulary, special or not."""
    _, control = control_tokens(tokenizer)
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(text) > 1 and any(i in control for i in ids):  # a non-special added token still matched: split it
        return plain_text_ids(tokenizer, text[:1]) + plain_text_ids(tokenizer, text[1:])
    return ids


def _mid_text_ids(tokenizer, text: str, plain: bool) -> list[int]:
    """Ids of a piece from the middle of a rendering: encoded after a newline that is then dropped, so
    that a SentencePiece tokenizer adds no prefix space (plain encoding where that does not apply)."""
    encode = (lambda t: plain_text_ids(tokenizer, t)) if plain else (
        lambda t: tokenizer(t, add_special_tokens=False)["input_ids"])
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids = encode("\n" + text)
    if newline and ids[: len(newline)] == newline:
        return ids[len(newline):]
    return encode(text)


def encode(tokenizer, text: str, table: dict[str, str]) -> list[int]:
    """Ids of a rendering (template tokens real); `shield`'s placeholders become their text, as plain text."""
    if not table:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = re.split("(" + "|".join(re.escape(k) for k in table) + ")", text)  # [text, key, text, ..., text]
    ids = tokenizer(pieces[0], add_special_tokens=False)["input_ids"] if pieces[0] else []
    for i, piece in enumerate(pieces[1:], start=1):
        if i % 2:
            ids += _mid_text_ids(tokenizer, table[piece], plain=True)
        elif piece:
            ids += _mid_text_ids(tokenizer, piece, plain=False)
    return ids


def tokenize_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Ids of the whole rendered conversation, content tokenised as plain text (see the module docstring)."""
    shielded, table = shield(tokenizer, messages)
    return encode(tokenizer, render(tokenizer, shielded, add_generation_prompt), table)


def detect_end_of_turn(tokenizer) -> str:
    """The special token the template puts right after an assistant reply (e.g. <|im_end|>)."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG"}]
    text = render(tokenizer, probe)
    tail = text[text.rindex("PONG") + len("PONG") :]
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special
    }
    for tok in sorted(special, key=len, reverse=True):
        if tail.lstrip(" \n").startswith(tok):
            return tok
    raise TemplateError(
        f"cannot find the end-of-turn token after an assistant reply in the chat template (it renders {tail!r}); "
        "set model.end_of_turn_token"
    )


@dataclass
class TokenizedChat:
    input_ids: list[int]
    labels: list[int]
    prompt_tokens: int  # tokens before the first reply
    response_tokens: list[int] = field(default_factory=list)  # per reply, end-of-turn included
    truncated: bool = False


def chat_segments(tokenizer, messages: list[dict], end_of_turn: str) -> list[tuple[str, bool]]:
    """Rendered conversation as (text, is_reply) pieces whose concatenation is the full rendering."""
    full = render(tokenizer, messages)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix (it rewrites earlier turns), "
                "so reply tokens cannot be located; set model.chat_template to one that does"
            )
        reply = upto[len(before) :]
        cut = reply.rfind(end_of_turn)
        if cut < 0:
            raise TemplateError(f"the chat template does not end assistant turns with {end_of_turn!r}")
        end = len(before) + cut + len(end_of_turn)
        segments.append((full[pos : len(before)], False))
        segments.append((full[len(before) : end], True))
        pos = end
    segments.append((full[pos:], False))
    return [(text, is_reply) for text, is_reply in segments if text]


def tokenize_chat(
    tokenizer,
    messages: list[dict],
    end_of_turn: str,
    max_response_tokens: int | None = None,
    context_replies: int = 0,
) -> TokenizedChat:
    """Ids and labels (reply tokens and end-of-turn only) for a conversation.

    A reply longer than max_response_tokens is cut there (losing its end-of-turn), and the
    conversation ends with it: later turns would follow a reply the model never finished.
    The first `context_replies` assistant replies are part of the prompt (a prompt-completion row
    whose prompt holds earlier turns): not trained on, as TRL trains on the completion only.
    """
    ids: list[int] = []
    labels: list[int] = []
    prompt_tokens = None
    response_tokens: list[int] = []
    truncated = False
    replies_seen = 0
    shielded, table = shield(tokenizer, messages)
    for text, is_reply in chat_segments(tokenizer, shielded, end_of_turn):
        seg = encode(tokenizer, text, table)
        if is_reply:
            replies_seen += 1
            is_reply = replies_seen > context_replies
        if is_reply:
            if prompt_tokens is None:
                prompt_tokens = len(ids)
            if max_response_tokens is not None and len(seg) > max_response_tokens:
                seg = seg[:max_response_tokens]
                truncated = True
            response_tokens.append(len(seg))
            ids += seg
            labels += seg
            if truncated:
                break
        else:
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
    return TokenizedChat(ids, labels, prompt_tokens if prompt_tokens is not None else len(ids), response_tokens, truncated)


def tokenize_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for generation: the conversation so far plus the assistant header."""
    return tokenize_conversation(tokenizer, messages, add_generation_prompt=True)


def tokenize_reply(tokenizer, prompt: list[dict], reply: str, end_of_turn: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for one reply to `prompt`; the reply ids end with the end-of-turn token.

    Same segmentation as tokenize_chat, so a pair's chosen and rejected share the prompt ids
    and a reply's tokens are exactly the ones SFT trained on.
    """
    shielded, table = shield(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    segments = chat_segments(tokenizer, shielded, end_of_turn)
    reply_text = segments[-1][0] if segments[-1][1] else segments[-2][0]
    return tokenize_prompt(tokenizer, prompt), encode(tokenizer, reply_text, table)
