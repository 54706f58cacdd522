"""Reward backends: one interface, `score(prompts, responses) -> list[float]`, plus a cache.

  HFRewardModel   a local sequence-classification model (e.g. one trained by `alignkit rm`)
  RemoteReward    an OpenAI-compatible endpoint in the format of nvidia/llama-3.1-nemotron-70b-reward
  RuleReward      a verifier function by name
  CachedReward    any of these behind a persistent SQLite cache keyed by (identity, prompt, response)

An identity names what changes a backend's scores (a local model folder by its files' names,
sizes and modification times, a Hub model by its commit, max_length, dtype; a remote model by the
fingerprint its alignkit server reports; a rule by the digest of its verifier's source file and
alignkit's version), so cached scores are never served for a different judge. Only finite numbers
are scores: a backend that returns NaN or inf stops the stage naming itself and the pair, a cached
value that is not a finite number is a miss. A verifier that raises (or returns a non-finite
number) scores 0.0 for that answer, is never cached, and is counted; when more than
`reward.max_failure_share` of a backend's calls have failed, the stage scoring with it (rl, eval,
bon, refine, serve-reward) stops with `RewardFailed`. An API key is read from an environment variable
whose name ends in API_KEY, is sent only over https or to a loopback host (unless
`allow_insecure_http`), never follows a redirect, and never appears in an error message (the
HTTP, retry and SQLite machinery is `alignkit.remote`'s, shared with the chat teacher of `refine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Protocol

import torch

from ..config import ConfigError
from ..remote import (  # noqa: F401 - RemoteError, MalformedReply and the key checks are this module's API too
    MAX_REPLY_BYTES, SECRET_PREFIXES, JSONClient, MalformedReply, NoRedirects, RemoteError, SQLiteCache, cache_file, cache_key,
    check_api_key_env, check_key_destination, is_loopback, stream_map,
)

log = logging.getLogger(__name__)


class RewardBackend(Protocol):
    identity: str

    def score(self, prompts: list[list[dict]], responses: list[str], columns: list[dict] | None = None) -> list[float]:
        """One score per (prompt, response). `columns`: the prompt's dataset row per pair, for rule
        verifiers that read them (e.g. Countdown's nums and target); model backends ignore them."""
        ...


@dataclass
class RewardConfig:
    kind: Literal["hf", "remote", "rule"] = "hf"
    model: str | None = None
    """hf: reward model directory or Hub id; remote: the served model name."""
    rule: str = "toy"
    """rule: a registered verifier (toy, countdown) or 'module:function' (needs allow_python_verifier)."""
    allow_python_verifier: bool = False
    """rule: allow reward.rule 'module:function', which imports and runs that function. Only for code you trust."""
    base_url: str | None = None
    """remote: e.g. https://integrate.api.nvidia.com/v1 or http://127.0.0.1:8000/v1"""
    api_key_env: str | None = None
    """remote: name of the environment variable holding the API key; must end in API_KEY (the key never goes in a recipe)."""
    allow_insecure_http: bool = False
    """remote: allow sending the API key over plain http to a host other than loopback."""
    concurrency: int = 8
    timeout_s: float = 60.0
    """remote: wall-clock limit of one attempt (connect, headers and body together), then a retry."""
    max_retries: int = 5
    batch_size: int = 16
    max_length: int = 2048
    tolerance: float | None = None
    """rule: numeric tolerance for verifiers that compare numbers (countdown); unset: exact. 1e-5 is the course's grader."""
    cache: str = "auto"
    """Score cache: auto (<output_dir>/scores.sqlite; serve-reward: none), none/off (no cache), or a SQLite file."""
    max_failure_share: float = 0.1
    """rule: stop when more than this share of the verifier's calls so far raised (or returned NaN/inf;
    each scores 0.0 and is counted), 0 to 1; 1: never stop. Return 0.0 for an answer you cannot read."""

    def cache_path(self, output_dir: str | Path | None) -> Path | None:
        """The SQLite file `cache` names for a run writing to output_dir (None: no cache); see cache_path."""
        return cache_path(self, output_dir)


class RewardFailed(ConfigError):
    """The scores of a reward backend cannot be used: a non-finite score, or more than
    reward.max_failure_share of a verifier's calls failed. The message names the backend and what failed."""


def build_backend(cfg: RewardConfig, cache_path: Path | None) -> RewardBackend:
    check_reward_config(cfg, build_rule=False)
    if cfg.kind == "hf":
        backend: RewardBackend = HFRewardModel(cfg.model, cfg.batch_size, cfg.max_length)
    elif cfg.kind == "remote":
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        backend = RemoteReward(cfg.base_url, cfg.model, key, cfg.concurrency, cfg.timeout_s, cfg.max_retries,
                               allow_insecure_http=cfg.allow_insecure_http, key_name=cfg.api_key_env)
    else:
        backend = RuleReward(cfg.rule, cfg.allow_python_verifier, cfg.tolerance, cfg.max_failure_share)
    if cache_path is not None:
        backend = CachedReward(backend, cache_path)
    return backend


def check_reward_config(cfg: RewardConfig, build_rule: bool = True) -> None:
    """What can be checked of a reward without loading a model or calling an API, so that a bad
    setting stops a run before its generation work, not after it (a rule verifier is cheap to build,
    which checks its name and options)."""
    if cfg.kind == "hf" and not cfg.model:
        raise ConfigError("reward.model is required for kind 'hf'")
    share = cfg.max_failure_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ConfigError(f"reward.max_failure_share: {share!r} is not allowed; expected a number, 0 to 1")
    if cfg.kind == "remote":
        if not (cfg.base_url and cfg.model):
            raise ConfigError("reward.base_url and reward.model are required for kind 'remote'")
        if cfg.api_key_env:
            check_api_key_env(cfg.api_key_env)
            if not os.environ.get(cfg.api_key_env):
                raise ConfigError(f"environment variable {cfg.api_key_env} (reward.api_key_env) is not set")
    if cfg.kind == "rule" and build_rule:
        RuleReward(cfg.rule, cfg.allow_python_verifier, cfg.tolerance)


def cache_path(cfg: RewardConfig, output_dir: str | Path | None) -> Path | None:
    """Where `reward.cache` puts scores: auto -> <output_dir>/scores.sqlite (None without an output
    directory), none/off -> no cache, anything else -> that file."""
    return cache_file(cfg.cache, output_dir, "scores.sqlite")


# --------------------------------------------------------------------------- rules


class RuleReward:
    """A verifier per (prompt, response). A verifier that raises (or returns a non-finite number)
    scores 0.0 for that response, with a warning, and is a failure: never cached (`score_checked`
    says which), counted in `failures` of `scored`, and when more than `max_failure_share` of the
    calls so far failed, `score` raises RewardFailed (a crashing verifier must not turn into a
    silent reward of 0 for everything).

    A row's columns are passed by name (all of them to a verifier with **columns, else those it
    names), except a column named like one of the two parameters that receive the prompt text and
    the response (the demo's RL rows have a `prompt` column), or like an option (tolerance)."""

    def __init__(self, name: str, allow_python: bool = False, tolerance: float | None = None,
                 max_failure_share: float = 0.1):
        import inspect

        from .verifiers import get_verifier

        self.fn = get_verifier(name, allow_python)
        params = inspect.signature(self.fn).parameters
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        named = [p for p in params.values() if p.kind not in variadic]
        self.positional = {p.name for p in named[:2]}
        named = named[2:]
        self.accepts = {p.name for p in named}
        self.required = sorted(p.name for p in named if p.default is inspect.Parameter.empty and p.name != "tolerance")
        self.options = {"tolerance": tolerance} if tolerance is not None and ("tolerance" in self.accepts or self.takes_all) else {}
        if tolerance is not None and not self.options:
            raise ConfigError(f"reward.tolerance: verifier {name!r} takes no tolerance")
        self.identity = (f"rule:{name}" + (f":tolerance={tolerance}" if self.options else "")
                         + f":src={verifier_digest(self.fn)}")
        self.max_failure_share = max_failure_share
        self.scored = self.failures = self.seen_failures = 0
        self.first_problem: str | None = None

    def check_rows(self, prompts: list[list[dict]], columns: list[dict] | None, where=lambda i: f"row {i}") -> None:
        """Refuse, before any work, prompt rows that lack a column the verifier needs (naming row and column)."""
        check = getattr(self.fn, "check_row", None)
        for i, p in enumerate(prompts):
            row = (columns or [{}] * len(prompts))[i] or {}
            missing = [c for c in self.required if c not in row]
            if missing:
                raise ConfigError(f"{where(i)}: verifier {self.identity} needs column(s) {', '.join(missing)} (the row has "
                                  f"{', '.join(sorted(row)) or 'none'})")
            problem = check(last_user_text(p), row) if check else None
            if problem:
                raise ConfigError(f"{where(i)}: verifier {self.identity} cannot score it: {problem}")

    def score(self, prompts, responses, columns=None):
        scores, failed = self.score_checked(prompts, responses, columns)
        self.account(len(scores), sum(failed))
        return scores

    def score_checked(self, prompts, responses, columns=None) -> tuple[list[float], list[bool]]:
        """(scores, which are failures) without the failure-share check (`account` does it)."""
        columns = columns or [{}] * len(prompts)
        results = [self.try_one(last_user_text(p), r, c or {})
                   for p, r, c in zip(prompts, responses, columns)]
        return [0.0 if bad else value for value, bad in results], [bad is not None for _, bad in results]

    def account(self, calls: int, failures: int) -> None:
        """Count calls and failures; raise RewardFailed when failures pass max_failure_share of the calls."""
        self.scored += calls
        self.failures += failures
        if self.failures > self.max_failure_share * self.scored:
            raise RewardFailed(
                f"verifier {self.identity} failed on {self.failures} of {self.scored} answers scored so far "
                f"(more than reward.max_failure_share {self.max_failure_share:g}); the first: "
                f"{self.first_problem}. Fix the verifier (it should return 0.0 for an answer it cannot "
                "read), or raise reward.max_failure_share to accept the failures as 0.0")

    def score_one(self, prompt: str, response: str, columns: dict | None = None) -> float:
        value, problem = self.try_one(prompt, response, columns)
        self.account(1, problem is not None)
        return 0.0 if problem else value

    def try_one(self, prompt: str, response: str, columns: dict | None = None) -> tuple[float, str | None]:
        """(score, None) or (0.0, what went wrong)."""
        skip = self.positional | set(self.options)
        kwargs = {k: v for k, v in (columns or {}).items()
                  if (self.takes_all or k in self.accepts) and k not in skip}
        try:
            value = float(self.fn(prompt, response, **kwargs, **self.options))
            if math.isfinite(value):
                return value, None
            problem = f"returned {value}"
        except Exception as e:  # noqa: BLE001 - whatever a verifier does with hostile text is counted
            problem = f"raised {type(e).__name__}: {str(e)[:200]!r}"
        self.first_problem = self.first_problem or problem
        self.seen_failures += 1
        if self.seen_failures <= 5:
            log.warning("verifier %s %s; scored 0.0 (%d failures so far)", self.identity, problem,
                        self.seen_failures)
        return 0.0, problem


def verifier_digest(fn) -> str:
    """Changes when the verifier's code does: sha256 of the source file of the function's module, and
    alignkit's code_version (so a built-in verifier's helpers are covered; helpers a user's verifier
    imports from its other files are not)."""
    import inspect
    import sys

    from .. import code_version

    target = inspect.unwrap(fn)
    try:
        data = Path(inspect.getsourcefile(target) or inspect.getfile(target)).read_bytes()
    except (TypeError, OSError):  # a C function (math:sqrt): the module's file, else its name
        module = sys.modules.get(getattr(target, "__module__", "") or "")
        file = getattr(module, "__file__", None)
        data = Path(file).read_bytes() if file and Path(file).is_file() else repr(target).encode()
    tail = f"|{getattr(target, '__qualname__', '')}|{code_version()}".encode()
    return hashlib.sha256(data + tail).hexdigest()[:12]


def check_finite(identity: str, scores: list[float], prompts: list[list[dict]]) -> list[float]:
    """The scores, if every one is a finite number; else RewardFailed naming the backend and the pair."""
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            text = last_user_text(prompts[i]) if i < len(prompts) else ""
            raise RewardFailed(f"reward backend {identity} returned a non-finite score ({s!r}) for pair "
                               f"{i + 1} of {len(scores)} (prompt {text[:60]!r}); refusing to score with it")
    return scores


def usable_score(value) -> bool:
    """A cached value to trust: a finite number (a bad row of a shipped cache is a miss, rescored)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# --------------------------------------------------------------------------- local model


class HFRewardModel:
    def __init__(self, source: str, batch_size: int = 16, max_length: int = 2048, device: str | None = None):
        from transformers import AutoModelForSequenceClassification

        from ..config import ModelConfig
        from ..models import adapter_base, is_adapter_dir, load_sequence_classifier
        from .inputs import load_reward_tokenizer

        chat, self.causal = load_reward_tokenizer(ModelConfig(name_or_path=source))
        self.tokenizer = chat.tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        if is_adapter_dir(source):  # a LoRA reward model: its base with the adapter (and head) merged in
            self.model = load_sequence_classifier(source, dtype).to(self.device).eval()
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype).to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        # Everything that changes a score except the batch (padding moves scores by ~1e-8 only).
        fingerprint = weights_fingerprint(Path(source), None if Path(source).is_dir() else hub_commit(source))
        if is_adapter_dir(source):  # the scores are base + adapter's: the base's identity too
            base = adapter_base(source)
            fingerprint += "+" + weights_fingerprint(Path(base), None if Path(base).is_dir() else hub_commit(base))
        self.identity = f"hf:{source}:{fingerprint}:max_length={max_length}:{str(dtype).removeprefix('torch.')}"

    @torch.no_grad()
    def score(self, prompts, responses, columns=None):
        from ..data.collate import pad
        from .inputs import reward_input_ids

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
        return check_finite(self.identity, scores, prompts)


def weights_fingerprint(path: Path, commit: str | None = None) -> str:
    """Changes when the model changes.

    A local folder: name, size and modification time of every file in it (weights in any format:
    *.safetensors, pytorch_model*.bin, sharded indexes, ...; config and tokenizer files too).
    A Hub id: the commit it was loaded from (see hub_commit).
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{path}: no files to fingerprint")
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    if not commit:
        raise ValueError(f"{path}: not a local folder and no Hub commit is known; cannot fingerprint the model")
    return f"hub@{commit}"


def hub_commit(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str | None:
    """The commit of a Hub model in the local cache (the snapshot folder its config.json sits in)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(path).parent.name if isinstance(path, str) else None


# --------------------------------------------------------------------------- remote API


REWARD_CONTENT = re.compile(r"\s*reward\s*:\s*(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*")


class RemoteReward(JSONClient):
    """OpenAI-compatible chat endpoint that returns a reward for the last assistant message.

    Nemotron-70B-Reward answers with the message content 'reward:<float>' (and the same value as
    the first token's logprob); both are understood, and nothing else: the content must be exactly
    that. Retries 429, 5xx, network errors and malformed replies with exponential backoff and
    jitter (`JSONClient`); the last failure raises RemoteError. A non-finite reward is an error.
    `GET {base_url}/models` is read once at start: an alignkit server reports its model's
    fingerprint there, and it becomes part of the identity (so a cache never serves the scores of
    a model since replaced).
    """

    def __init__(self, base_url: str, model: str, api_key: str = "", concurrency: int = 8, timeout_s: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 0.5, allow_insecure_http: bool = False,
                 key_name: str | None = None):
        super().__init__(base_url, api_key, timeout_s, max_retries, backoff_s, allow_insecure_http, key_name, logger=log)
        self.url = self.base_url + "/chat/completions"
        self.model, self.concurrency = model, concurrency
        self.fingerprint = self.fetch_fingerprint(model)
        self.identity = f"remote:{self.base_url}:{model}" + (f":{self.fingerprint}" if self.fingerprint else "")

    def score(self, prompts, responses, columns=None):
        scores = [0.0] * len(responses)
        for i, s in self.score_stream(prompts, responses):
            scores[i] = s
        return scores

    def score_stream(self, prompts, responses) -> Iterator[tuple[int, float]]:
        """(index, score) as each arrives. After a failure the requests already in flight still
        finish and are yielded (they are paid for), the rest are cancelled, then the error is raised."""
        yield from stream_map(lambda pair: self.score_one(*pair), list(zip(prompts, responses)), self.concurrency)

    def score_one(self, prompt: list[dict], response: str) -> float:
        body = json.dumps({"model": self.model, "messages": prompt + [{"role": "assistant", "content": response}]}).encode()
        return self.request("POST", self.url, body, self.parse)

    def parse(self, payload) -> float:
        served = payload.get("alignkit_fingerprint") if isinstance(payload, dict) else None
        if self.fingerprint and served and served != self.fingerprint:
            raise RemoteError(f"{self.url}: the model behind the server changed during the run "
                              f"(fingerprint {self.fingerprint} at start, now {served}); rerun to rescore")
        return parse_reward(payload)


def parse_reward(payload) -> float:
    """The reward of a Nemotron-style reply: content exactly 'reward:<float>', else the first token's logprob."""
    try:
        choice = payload["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        logprobs = (choice.get("logprobs") or {}).get("content") or []
    except (KeyError, IndexError, TypeError, AttributeError):
        raise MalformedReply("no choices[0] with a message") from None
    if not isinstance(content, str):
        raise MalformedReply("message content is not a string")
    m = REWARD_CONTENT.fullmatch(content)
    if m:
        value = float(m.group(1))
    elif content.strip():
        raise MalformedReply("message content is not 'reward:<number>'")
    else:
        first = logprobs[0] if isinstance(logprobs, list) and logprobs else None
        value = first.get("logprob") if isinstance(first, dict) else None
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            value = float(value)  # said as a string, still a non-finite reward: the error below names it
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReply("no reward: neither content 'reward:<number>' nor a numeric first-token logprob")
        value = float(value)
    if not math.isfinite(value):
        raise RemoteError(f"the judge returned a non-finite reward ({value}); refusing to score with it")
    return value


# --------------------------------------------------------------------------- cache


class CachedReward:
    """Scores are pure functions of (backend identity, prompt, response): each is paid for once.

    A backend that streams its scores (RemoteReward.score_stream) has each committed as it arrives;
    others after every batch. An interrupted evaluation resumes where it stopped, and a failure
    mid-batch keeps the scores already paid for. Non-finite scores are refused, never stored; a
    verifier's failures are never stored (a rerun tries them again); a stored value that is not a
    finite number is a miss. A rule's cache hits count as successful calls in its failure share.
    """

    def __init__(self, backend: RewardBackend, path: str | Path, batch: int = 64):
        self.backend, self.identity, self.batch = backend, backend.identity, batch
        self.cache = SQLiteCache(path, "scores", "score", "REAL")
        self.db = self.cache.db
        self.misses = 0

    def key(self, prompt, response, columns: dict | None = None) -> str:
        return cache_key(self.identity, prompt, response, *([columns] if columns else []))

    def store(self, rows: list[tuple[str, float]]) -> None:
        bad = [s for _, s in rows if not usable_score(s)]
        self.cache.store([(k, float(s)) for k, s in rows if usable_score(s)])
        if bad:
            raise RewardFailed(f"reward backend {self.identity} returned a non-finite score ({bad[0]}); "
                               "not cached")

    def score(self, prompts, responses, columns=None):
        # Columns change a rule's score, never a model's: only rules see (and are keyed by) them.
        columns = columns if isinstance(self.backend, RuleReward) and columns else None
        keys = [self.key(p, r, columns[i] if columns else None) for i, (p, r) in enumerate(zip(prompts, responses))]
        found = {k: float(v) for k, v in self.cache.lookup(keys).items() if usable_score(v)}
        todo = [i for i, k in enumerate(keys) if k not in found]
        self.misses += len(todo)
        stream = getattr(self.backend, "score_stream", None)
        checked = getattr(self.backend, "score_checked", None)
        failures = 0
        for start in range(0, len(todo), self.batch):
            idx = todo[start : start + self.batch]
            batch_prompts, batch_responses = [prompts[i] for i in idx], [responses[i] for i in idx]
            if stream is not None:
                for j, s in stream(batch_prompts, batch_responses):
                    self.store([(keys[idx[j]], s)])
                    found[keys[idx[j]]] = s
            else:
                extra = {"columns": [columns[i] for i in idx]} if columns else {}
                if checked is not None:
                    new, failed = checked(batch_prompts, batch_responses, **extra)
                else:
                    new = self.backend.score(batch_prompts, batch_responses, **extra)
                    failed = [False] * len(idx)
                failures += sum(failed)
                self.store([(keys[i], s) for i, s, f in zip(idx, new, failed) if not f])
                found.update({keys[i]: s for i, s in zip(idx, new)})
        account = getattr(self.backend, "account", None)
        if account is not None:
            account(len(keys), failures)
        return [found[k] for k in keys]
