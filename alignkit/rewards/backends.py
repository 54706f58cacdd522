"""Reward backends: one interface, `score(prompts, responses) -> list[float]`, plus a cache.

  HFRewardModel   a local sequence-classification model (e.g. one trained by `alignkit rm`)
  RemoteReward    an OpenAI-compatible endpoint in the format of nvidia/llama-3.1-nemotron-70b-reward
  RuleReward      a verifier function by name
  CachedReward    any of these behind a persistent SQLite cache keyed by (identity, prompt, response)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

log = logging.getLogger(__name__)


class RewardBackend(Protocol):
    identity: str

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]: ...


@dataclass
class RewardConfig:
    kind: Literal["hf", "remote", "rule"] = "hf"
    model: str | None = None
    """hf: reward model directory or Hub id; remote: the served model name."""
    rule: str = "toy"
    """rule: a registered verifier (toy, countdown) or 'module:function'."""
    base_url: str | None = None
    """remote: e.g. https://integrate.api.nvidia.com/v1 or http://127.0.0.1:8000/v1"""
    api_key_env: str | None = None
    """remote: name of the environment variable holding the API key (the key itself never goes in a recipe)."""
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    batch_size: int = 16
    max_length: int = 2048
    cache: str | None = None
    """SQLite file for scores; defaults to <output_dir>/scores.sqlite. 'none' disables it."""


def build_backend(cfg: RewardConfig, cache_path: Path | None) -> RewardBackend:
    if cfg.kind == "hf":
        if not cfg.model:
            raise ValueError("reward.model is required for kind 'hf'")
        backend: RewardBackend = HFRewardModel(cfg.model, cfg.batch_size, cfg.max_length)
    elif cfg.kind == "remote":
        if not (cfg.base_url and cfg.model):
            raise ValueError("reward.base_url and reward.model are required for kind 'remote'")
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not key:
            raise ValueError(f"environment variable {cfg.api_key_env} (reward.api_key_env) is not set")
        backend = RemoteReward(cfg.base_url, cfg.model, key, cfg.concurrency, cfg.timeout_s, cfg.max_retries)
    else:
        backend = RuleReward(cfg.rule)
    if cache_path is not None:
        backend = CachedReward(backend, cache_path)
    return backend


# --------------------------------------------------------------------------- rules


class RuleReward:
    def __init__(self, name: str):
        from .verifiers import get_verifier

        self.fn = get_verifier(name)
        self.identity = f"rule:{name}"

    def score(self, prompts, responses):
        return [float(self.fn(last_user_text(p), r)) for p, r in zip(prompts, responses)]


def last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# --------------------------------------------------------------------------- local model


class HFRewardModel:
    def __init__(self, source: str, batch_size: int = 16, max_length: int = 2048, device: str | None = None):
        from transformers import AutoModelForSequenceClassification

        from ..config import ModelConfig
        from ..train.rm import load_reward_tokenizer

        chat, self.causal = load_reward_tokenizer(ModelConfig(name_or_path=source))
        self.tokenizer = chat.tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype).to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.identity = f"hf:{source}:{weights_fingerprint(Path(source))}"

    @torch.no_grad()
    def score(self, prompts, responses):
        from ..data.collate import pad
        from ..train.rm import reward_input_ids

        ids = [reward_input_ids(self.tokenizer, self.causal, p, r, self.max_length) for p, r in zip(prompts, responses)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = pad([ids[i] for i in idx], self.tokenizer.pad_token_id).to(self.device)
            mask = pad([[1] * len(ids[i]) for i in idx], 0).to(self.device)
            out = self.model(input_ids=batch, attention_mask=mask).logits[:, 0].float().tolist()
            for i, s in zip(idx, out):
                scores[i] = s
        return scores


def weights_fingerprint(path: Path) -> str:
    """Changes when the weights change: name, size and modification time of weight files."""
    if not path.is_dir():
        return "hub"
    parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.glob("*.safetensors"))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- remote API


class RemoteError(RuntimeError):
    pass


REWARD_IN_CONTENT = re.compile(r"reward\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


class RemoteReward:
    """OpenAI-compatible chat endpoint that returns a reward for the last assistant message.

    Nemotron-70B-Reward answers with the message content 'reward:<float>' (and the same value as
    the first token's logprob); both are understood. Retries 429, 5xx and network errors with
    exponential backoff and jitter; the last failure raises RemoteError.
    """

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, api_key: str = "", concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 0.5):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.timeout_s, self.max_retries, self.backoff_s = concurrency, timeout_s, max_retries, backoff_s
        self.identity = f"remote:{base_url.rstrip('/')}:{model}"

    def score(self, prompts, responses):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.score_one, prompts, responses))

    def score_one(self, prompt: list[dict], response: str) -> float:
        body = json.dumps({"model": self.model, "messages": prompt + [{"role": "assistant", "content": response}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.max_retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as res:
                    return parse_reward(json.loads(res.read()))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in self.RETRY_STATUS:
                    raise RemoteError(f"{self.url}: {last}: {e.read()[:300]!r}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                delay = self.backoff_s * 2**attempt
                time.sleep(delay + random.uniform(0, delay))  # jitter spreads out retries of many workers
        raise RemoteError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")


def parse_reward(payload: dict) -> float:
    choice = payload["choices"][0]
    content = (choice.get("message") or {}).get("content") or ""
    m = REWARD_IN_CONTENT.search(content)
    if m:
        return float(m.group(1))
    logprobs = (choice.get("logprobs") or {}).get("content") or []
    if logprobs:
        return float(logprobs[0]["logprob"])
    raise RemoteError(f"no reward in the response: {str(payload)[:300]}")


# --------------------------------------------------------------------------- cache


class CachedReward:
    """Scores are pure functions of (backend identity, prompt, response): each is paid for once.

    New scores are committed after every batch, so an interrupted evaluation resumes where it stopped.
    """

    def __init__(self, backend: RewardBackend, path: str | Path, batch: int = 64):
        self.backend, self.identity, self.batch = backend, backend.identity, batch
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
        self.lock = threading.Lock()
        self.misses = 0

    def key(self, prompt, response) -> str:
        return hashlib.sha256(json.dumps([self.identity, prompt, response], sort_keys=True).encode()).hexdigest()

    def score(self, prompts, responses):
        keys = [self.key(p, r) for p, r in zip(prompts, responses)]
        found = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            rows = self.db.execute(f"SELECT key, score FROM scores WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            found.update(rows.fetchall())
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.misses += len(todo)
        for start in range(0, len(todo), self.batch):
            idx = todo[start : start + self.batch]
            new = self.backend.score([prompts[i] for i in idx], [responses[i] for i in idx])
            with self.lock:
                self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", [(keys[i], s) for i, s in zip(idx, new)])
                self.db.commit()
            found.update({keys[i]: s for i, s in zip(idx, new)})
        return [found[k] for k in keys]
