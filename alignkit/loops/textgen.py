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
The endpoint client and the settings' checks are `alignkit.remote`'s, shared with refine's teacher.
Simplified: no streaming, one sample per request.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..config import ModelConfig
from ..data.prompts import PromptSource, read_jsonl
from ..files import write_atomic
from ..generation import GenerateConfig, SamplingParams, run_generate
from ..remote import (ChatEndpoint, RemoteError, SQLiteCache, cache_file, cache_key, check_writer,
                      check_writer_key, stream_map)

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
        check_writer(self, prefix, "model", "the stage's model")


def check_generator(cfg: GeneratorConfig, prefix: str) -> None:
    """validate() plus the key's presence: everything short of loading a model or calling the endpoint."""
    cfg.validate(prefix)
    check_writer_key(cfg, prefix)


def clean_text(text, max_chars: int) -> str | None:
    """Untrusted reply text made safe to keep: a string, valid UTF-8, stripped, non-empty, at most max_chars."""
    if not isinstance(text, str):
        return None
    text = text.encode("utf-8", "replace").decode("utf-8").strip()
    return text[:max_chars].rstrip() or None


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
    client = ChatEndpoint(cfg, BACKOFF_S, what=step, url_key=f"{step}.base_url", logger=log)
    one = replace(cfg.sampling, n=1)

    def complete_one(item: tuple[list[dict], int]) -> str | None:
        messages, sample = item
        return client.chat(messages, one, None if one.seed is None else one.seed + sample)[0]

    path = cache_file(cfg.cache, out, f"{step}.sqlite")
    cache = SQLiteCache(path, "replies", "reply", "TEXT") if path is not None else None
    sampling = asdict(one)
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
        for j, reply in stream_map(complete_one, [items[k] for k in order], cfg.concurrency):
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
