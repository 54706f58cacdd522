"""Text from a model for the data loops: a local model through `alignkit generate`, or a chat endpoint.

`GeneratorConfig` names who writes: `model` (the stage's own model, e.g. the SFT model), `local`
(another model folder or Hub id) or `openai` (an OpenAI-compatible `/v1/chat/completions`
endpoint). `complete(...)` returns one list of texts per conversation (`sampling.n` each; None for
an unusable reply):

  model/local  the conversations are written as a prompt file and run through `run_generate` into a
               subfolder of the stage, so a killed run resumes from the responses already on disk
               (generate's job.json decides whether they are the same job)
  openai       one request per conversation and sample, under `alignkit.remote`'s client rules
               (key only over https or to loopback, retries, no redirects, 1 MiB cap), each reply
               committed to a SQLite cache keyed by endpoint, model, messages, sampling and the
               sample's index in the job (its seed is sampling.seed + that index) as it arrives: a
               rerun pays for nothing twice

Replies are untrusted text: not JSON, no choices[0].message, content that is not a string, or
empty are unusable (None, counted by the caller, never cached), and text is cut at `max_chars`.
Simplified: this is a slimmer sibling of testtime/teacher.py's client (the stage packages may not
import one another; both could move below the stages); no streaming, one sample per request.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..config import ConfigError, ModelConfig, must_exist
from ..data.prompts import PromptSource, read_jsonl
from ..files import write_atomic
from ..generation import GenerateConfig, SamplingParams, run_generate
from ..remote import (JSONClient, MalformedReply, RemoteError, SQLiteCache, cache_file, cache_key, check_api_key_env,
                      check_key_destination, stream_map)

log = logging.getLogger(__name__)

BACKOFF_S = 0.5
"""openai: the first retry's delay (doubled each retry, plus jitter)."""


@dataclass
class GeneratorConfig:
    kind: Literal["model", "local", "openai"] = "model"
    """model: the stage's model; local: another model (model); openai: an OpenAI-compatible chat endpoint."""
    model: str | None = None
    """local: a model folder or Hub id; openai: the served model name; model: unset."""
    base_url: str | None = None
    """openai: e.g. https://api.openai.com/v1 or http://127.0.0.1:8001/v1 (alignkit serve-chat)."""
    api_key_env: str | None = None
    """openai: name of the environment variable holding the API key; must end in API_KEY."""
    allow_insecure_http: bool = False
    """openai: allow sending the API key over plain http to a host other than loopback."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=256))
    """Decoding. openai: max_new_tokens, temperature, top_p and seed are sent (n as n requests)."""
    concurrency: int = 8
    """openai: requests in flight at once."""
    timeout_s: float = 120.0
    """openai: wall-clock limit of one attempt, then a retry."""
    max_retries: int = 5
    """openai: retries of 429/5xx/network errors, with exponential backoff and jitter."""
    batch_size: int = 16
    """model/local: sequences per generation batch."""
    max_chars: int = 4000
    """A reply longer than this is cut here."""
    cache: str = "auto"
    """openai: replies cache, auto (<output_dir>/<step>.sqlite), none/off, or a SQLite file."""

    def validate(self, prefix: str = "") -> None:
        for key, low in (("concurrency", 1), ("max_retries", 0), ("batch_size", 1), ("max_chars", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{prefix}{key}: {getattr(self, key)!r} is not allowed; expected an integer >= {low}")
        if not self.timeout_s > 0:
            raise ConfigError(f"{prefix}timeout_s: {self.timeout_s!r} is not allowed; expected a number > 0")
        if self.kind == "model" and (self.model or self.base_url):
            raise ConfigError(f"{prefix}model/base_url: kind 'model' uses the stage's model; leave them unset")
        if self.kind == "local":
            if not self.model:
                raise ConfigError(f"{prefix}model is required for {prefix}kind 'local' (a model folder or Hub id)")
            must_exist(prefix + "model", self.model, "model folder")
        if self.kind != "openai" and (self.base_url or self.api_key_env):
            raise ConfigError(f"{prefix}base_url/api_key_env: only for {prefix}kind 'openai', not {self.kind!r}")
        if self.kind == "openai":
            if not (self.base_url and self.model):
                raise ConfigError(f"{prefix}base_url and {prefix}model are required for {prefix}kind 'openai'")
            if self.api_key_env:
                check_api_key_env(self.api_key_env, prefix + "api_key_env")
            check_key_destination(self.base_url, self.allow_insecure_http or not self.api_key_env, prefix + "base_url")
            default = SamplingParams()
            unsent = [k for k in ("top_k", "min_p", "repetition_penalty", "num_beams")
                      if getattr(self.sampling, k) != getattr(default, k)]
            if unsent:
                raise ConfigError(f"{prefix}sampling.{unsent[0]}: not sent to an OpenAI-compatible endpoint "
                                  "(only max_new_tokens, temperature, top_p and seed are); leave it at its default")


def check_generator(cfg: GeneratorConfig, prefix: str) -> None:
    """validate() plus the key's presence: everything short of loading a model or calling the endpoint."""
    cfg.validate(prefix)
    if cfg.kind == "openai" and cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"environment variable {cfg.api_key_env} ({prefix}api_key_env) is not set")


def clean_text(text, max_chars: int) -> str | None:
    """Untrusted reply text made safe to keep: a string, valid UTF-8, stripped, non-empty, at most max_chars."""
    if not isinstance(text, str):
        return None
    text = text.encode("utf-8", "replace").decode("utf-8").strip()
    return text[:max_chars].rstrip() or None


def parse_chat_reply(payload) -> str | None:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class ChatClient(JSONClient):
    """An OpenAI-compatible chat endpoint; a reply that is not what the API returns is None."""

    def __init__(self, cfg: GeneratorConfig, what: str, url_key: str):
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        super().__init__(cfg.base_url, key, cfg.timeout_s, cfg.max_retries, BACKOFF_S, cfg.allow_insecure_http,
                         cfg.api_key_env, what=what, url_key=url_key, logger=log)
        self.cfg, self.url = cfg, self.base_url + "/chat/completions"
        fingerprint = self.fetch_fingerprint(cfg.model)
        self.identity = f"openai:{self.base_url}:{cfg.model}" + (f":{fingerprint}" if fingerprint else "")

    def body(self, messages: list[dict], sample: int) -> dict:
        s = self.cfg.sampling
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": s.max_new_tokens,
                "temperature": s.temperature}
        if s.top_p < 1.0:
            body["top_p"] = s.top_p
        if s.seed is not None and s.temperature > 0:
            body["seed"] = s.seed + sample
        return body

    def complete_one(self, item: tuple[list[dict], int]) -> str | None:
        messages, sample = item
        try:
            return self.request("POST", self.url, json.dumps(self.body(messages, sample)).encode(), parse_chat_reply,
                                retry_malformed=False)
        except MalformedReply:
            return None


def complete(cfg: GeneratorConfig, stage_model: ModelConfig, conversations: list[list[dict]], out: Path,
             step: str, quiet: bool = True, precision: str = "auto", problems: Counter | None = None,
             ) -> tuple[list[list[str | None]], str]:
    """(texts per conversation, `sampling.n` each; the writer's identity). Work is kept in out/<step>/
    (a local model's responses) or out/<step>.sqlite (an endpoint's replies), so a rerun resumes.
    `problems` counts unusable replies by reason."""
    problems = problems if problems is not None else Counter()
    n = cfg.sampling.n
    if not conversations:
        return [], describe(cfg, stage_model)
    if cfg.kind == "openai":
        return complete_remote(cfg, conversations, out, step, problems), describe(cfg, stage_model)
    model = stage_model if cfg.kind == "model" else ModelConfig(name_or_path=cfg.model)
    folder = out / step
    folder.mkdir(parents=True, exist_ok=True)
    requests = folder / "requests.jsonl"
    text = "".join(json.dumps({"messages": c}) + "\n" for c in conversations)
    if not requests.is_file() or requests.read_text() != text:
        write_atomic(requests, text)
    job = GenerateConfig(output_dir=str(folder), model=model, prompts=PromptSource(dataset=str(requests), split="train"),
                         sampling=cfg.sampling, batch_size=cfg.batch_size, precision=precision, overwrite=True,
                         quiet=quiet)
    rows = read_jsonl(run_generate(job))
    texts: list[list[str | None]] = [[None] * n for _ in conversations]
    for r in rows:
        texts[r["id"]][r["sample"]] = clean_text(r.get("response"), cfg.max_chars)
    for per in texts:
        problems["empty or not text"] += sum(t is None for t in per)
    return texts, describe(cfg, stage_model)


def describe(cfg: GeneratorConfig, stage_model: ModelConfig) -> str:
    if cfg.kind == "openai":
        return f"openai:{cfg.base_url}:{cfg.model}"
    return cfg.model if cfg.kind == "local" else stage_model.name_or_path


def complete_remote(cfg: GeneratorConfig, conversations: list[list[dict]], out: Path, step: str,
                    problems: Counter) -> list[list[str | None]]:
    client = ChatClient(cfg, what=step, url_key=f"{step}.base_url")
    path = cache_file(cfg.cache, out, f"{step}.sqlite")
    cache = SQLiteCache(path, "replies", "reply", "TEXT") if path is not None else None
    sampling = asdict(replace(cfg.sampling, n=1))
    n = cfg.sampling.n  # sample k of the whole job: its own seed and key (equal requests still differ)
    sampled = cfg.sampling.temperature > 0  # greedy: one answer per distinct request, asked once
    items = [(c, i * n + j if sampled else 0) for i, c in enumerate(conversations) for j in range(n)]
    keys = [cache_key(client.identity, c, sampling, {"sample": k}) for c, k in items]
    found = dict(cache.lookup(keys)) if cache else {}
    todo = [k for k in range(len(items)) if keys[k] not in found]
    unique: dict[str, int] = {}
    for k in todo:
        unique.setdefault(keys[k], k)
    order = list(unique.values())
    try:
        for j, reply in stream_map(client.complete_one, [items[k] for k in order], cfg.concurrency):
            key = keys[order[j]]
            text = clean_text(reply, cfg.max_chars)
            if text is None:
                found[key] = None  # unusable: this run only, never stored (a rerun asks again)
            else:
                found[key] = text
                if cache is not None:
                    cache.store([(key, text)])
    except RemoteError as e:
        where = path or "no cache (cache: none; a rerun asks again)"
        raise RemoteError(f"{step}: {e}. The replies received so far are kept in {where}; run the same "
                          "command again to resume") from e
    texts = [found.get(k) for k in keys]
    problems["unusable endpoint reply"] += sum(t is None for t in texts)
    return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]
