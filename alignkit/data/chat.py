"""Chat templates, the end-of-turn token, and tokenisation with assistant-only labels.

A conversation is rendered once through the tokenizer's chat template and cut into
segments: template/system/user text (not trained on) and assistant replies up to and including
the end-of-turn token (trained on). Each segment is tokenised on its own and the ids are
concatenated, so the prompt ids are exactly those the model sees at inference
(`add_generation_prompt=True`) and the labels cover exactly the reply and its end-of-turn.
"""

from __future__ import annotations

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
    for text, is_reply in chat_segments(tokenizer, messages, end_of_turn):
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
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
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def tokenize_reply(tokenizer, prompt: list[dict], reply: str, end_of_turn: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for one reply to `prompt`; the reply ids end with the end-of-turn token.

    Same segmentation as tokenize_chat, so a pair's chosen and rejected share the prompt ids
    and a reply's tokens are exactly the ones SFT trained on.
    """
    segments = chat_segments(tokenizer, prompt + [{"role": "assistant", "content": reply}], end_of_turn)
    reply_text = segments[-1][0] if segments[-1][1] else segments[-2][0]
    return tokenize_prompt(tokenizer, prompt), tokenizer(reply_text, add_special_tokens=False)["input_ids"]
