"""Teachers for `alignkit refine`: whoever rewrites a student's answer.

  self    the student model itself (the stage's `model:`), transformers engine
  local   another model (folder or Hub id), transformers engine, greedy or sampled (SamplingParams)
  openai  an OpenAI-compatible `/v1/chat/completions` endpoint (base_url, model, api_key_env) under
          the remote reward backend's rules (`alignkit.remote`): concurrency, timeout, retry with
          backoff, the key only over https or to loopback, no redirects, never in a message or log

`complete(conversations) -> list[Reply]`, one reply per conversation. `CachedTeacher` puts any of
them behind a SQLite cache keyed by the teacher's identity (endpoint and model, or the weights
fingerprint), the messages and the sampling settings, committed as each reply arrives: a rerun never
pays twice and a cut run resumes where it stopped.

The refinement prompt holds untrusted text (the prompt's instruction, the student's answer, a
critique): `fill_template` fills a template's fields and its {delimiter}, a tag the default templates
put around each of them (<TAG> ... </TAG>, TAG 12 hex digits) and name as data, not instructions. The tag is a
hash of the filled-in text itself: it changes with every call's content, so a text cannot contain the
tag that will close it (it would have to hold its own hash), and it is the same on a rerun, so the
teacher cache still hits. A mitigation, not a guarantee: a model may still follow injected text.

Teacher output is untrusted. A reply that is not JSON (or not UTF-8), larger than 1 MiB, without
choices[0].message, with content that is not text, or empty is an invalid `Reply` (counted by the
caller, who keeps the original answer), never an error; text longer than `max_chars` is cut there.
Simplified: one reply per request (no n), no streaming, no tool calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..config import ConfigError, ModelConfig
from ..generation import SamplingParams, generation_dtype, model_fingerprint
from ..remote import (ChatEndpoint, SQLiteCache, cache_file, cache_key, check_writer, check_writer_key,
                      stream_map)

log = logging.getLogger(__name__)

BACKOFF_S = 0.5
"""openai: the first retry's delay (doubled each retry, plus jitter)."""


@dataclass
class TeacherConfig:
    kind: Literal["self", "local", "openai"] = "self"
    """self: the student model; local: another model (teacher.model); openai: an OpenAI-compatible chat endpoint."""
    model: str | None = None
    """local: a model folder or Hub id; openai: the served model name; self: unset (the student's model)."""
    base_url: str | None = None
    """openai: e.g. https://api.openai.com/v1 or http://127.0.0.1:8001/v1 (alignkit serve-chat)."""
    api_key_env: str | None = None
    """openai: name of the environment variable holding the API key; must end in API_KEY (never the key itself)."""
    allow_insecure_http: bool = False
    """openai: allow sending the API key over plain http to a host other than loopback."""
    system_prompt: str | None = None
    """A system message put before each refinement prompt."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512))
    """The teacher's decoding (greedy by default). openai: max_new_tokens, temperature, top_p and seed are sent."""
    concurrency: int = 8
    """openai: requests in flight at once."""
    timeout_s: float = 120.0
    """openai: wall-clock limit of one attempt (connect, headers and body together), then a retry."""
    max_retries: int = 5
    """openai: retries of 429/5xx/network errors, with exponential backoff and jitter."""
    batch_size: int = 8
    """self/local: sequences per generation batch."""
    max_chars: int = 8000
    """A teacher answer longer than this is cut here (and counted)."""
    cache: str = "auto"
    """Teacher replies: auto (<output_dir>/teacher.sqlite), none/off, or a SQLite file."""

    def validate(self, prefix: str = "") -> None:
        """What can be checked before any model is loaded or endpoint called (the key's value: `check_teacher`)."""
        if self.sampling.n != 1:
            raise ConfigError(f"{prefix}sampling.n: {self.sampling.n} is not allowed; a teacher writes one revision (n: 1)")
        check_writer(self, prefix, "self", "the student model")

    def cache_path(self, output_dir: str | Path | None) -> Path | None:
        return cache_file(self.cache, output_dir, "teacher.sqlite")


def check_teacher(cfg: TeacherConfig, prefix: str = "teacher.") -> None:
    """validate() plus the key's presence: everything short of loading a model or calling the endpoint."""
    cfg.validate(prefix)
    check_writer_key(cfg, prefix)


def fence_tag(fields: dict[str, str]) -> str:
    """A tag that occurs in none of the field values, derived from a hash of all of them."""
    text = json.dumps(fields, sort_keys=True)
    for attempt in range(1000):
        tag = hashlib.sha256(f"{attempt}:{text}".encode()).hexdigest()[:12]
        if not any(tag in value for value in fields.values()):
            return tag
    raise ValueError("no delimiter tag found that the text does not contain")  # would need ~1000 hash matches


def fill_template(template: str, **fields: str) -> str:
    """`template` with its fields filled in and {delimiter} set to `fence_tag(fields)` (module docstring)."""
    return template.format(delimiter=fence_tag(fields), **fields)


@dataclass
class Reply:
    text: str | None
    """The teacher's answer; None when the reply was unusable (then `problem` says why)."""
    problem: str | None = None
    truncated: bool = False


def clean_reply(reply: Reply, max_chars: int) -> Reply:
    """Untrusted teacher text made safe to keep: valid UTF-8 (lone surrogates replaced), stripped,
    non-empty (else invalid), at most max_chars (else cut and flagged)."""
    if reply.text is None:
        return reply
    if not isinstance(reply.text, str):
        return Reply(None, "content is not text")
    text = reply.text.encode("utf-8", "replace").decode("utf-8").strip()
    if not text:
        return Reply(None, "empty answer")
    if len(text) > max_chars:
        return Reply(text[:max_chars].rstrip(), None, truncated=True)
    return Reply(text)


class ChatTeacher(ChatEndpoint):
    """The teacher at an OpenAI-compatible chat endpoint (`alignkit.remote.ChatEndpoint`: retries, key
    rules, untrusted replies as invalid Replies)."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg, BACKOFF_S, what="teacher", url_key="teacher.base_url", logger=log)
        self.sampling, self.concurrency = cfg.sampling, cfg.concurrency
        self.calls = 0

    def complete_one(self, messages: list[dict]) -> Reply:
        self.calls += 1
        return Reply(*self.chat(messages, self.sampling, self.sampling.seed))

    def complete_stream(self, conversations: list[list[dict]]):
        yield from stream_map(self.complete_one, conversations, self.concurrency)

    def complete(self, conversations: list[list[dict]]) -> list[Reply]:
        replies: list[Reply] = [Reply(None)] * len(conversations)
        for i, reply in self.complete_stream(conversations):
            replies[i] = reply
        return replies


class LocalTeacher:
    """A local model on the transformers engine (loaded on first use, so a fully cached rerun loads nothing)."""

    def __init__(self, model: ModelConfig, sampling: SamplingParams, batch_size: int = 8, precision: str = "auto"):
        from ..models import load_tokenizer

        self.model_cfg, self.sampling, self.batch_size = model, replace(sampling, n=1), batch_size
        self.dtype = generation_dtype(precision)
        self.chat = load_tokenizer(model)  # the tokenizer only: its chat template shapes the teacher's input
        chat_template = json.dumps([self.chat.tokenizer.chat_template, self.chat.stop_ids()])
        template = hashlib.sha256(chat_template.encode())
        self.identity = (f"local:{json.dumps(model_fingerprint(model), sort_keys=True)}:{str(self.dtype)}"
                         f":template={template.hexdigest()[:12]}")
        self.loaded = None
        self.calls = 0

    def complete(self, conversations: list[list[dict]]) -> list[Reply]:
        import torch

        from ..generation import generate
        from ..models import load_causal_lm

        if self.loaded is None:
            chat = self.chat
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.loaded = (load_causal_lm(self.model_cfg, chat, dtype=self.dtype).to(device), chat)
        model, chat = self.loaded
        self.calls += len(conversations)
        results = generate(model, chat, conversations, self.sampling, self.batch_size)
        return [Reply(c[0].text) for c in results]


class CachedTeacher:
    """Replies are pure functions of (teacher identity, messages, sampling, round): each is paid for once.

    A streaming teacher (ChatTeacher) has each reply committed as it arrives, others after every
    chunk; after a failure the replies already received stay cached and the error is raised. Round
    r > 1 of a refinement with a sampling teacher (temperature > 0) draws with its own seed (salted
    with r) and is cached under its own key, so it writes a new revision each round. An endpoint's
    unusable reply (no text, or only whitespace; maybe a passing fault) is never stored, only
    remembered for the run: a rerun asks again. A local model's is stored (it would write it again)."""

    def __init__(self, teacher, path: str | Path | None, chunk: int = 64):
        self.teacher, self.identity, self.chunk = teacher, teacher.identity, chunk
        self.cache = SQLiteCache(path, "replies", "reply", "TEXT") if path is not None else None
        self.sampling = asdict(teacher.sampling)
        self.misses = 0
        self.unusable: dict[str, dict] = {}  # an endpoint's unusable replies: asked once a run, never stored
        self.store_unusable = not isinstance(teacher, ChatTeacher)

    def key(self, messages: list[dict], round_: int = 1) -> str:
        sampled = round_ > 1 and self.sampling.get("temperature", 0) > 0  # greedy: the same reply every round
        return cache_key(self.identity, messages, self.sampling, *([{"round": round_}] if sampled else []))

    def complete(self, conversations: list[list[dict]], round_: int = 1) -> list[Reply]:
        keys = [self.key(m, round_) for m in conversations]
        found = {k: json.loads(v) for k, v in (self.cache.lookup(keys) if self.cache else {}).items()}
        found = {k: v for k, v in found.items()
                 if isinstance(v, dict) and (self.store_unusable or usable_text(v.get("text")))}
        found.update({k: self.unusable[k] for k in keys if k in self.unusable and k not in found})
        todo: dict[str, list[dict]] = {}
        for k, m in zip(keys, conversations):
            if k not in found:
                todo.setdefault(k, m)  # the same conversation twice is asked once
        self.misses += len(todo)
        todo_keys = list(todo)
        stream = getattr(self.teacher, "complete_stream", None)
        base = self.teacher.sampling
        if round_ > 1 and base.seed is not None and base.temperature > 0:
            seed = zlib.crc32(json.dumps([base.seed, "round", round_]).encode())
            self.teacher.sampling = replace(base, seed=seed)
        try:
            for start in range(0, len(todo_keys), self.chunk):
                chunk = todo_keys[start : start + self.chunk]
                messages = [todo[k] for k in chunk]
                pairs = stream(messages) if stream else enumerate(self.teacher.complete(messages))
                for j, reply in pairs:
                    value = {"text": reply.text, "problem": reply.problem}
                    found[chunk[j]] = value
                    if not (usable_text(reply.text) or self.store_unusable):
                        self.unusable[chunk[j]] = value
                    elif self.cache is not None:
                        self.cache.store([(chunk[j], json.dumps(value))])
        finally:
            self.teacher.sampling = base
        return [Reply(found[k]["text"], found[k]["problem"]) for k in keys]


def usable_text(text) -> bool:
    """A reply worth caching: text with something in it (`clean_reply` makes the rest unusable)."""
    return isinstance(text, str) and bool(text.strip())


def build_teacher(cfg: TeacherConfig, student: ModelConfig | None, output_dir: str | Path | None,
                  precision: str = "auto") -> CachedTeacher:
    """The configured teacher behind its cache (cfg already checked by `check_teacher`)."""
    if cfg.kind == "openai":
        teacher = ChatTeacher(cfg)
    else:
        model = student if cfg.kind == "self" else ModelConfig(name_or_path=cfg.model)
        if model is None:
            raise ConfigError("teacher.kind 'self' needs the student model (model.name_or_path)")
        teacher = LocalTeacher(model, cfg.sampling, cfg.batch_size, precision)
    return CachedTeacher(teacher, cfg.cache_path(output_dir))
