"""The hardened HTTP front shared by `alignkit serve-reward` and `alignkit serve-chat`.

Everything that reaches the port is untrusted:
  - a bearer token is required to bind beyond loopback, and checked on loopback when set;
    requests without it get 401;
  - only `Content-Type: application/json` bodies (415 otherwise: a web page cannot post a form to
    the loopback server), with a valid Content-Length up to 8 MiB and no Transfer-Encoding;
  - every early reply closes the connection, so an unread body is never taken for a request;
  - sockets time out when idle, at most `max_connections` are served at once (others get 503);
    the model work runs on one worker thread, and a request that waits longer than its limit gets 504.
Simplified: no TLS (put a TLS proxy in front for that), no batching across clients.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import ConfigError
from .data.schema import ROLES
from .remote import is_loopback

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024
BUSY_BODY = b'{"error": {"message": "server busy: too many connections, retry shortly"}}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))
MODEL_ROUTES = ("/v1/models", "/models")
CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions")


class CappedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` handler threads; a connection over the
    cap gets 503 and is closed at once. `worker` (one thread: one model) is shut down on close."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = 32, worker_name: str = "worker"):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=worker_name)
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
        self.worker.shutdown(wait=False, cancel_futures=True)


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ConfigError(f"binding to {host!r} (beyond loopback) requires a bearer token: "
                          "set auth_token_env to the name of an environment variable holding one")


def read_token(env_name: str | None) -> str | None:
    """The bearer token from the variable `auth_token_env` names (None when unset)."""
    if not env_name:
        return None
    token = os.environ.get(env_name, "")
    if not token:
        raise ConfigError(f"environment variable {env_name} (auth_token_env) is not set")
    return token


def json_handler(socket_timeout_s: float, token: str | None) -> type[BaseHTTPRequestHandler]:
    """A handler base with the checks above; a server's handler adds do_GET/do_POST using
    `get_allowed()` and `post_body()`."""
    expected = f"Bearer {token}".encode() if token else None

    class JSONHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = socket_timeout_s  # idle keep-alive connections and slow senders are dropped
        length: int | None = None

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

        def get_allowed(self) -> bool:
            """Framing and token of a GET checked (False: refused, reply sent)."""
            problem = self.framing_error(body_allowed=False)
            if problem:
                self.refuse(400, f"bad request: {problem}")
                return False
            if not self.authorised():
                self.refuse(401, "missing or wrong bearer token")
                return False
            return True

        def post_body(self, routes: tuple[str, ...] = CHAT_ROUTES) -> bytes | None:
            """The body of a POST to one of `routes` that passed every check, or None (reply sent)."""
            problem = self.framing_error(body_allowed=True)
            if problem:
                return self.refuse(400, f"bad request: {problem}")
            if self.path.rstrip("/") not in routes:
                return self.refuse(404, f"no such route; use {routes[0]}")
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
                return None
            if body is None:
                return self.refuse(408, "request body not received in time")
            return body

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

    return JSONHandler


class BadRequest(ValueError):
    """A request the server answers with 400 and this message."""


def read_chat_messages(body: bytes) -> tuple[dict, list[dict]]:
    """(request, messages) of a chat-completions body: a JSON object with a non-empty `messages` list of
    {role, content} with a known role and string content; else BadRequest saying what is wrong."""
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
    return request, messages


def model_list(name: str, fingerprint: str) -> dict:
    """The /v1/models reply: the served name and its fingerprint (never a path)."""
    entry = {"id": name, "object": "model", "owned_by": "alignkit", "alignkit_fingerprint": fingerprint}
    return {"object": "list", "data": [entry]}
