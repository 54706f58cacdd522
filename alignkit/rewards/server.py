"""`alignkit serve-reward`: a reward backend behind the OpenAI-compatible reward API.

POST /v1/chat/completions with {"model", "messages": [..., {"role": "assistant", ...}]} returns
the score of the last assistant message as the message content 'reward:<float>' and as the
first token's logprob, the format of nvidia/llama-3.1-nemotron-70b-reward. GET /v1/models lists
the served name and `alignkit_fingerprint`, a hash of the backend's identity (weights
fingerprint included, never a path), which RemoteReward puts in its cache key.

Everything that reaches the port is untrusted; the checks are `alignkit.serving`'s (shared with
`serve-chat`): a bearer token (from the environment variable `auth_token_env`) is required beyond
loopback and a loopback Host header without one, JSON bodies only with a valid Content-Length up to
8 MiB, early replies close the connection, total deadlines for headers and body, at most
`max_connections` admitted requests at once (503 beyond; clients still sending headers are not
counted, at most `max_pending` of them wait, the oldest closed first), and a request
whose scoring takes longer than `score_timeout_s` gets 504. Scores run one at a time on a single
worker thread (one model, one batch).
Simplified: no request batching across clients, no TLS (put a TLS proxy in front for that).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..serving import (  # noqa: F401 - MAX_BODY is this module's API too
    MAX_BODY, BadRequest, CappedHTTPServer, ServerOptions, check_bind, json_handler, read_chat_messages, read_token,
)
from .backends import CachedReward, RewardConfig, build_backend, cache_path

log = logging.getLogger(__name__)


@dataclass
class ServeRewardConfig(ServerOptions):
    served_model_name: str | None = None
    """Model name clients send and receive; defaults to reward.model (a local folder: its name) or the rule."""
    score_timeout_s: float = 120.0
    """A request whose scoring takes longer gets 504."""
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if not self.score_timeout_s > 0:
            raise ConfigError(f"{prefix}score_timeout_s: {self.score_timeout_s!r} is not allowed; "
                              "expected a number > 0")


RewardHTTPServer = CappedHTTPServer


def fingerprint_of(backend) -> str:
    """A hash of the backend's identity (which holds its weights fingerprint); reveals no path."""
    return hashlib.sha256(str(backend.identity).encode()).hexdigest()[:32]


def read_messages(body: bytes) -> tuple[list[dict], str]:
    """(prompt messages, response) of a chat-completions request, or BadRequest saying what is wrong."""
    _, messages = read_chat_messages(body)
    if messages[-1]["role"] != "assistant":
        raise BadRequest("messages must end with the assistant response to score")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return prompt, messages[-1]["content"]


def make_server(backend, host: str = "127.0.0.1", port: int = 8000, name: str = "reward", token: str | None = None,
                max_connections: int = 32, socket_timeout_s: float = 15.0,
                score_timeout_s: float = 120.0, header_timeout_s: float = 10.0,
                max_pending: int = 64) -> RewardHTTPServer:
    """A server for `backend`; call serve_forever(). Refuses to bind beyond loopback without a token."""
    check_bind(host, token)
    fingerprint = fingerprint_of(backend)

    class Handler(json_handler(socket_timeout_s, token, header_timeout_s, name, fingerprint)):
        def do_POST(self):
            body = self.post_body()
            if body is None:
                return
            try:
                prompt, response = read_messages(body)
            except BadRequest as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            job = self.server.worker.submit(  # one worker thread: one model, one batch at a time
                lambda: float(backend.score([prompt], [response])[0]))
            try:
                score = job.result(timeout=score_timeout_s)
            except FutureTimeout:
                job.cancel()  # if it has not started; a running score finishes in the background
                return self.reply(504, {"error": {"message": f"scoring took longer than {score_timeout_s:g} s"}})
            except Exception as e:  # noqa: BLE001 - the client learns that scoring failed, the log says why
                log.exception("scoring failed")
                return self.reply(500, {"error": {"message": f"scoring failed ({type(e).__name__})"}})
            if not math.isfinite(score):
                return self.reply(500, {"error": {"message": f"the backend returned a non-finite score ({score})"}})
            self.reply(200, {
                "id": f"reward-{time.time_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "alignkit_fingerprint": fingerprint,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": f"reward:{score!r}"},
                    "logprobs": {"content": [{"token": "reward", "logprob": score}]},
                    "finish_reason": "stop",
                }],
            })

    server = CappedHTTPServer((host, port), Handler, max_connections, "reward-scorer", max_pending)
    server.fingerprint = fingerprint
    return server


def served_name(cfg: ServeRewardConfig) -> str:
    """The name clients see: never a local path."""
    if cfg.served_model_name:
        return cfg.served_model_name
    model = cfg.reward.model if cfg.reward.kind != "rule" else None
    if model and Path(model).exists():
        return Path(model).resolve().name
    return model or cfg.reward.rule


def build_server(cfg: ServeRewardConfig):
    """(server, backend) for a config: the token is read, the cache (only when reward.cache names a file) set up."""
    token = read_token(cfg.auth_token_env)
    backend = build_backend(cfg.reward, cache_path(cfg.reward, None))
    server = make_server(backend, cfg.host, cfg.port, served_name(cfg), token, cfg.max_connections,
                         cfg.socket_timeout_s, cfg.score_timeout_s, cfg.header_timeout_s, cfg.max_pending)
    return server, backend


def serve_reward(cfg: ServeRewardConfig) -> None:
    server, backend = build_server(cfg)
    name = served_name(cfg)
    auth = f"bearer token from ${cfg.auth_token_env} required" if cfg.auth_token_env else "none (loopback only)"
    cache = cache_path(cfg.reward, None) if isinstance(backend, CachedReward) else None
    print(f"serving {backend.identity} as '{name}' on http://{cfg.host}:{server.server_address[1]}/v1/chat/completions\n"
          f"  auth: {auth}; fingerprint {server.fingerprint}; cache: {cache or 'none'}; "
          f"at most {cfg.max_connections} connections, scoring limit {cfg.score_timeout_s:g} s")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
