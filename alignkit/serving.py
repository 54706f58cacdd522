"""The hardened HTTP front shared by `alignkit serve-reward` and `alignkit serve-chat`.

Everything that reaches the port is untrusted:
  - a bearer token is required to bind beyond loopback, and checked on loopback when set;
    requests without it get 401;
  - without a token (the loopback default) only requests addressed to a loopback Host (127.0.0.1,
    localhost, [::1], any port) are answered, others get 403: a DNS-rebinding web page, whose requests
    carry its own host name, cannot drive the server;
  - only `Content-Type: application/json` bodies (415 otherwise: a web page cannot post a form to
    the loopback server), with a valid Content-Length up to 8 MiB and no Transfer-Encoding;
  - every early reply closes the connection, so an unread body is never taken for a request;
  - slow clients (slowloris): the request line and headers must arrive within `header_timeout_s` in
    total (408 then close) and the body within `socket_timeout_s` in total, besides the per-read idle
    timeout; at most 64 KiB may arrive before the headers end (431). Connections still sending
    headers (or idle between requests) are not counted against `max_connections`: at most
    `max_pending` of them wait, and a new one beyond that closes the oldest. A request takes one of
    the `max_connections` slots only once its headers are in and it passed the Host and token checks
    (503 when none is free), and gives it back when answered. With a token set, a client without it
    can therefore never hold a slot; without a token every local process is trusted as much as the
    server's user (it could also just send heavy requests);
  - the model work runs on one worker thread, and a request that waits longer than its limit gets 504.
Simplified: no TLS (put a TLS proxy in front for that), no batching across clients, no per-address
limits (on loopback every client has the same address).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import ConfigError
from .data.schema import ROLES
from .remote import is_loopback

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024
SLOW_BODY = b'{"error": {"message": "request line and headers not received in time"}}'
SLOW = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(SLOW_BODY), SLOW_BODY))
LARGE_BODY = b'{"error": {"message": "request line and headers too large"}}'
LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(LARGE_BODY), LARGE_BODY))
MAX_HEADER_BYTES = 64 * 1024
"""Bytes a connection may send before its headers end (with what the reader buffers past them)."""
MODEL_ROUTES = ("/v1/models", "/models")
CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions")


@dataclass
class ServerOptions:
    """Where a server listens and how it meets clients: the settings serve-reward and serve-chat share
    (each config adds its own model and time limit)."""

    host: str = "127.0.0.1"
    """Address to bind. Anything beyond loopback (e.g. 0.0.0.0) requires auth_token_env."""
    port: int = 8000
    served_model_name: str | None = None
    """Model name clients send and receive; unset: the server's model (its folder name or Hub id)."""
    auth_token_env: str | None = None
    """Name of the environment variable holding the bearer token clients must send (required beyond loopback)."""
    max_connections: int = 32
    """Requests served at once, counted once their headers are in and passed the Host and token
    checks; more get 503."""
    max_pending: int = 64
    """Connections still sending their request line and headers (or idle between requests); one
    more closes the oldest."""
    header_timeout_s: float = 10.0
    """Total time for a request line and headers (from opening, or from the last reply); 408 after."""
    socket_timeout_s: float = 15.0
    """Idle time after which a connection is closed; also the total time for receiving one request body."""

    def validate(self, prefix: str = "") -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{prefix}port: {self.port!r} is not allowed; expected a port number in [0, 65535]")
        for key in ("max_connections", "max_pending"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}{key}: {getattr(self, key)!r} is not allowed; expected an integer >= 1")
        for key in ("socket_timeout_s", "header_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{prefix}{key}: {getattr(self, key)!r} is not allowed; expected a number > 0")


class DeadlinePassed(Exception):
    """The total time allowed for reading part of a request (headers or body) is over."""


class HeadersTooLarge(Exception):
    """More than MAX_HEADER_BYTES arrived before the end of the headers."""


class DeadlineReader(io.RawIOBase):
    """A socket's reading side with a per-read idle timeout and, while `deadline` is set, a total one:
    a client that sends one byte just before each idle timeout still runs out of time."""

    def __init__(self, sock: socket.socket, idle_s: float):
        self.sock, self.idle_s = sock, idle_s
        self.deadline: float | None = None
        self.limit: int | None = None
        self.received = 0  # bytes since the last begin()

    def begin(self, seconds: float | None, limit: int | None = None) -> None:
        """Start a total limit of `seconds` and of `limit` bytes (None: none); the socket's own timeout
        is the idle one again, so a reply is never written under what was left of a read's deadline."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.limit, self.received = limit, 0
        self.sock.settimeout(self.idle_s)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout, bound = self.idle_s, False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DeadlinePassed
            timeout, bound = min(timeout, left), left < timeout
        self.sock.settimeout(timeout)
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            if bound:
                raise DeadlinePassed from None
            raise
        self.received += n
        if self.limit is not None and self.received > self.limit:
            raise HeadersTooLarge
        return n


class CappedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that counts connections in two places (see the module docstring):
    `pending` (at most `max_pending` connections waiting for their request line and headers; a new
    one beyond that closes the oldest) and `slots` (at most `max_connections` admitted requests; the
    handler takes one after its checks). `worker` (one thread: one model) is shut down on close."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a flood of connections must not keep new ones out

    def __init__(self, address, handler, max_connections: int = 32, worker_name: str = "worker",
                 max_pending: int = 64):
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_pending = max_pending
        self.pending: dict[socket.socket, None] = {}  # insertion order: the oldest first
        self.pending_lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=worker_name)
        super().__init__(address, handler)

    def await_request(self, sock: socket.socket) -> None:
        """`sock` waits for a request (the newest waiter); the oldest beyond max_pending are closed."""
        with self.pending_lock:
            self.pending.pop(sock, None)
            while len(self.pending) >= self.max_pending:
                oldest = next(iter(self.pending))
                del self.pending[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)  # its handler's read returns: the connection ends
                except OSError:
                    pass
            self.pending[sock] = None

    def headers_received(self, sock: socket.socket) -> bool:
        """`sock` stops waiting; False when it had been closed as the oldest waiter."""
        with self.pending_lock:
            return self.pending.pop(sock, False) is None

    def process_request(self, request, client_address):
        self.await_request(request)

        def run():
            try:
                self.process_request_thread(request, client_address)
            finally:
                self.headers_received(request)

        threading.Thread(target=run, daemon=True).start()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # a client gone (or closed as the oldest waiter)
            log.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
        else:
            log.exception("error while handling a request from %s", client_address)

    def server_close(self):
        super().server_close()
        self.worker.shutdown(wait=False, cancel_futures=True)


LOOPBACK_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(:[0-9]{1,5})?")


def is_loopback_host(value: str | None) -> bool:
    """Whether a Host header names loopback: localhost, 127.x.x.x or [::1], with or without a port."""
    match = LOOPBACK_HOST.fullmatch((value or "").strip())
    if not match:
        return False
    host = match.group(1).lower()
    if host == "localhost":
        return True
    if host.startswith("[") != host.endswith("]"):
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback and (address.version == 6) == host.startswith("[")


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ConfigError(f"binding to {host!r} (beyond loopback) requires a bearer token: "
                          "set auth_token_env to the name of an environment variable holding one")


MIN_TOKEN_CHARS = 16
"""The shortest bearer token a server accepts (a random 16-byte hex token has 32)."""


def read_token(env_name: str | None) -> str | None:
    """The bearer token from the variable `auth_token_env` names (None when unset)."""
    if not env_name:
        return None
    token = os.environ.get(env_name, "")
    if not token:
        raise ConfigError(f"environment variable {env_name} (auth_token_env) is not set")
    if len(token) < MIN_TOKEN_CHARS:
        # A recipe may name the variable, so it could name a guessable one (HOME, USER): a short
        # value is refused rather than guarded with.
        raise ConfigError(f"environment variable {env_name} (auth_token_env) holds {len(token)} characters; "
                          f"a bearer token needs at least {MIN_TOKEN_CHARS} (e.g. export {env_name}=$(python -c "
                          "'import secrets; print(secrets.token_hex(16))'))")
    return token


def json_handler(socket_timeout_s: float, token: str | None, header_timeout_s: float = 10.0,
                 name: str = "", fingerprint: str = "") -> type[BaseHTTPRequestHandler]:
    """A handler base with the checks above, for a CappedHTTPServer. Its GET answers the model list
    (`name` and its `fingerprint`); a server's handler adds do_POST using `post_body()`."""
    expected = f"Bearer {token}".encode() if token else None

    class JSONHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = socket_timeout_s  # the per-read idle timeout; the totals are DeadlineReader's
        length: int | None = None
        slot = False

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

        def setup(self):
            super().setup()
            self.rfile.close()  # the buffered reader of the socket, replaced by one with deadlines
            self.reader = DeadlineReader(self.connection, socket_timeout_s)
            self.rfile = io.BufferedReader(self.reader)

        def handle_one_request(self):
            """One request: its line and headers within header_timeout_s, a slot only once admitted."""
            self.server.await_request(self.connection)
            self.reader.begin(header_timeout_s, MAX_HEADER_BYTES)
            self.slot = False
            try:
                super().handle_one_request()
            except (DeadlinePassed, HeadersTooLarge) as e:
                self.close_connection = True
                if self.reader.received:  # silence for a connection that sent nothing (idle keep-alive)
                    try:
                        self.wfile.write(LARGE if isinstance(e, HeadersTooLarge) else SLOW)
                    except OSError:
                        pass
            finally:
                self.reader.begin(None)
                self.server.headers_received(self.connection)
                if self.slot:
                    self.slot = False
                    self.server.slots.release()

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            self.reader.begin(None)
            if not self.server.headers_received(self.connection):  # closed as the oldest waiter meanwhile
                self.close_connection = True
                return False
            return True

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

        def host_problem(self) -> str | None:
            """Without a token, why Host is not a loopback name (None: it is one, or there is a token)."""
            if expected is not None:
                return None
            hosts = self.headers.get_all("Host") or []
            if len(hosts) == 1 and is_loopback_host(hosts[0]):
                return None
            shown = "none" if not hosts else ", ".join(repr(h[:60]) for h in hosts)
            return (f"Host {shown} is not a loopback name; without a bearer token (auth_token_env) this "
                    "server answers only requests addressed to 127.0.0.1, localhost or [::1]")

        def admitted(self) -> bool:
            """The token checked and a slot taken (False: refused, reply sent)."""
            if not self.authorised():
                self.refuse(401, "missing or wrong bearer token")
                return False
            if not self.server.slots.acquire(blocking=False):
                self.refuse(503, "server busy: too many requests at once, retry shortly")
                return False
            self.slot = True
            return True

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
            """Host, framing and token of a GET checked and a slot taken (False: refused, reply sent)."""
            problem = self.host_problem()
            if problem:
                self.refuse(403, problem)
                return False
            problem = self.framing_error(body_allowed=False)
            if problem:
                self.refuse(400, f"bad request: {problem}")
                return False
            return self.admitted()

        def post_body(self, routes: tuple[str, ...] = CHAT_ROUTES) -> bytes | None:
            """The body of a POST to one of `routes` that passed every check, or None (reply sent)."""
            problem = self.host_problem()
            if problem:
                return self.refuse(403, problem)
            problem = self.framing_error(body_allowed=True)
            if problem:
                return self.refuse(400, f"bad request: {problem}")
            if self.path.rstrip("/") not in routes:
                return self.refuse(404, f"no such route; use {routes[0]}")
            if not self.admitted():
                return None
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
            self.reader.begin(socket_timeout_s)
            chunks, left = [], length
            try:
                while left > 0:
                    chunk = self.rfile.read1(min(left, 1 << 16))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    chunks.append(chunk)
                    left -= len(chunk)
            except DeadlinePassed:
                return None
            finally:
                self.reader.begin(None)
            return b"".join(chunks)

        def do_PUT(self):
            self.refuse(405, "method not allowed")

        do_DELETE = do_PATCH = do_PUT

        def do_GET(self):
            if not self.get_allowed():
                return
            if self.path.rstrip("/") in MODEL_ROUTES:
                return self.reply(200, model_list(name, fingerprint))
            self.reply(404, {"error": {"message": "no such route; use /v1/models or /v1/chat/completions"}})

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
