"""`alignkit serve-reward`: a reward backend behind the OpenAI-compatible reward API.

POST /v1/chat/completions with {"model", "messages": [..., {"role": "assistant", ...}]} returns
the score of the last assistant message as the message content 'reward:<float>' and as the
first token's logprob, the format of nvidia/llama-3.1-nemotron-70b-reward. GET /v1/models lists
the served name and `alignkit_fingerprint`, a hash of the backend's identity (weights
fingerprint included, never a path), which RemoteReward puts in its cache key.

Everything that reaches the port is untrusted:
  - a bearer token (read from the environment variable `auth_token_env`) is required to bind
    beyond loopback, and checked on loopback when set; requests without it get 401;
  - only `Content-Type: application/json` bodies (415 otherwise: a web page cannot post a form to
    the loopback server), with a valid Content-Length up to 8 MiB and no Transfer-Encoding;
  - every early reply closes the connection, so an unread body is never taken for a request;
  - sockets time out when idle, at most `max_connections` are served at once (others get 503),
    and a request whose scoring takes longer than `score_timeout_s` gets 504. Scores run one at
    a time on a single worker thread (one model, one batch).
Simplified: no request batching across clients, no TLS (put a TLS proxy in front for that).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..config import ConfigError
from .backends import CachedReward, RewardConfig, build_backend, cache_path, is_loopback

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024
BUSY_BODY = b'{"error": {"message": "server busy: too many connections, retry shortly"}}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))


@dataclass
class ServeRewardConfig:
    host: str = "127.0.0.1"
    """Address to bind. Anything beyond loopback (e.g. 0.0.0.0) requires auth_token_env."""
    port: int = 8000
    served_model_name: str | None = None
    """Model name clients send and receive; defaults to reward.model (a local folder: its name) or the rule."""
    auth_token_env: str | None = None
    """Name of the environment variable holding the bearer token clients must send (required beyond loopback)."""
    max_connections: int = 32
    """Connections served at once; more get 503."""
    socket_timeout_s: float = 15.0
    """Idle time after which a connection is closed (also the limit for sending one request)."""
    score_timeout_s: float = 120.0
    """A request whose scoring takes longer gets 504."""
    reward: RewardConfig = field(default_factory=RewardConfig)


class RewardHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` handler threads; a connection over the
    cap gets 503 and is closed at once."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = 32):
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return

        def run():
            try:
                self.process_request_thread(request, client_address)
            finally:
                self.slots.release()

        threading.Thread(target=run, daemon=True).start()

    def server_close(self):
        super().server_close()
        if getattr(self, "scorer", None) is not None:
            self.scorer.shutdown(wait=False, cancel_futures=True)


class BadRequest(ValueError):
    pass


def fingerprint_of(backend) -> str:
    """A hash of the backend's identity (which holds its weights fingerprint); reveals no path."""
    return hashlib.sha256(str(backend.identity).encode()).hexdigest()[:32]


ROLES = ("system", "user", "assistant")


def read_messages(body: bytes) -> tuple[list[dict], str]:
    """(prompt messages, response) of a chat-completions request, or BadRequest saying what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"body is not JSON: {str(e)[:100]}") from None
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadRequest("expected a JSON object with a non-empty 'messages' list")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise BadRequest("each message needs a role (system, user, assistant) and string content")
    if messages[-1]["role"] != "assistant":
        raise BadRequest("messages must end with the assistant response to score")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return prompt, messages[-1]["content"]


def make_server(backend, host: str = "127.0.0.1", port: int = 8000, name: str = "reward", token: str | None = None,
                max_connections: int = 32, socket_timeout_s: float = 15.0,
                score_timeout_s: float = 120.0) -> RewardHTTPServer:
    """A server for `backend`; call serve_forever(). Refuses to bind beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"binding to {host!r} (beyond loopback) requires a bearer token: "
                         "set auth_token_env to the name of an environment variable holding one")
    scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-scorer")  # one model, one batch at a time
    fingerprint = fingerprint_of(backend)
    expected = f"Bearer {token}".encode() if token else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = socket_timeout_s  # idle keep-alive connections and slow senders are dropped

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

        def reply(self, status: int, payload: dict, close: bool = False) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            if close:
                self.send_header("Connection", "close")  # also sets close_connection: an unread body is never parsed
            self.end_headers()
            self.wfile.write(body)

        def refuse(self, status: int, message: str) -> None:
            """An early reply: the body (if any) is left unread, so the connection closes."""
            self.reply(status, {"error": {"message": message}}, close=True)

        def authorised(self) -> bool:
            if expected is None:
                return True
            given = (self.headers.get("Authorization") or "").encode("utf-8", "replace")
            return hmac.compare_digest(given, expected)

        def framing_error(self, body_allowed: bool) -> str | None:
            """Why the request's framing is unacceptable, or None; sets self.length."""
            if self.headers.get_all("Transfer-Encoding"):
                return "Transfer-Encoding is not supported; send a Content-Length"
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) > 1:
                return "more than one Content-Length"
            if not lengths:
                self.length = None
                return "Content-Length is required" if body_allowed else None
            if not re.fullmatch(r"[0-9]{1,12}", lengths[0].strip()):
                return f"Content-Length must be a non-negative integer, got {lengths[0][:20]!r}"
            self.length = int(lengths[0])
            if not body_allowed and self.length:
                return "this request takes no body"
            return None

        def do_GET(self):
            problem = self.framing_error(body_allowed=False)
            if problem:
                return self.refuse(400, f"bad request: {problem}")
            if not self.authorised():
                return self.refuse(401, "missing or wrong bearer token")
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                entry = {"id": name, "object": "model", "owned_by": "alignkit", "alignkit_fingerprint": fingerprint}
                return self.reply(200, {"object": "list", "data": [entry]})
            self.reply(404, {"error": {"message": "no such route; use /v1/models or /v1/chat/completions"}})

        def do_POST(self):
            problem = self.framing_error(body_allowed=True)
            if problem:
                return self.refuse(400, f"bad request: {problem}")
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self.refuse(404, "no such route; use /v1/chat/completions")
            if not self.authorised():
                return self.refuse(401, "missing or wrong bearer token")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return self.refuse(415, "Content-Type must be application/json")
            if self.length > MAX_BODY:
                return self.refuse(413, f"request too large (at most {MAX_BODY} bytes)")
            try:
                body = self.read_body(self.length)
            except (TimeoutError, socket.timeout, ConnectionError):
                self.close_connection = True
                return
            if body is None:
                return self.refuse(408, "request body not received in time")
            try:
                prompt, response = read_messages(body)
            except BadRequest as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            job = scorer.submit(lambda: float(backend.score([prompt], [response])[0]))
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

        def read_body(self, length: int) -> bytes | None:
            """The body, or None if it does not arrive within socket_timeout_s in total."""
            deadline = time.monotonic() + socket_timeout_s
            chunks, left = [], length
            while left > 0:
                if time.monotonic() > deadline:
                    return None
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)

        def do_PUT(self):
            self.refuse(405, "method not allowed")

        do_DELETE = do_PATCH = do_PUT

    server = RewardHTTPServer((host, port), Handler, max_connections)
    server.scorer = scorer
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
    token = None
    if cfg.auth_token_env:
        token = os.environ.get(cfg.auth_token_env, "")
        if not token:
            raise ConfigError(f"environment variable {cfg.auth_token_env} (auth_token_env) is not set")
    backend = build_backend(cfg.reward, cache_path(cfg.reward, None))
    server = make_server(backend, cfg.host, cfg.port, served_name(cfg), token, cfg.max_connections,
                         cfg.socket_timeout_s, cfg.score_timeout_s)
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
