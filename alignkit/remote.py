"""What every client of a remote OpenAI-compatible API shares: the reward judge and the chat teacher.

  check_api_key_env      a key's variable must end in API_KEY and name no well-known credential
  check_key_destination  a key goes only over https or to a loopback host (unless allowed); which
                         host may receive which key is the trust boundary's (config.enforce_trust)
  JSONClient             JSON requests with a wall-clock deadline per attempt, retry with exponential
                         backoff and jitter, no redirects, no proxy for loopback, a 1 MiB reply cap,
                         errors that name the status (terminal-safe), never a body or key
  ChatEndpoint           an OpenAI-compatible /chat/completions endpoint as a writer of text (a refine
                         teacher, a data loop's generator): its identity for caches, the request body
                         from decoding settings, the reply's text or why it is unusable
  check_writer           the settings every text writer shares (its own model, another local model, or
                         an endpoint), checked before any model loads or request goes out
  stream_map             a function over items on a thread pool, results as they arrive
  SQLiteCache            a persistent key -> value table committed row by row, so a cut run keeps
                         what it paid for

Proxies: a loopback URL never goes through one. Other hosts use the environment's http_proxy /
https_proxy (and no_proxy) as urllib reads them: an https request goes through an https_proxy as a
CONNECT tunnel, so the proxy sees the host name and the traffic's size, never the key or the content;
a plain-http request (beyond loopback only with --allow-insecure-http) goes to an http_proxy whole,
key included.

Simplified: plain urllib (no connection pooling, no HTTP/2); one retry policy for every call; the
deadline closes the connection from a timer thread (one per attempt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator

from .config import ConfigError, must_exist, url_host
from .markdown import terminal_safe

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1 << 20
SECRET_PREFIXES = ("AWS_", "AZURE_", "GCP_", "GITHUB_", "GH_", "GITLAB_", "HF_", "HUGGING_FACE_", "HUGGINGFACE_",
                   "SSH_")


class RemoteError(RuntimeError):
    """A remote call that failed; its message is terminal-safe (a server's reason phrase is untrusted)."""

    def __init__(self, message: str = ""):
        super().__init__(terminal_safe(str(message)))


class MalformedReply(RemoteError):
    """The server answered, but not in its format: retried like a transient error (unless told not to)."""


def check_api_key_env(name: str, key: str = "reward.api_key_env") -> None:
    """An api_key_env may name only an API key (…API_KEY), never a well-known credential."""
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*API_KEY", name) or name.startswith(SECRET_PREFIXES):
        raise ConfigError(
            f"{key}: {name!r} is not allowed: name a variable that ends in API_KEY "
            f"(e.g. NVIDIA_API_KEY), not another credential (refused: {', '.join(p + '*' for p in SECRET_PREFIXES)})"
        )


def is_loopback(host: str | None) -> bool:
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key_destination(base_url: str, allow_insecure_http: bool, key: str = "reward.base_url") -> str:
    """The host a key goes to; refuses anything but https, or http to loopback, unless allowed."""
    scheme, host, _ = url_host(base_url, key)
    if scheme == "http" and not is_loopback(host) and not allow_insecure_http:
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        raise ConfigError(
            f"{key}: the API key would go unencrypted to {host} over http; use https or a loopback host, "
            f"or pass --allow-insecure-http on the command line ({section}allow_insecure_http; "
            "not from a file)"
        )
    return host


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the HTTP error it is: the key never follows it anywhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Deadline:
    """A wall-clock limit for one attempt: when it passes, the attempt's socket is shut down, so a
    server that trickles bytes (each read within the socket timeout) cannot hold a call forever."""

    def __init__(self, seconds: float):
        self.seconds, self.expired, self.sockets = seconds, False, []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                self.shut(sock)

    def watch(self, sock) -> None:
        """Shut `sock` down at the deadline (at once if it has passed)."""
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                self.shut(sock)

    @staticmethod
    def shut(sock) -> None:
        # the plain socket's shutdown, also for a TLS socket: a blocked read returns at once; a
        # socket already closed has no descriptor (-1), so this never touches another connection's
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def check(self) -> None:
        if self.expired:
            raise TimeoutError(f"no complete reply within {self.seconds:g} s")


class Watched:
    """An http.client connection whose sockets its Deadline shuts down."""

    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self._create_connection = self.create_watched_connection

    def create_watched_connection(self, *args, **kwargs):
        sock = socket.create_connection(*args, **kwargs)
        self.deadline.watch(sock)
        return sock


class WatchedHTTPConnection(Watched, http.client.HTTPConnection):
    pass


class WatchedHTTPSConnection(Watched, http.client.HTTPSConnection):
    def connect(self):
        """HTTPSConnection.connect with the TLS socket watched before its handshake (which a server
        could trickle too)."""
        http.client.HTTPConnection.connect(self)  # TCP (and a proxy's CONNECT tunnel)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host or self.host,
                                              do_handshake_on_connect=False)
        self.deadline.watch(self.sock)
        self.sock.do_handshake()


class WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(functools.partial(WatchedHTTPConnection, deadline=req.deadline), req)


class WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        connection = functools.partial(WatchedHTTPSConnection, deadline=req.deadline)
        return self.do_open(connection, req, context=self._context)


def build_opener(host: str) -> urllib.request.OpenerDirector:
    """No redirects, a deadline per attempt, and no proxy for a loopback host (a proxy would see a
    plain-http key); other hosts use the environment's proxies."""
    handlers = [NoRedirects, WatchedHTTPHandler, WatchedHTTPSHandler]
    if is_loopback(host):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


class JSONClient:
    """JSON over http(s) to `base_url` with an optional bearer key, retries and no redirects.

    Retries 408/409/425/429/5xx, network errors, attempts past the `timeout_s` deadline (connect,
    headers and body together) and (unless retry_malformed is off) malformed replies with exponential
    backoff and jitter; the last failure raises RemoteError."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, api_key: str = "", timeout_s: float = 60.0, max_retries: int = 5,
                 backoff_s: float = 0.5, allow_insecure_http: bool = False, key_name: str | None = None,
                 what: str = "reward", url_key: str = "reward.base_url", logger: logging.Logger = log):
        self.base_url = base_url.rstrip("/")
        host = check_key_destination(self.base_url, allow_insecure_http or not api_key, url_key)
        if api_key:
            name = terminal_safe(key_name or "the environment")
            logger.info("%s: the API key from %s is sent to %s", what, name, host)
        self.api_key = api_key
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.opener = build_opener(host)

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def fetch_fingerprint(self, model: str) -> str | None:
        """The served model's `alignkit_fingerprint` from /models (None from servers that have none)."""
        try:
            payload = self.request("GET", self.base_url + "/models", None, retry_malformed=False)
        except MalformedReply:
            return None  # a model list in another format: no fingerprint
        except RemoteError as e:
            if isinstance(e.__cause__, urllib.error.HTTPError):
                return None  # an endpoint without a model list
            raise
        entries = payload.get("data") if isinstance(payload, dict) else None
        entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        named = [e for e in entries if e.get("id") == model] or (entries if len(entries) == 1 else [])
        fingerprint = named[0].get("alignkit_fingerprint") if named else None
        return fingerprint if isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{8,64}", fingerprint) else None

    def request(self, method: str, url: str, body: bytes | None, parse=lambda payload: payload,
                retry_malformed: bool = True):
        """One call with retries, returning parse(JSON reply). 429/5xx, network errors and (unless
        retry_malformed is off) malformed replies are retried. Errors name the status, never the body."""
        last = None
        for attempt in range(self.max_retries + 1):
            try:
                req = urllib.request.Request(url, data=body, headers=self.headers(), method=method)
                with Deadline(self.timeout_s) as deadline:
                    req.deadline = deadline
                    try:
                        with self.opener.open(req, timeout=self.timeout_s) as res:
                            raw = res.read(MAX_REPLY_BYTES + 1)
                    except Exception:
                        deadline.check()  # whatever a socket shut by the deadline raised, say so
                        raise
                    deadline.check()  # a reply cut short by the deadline is no reply
                if len(raw) > MAX_REPLY_BYTES:
                    raise MalformedReply("reply larger than 1 MiB")
                try:
                    payload = json.loads(raw)
                except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                    raise MalformedReply("reply is not JSON") from None
                return parse(payload)
            except urllib.error.HTTPError as e:
                e.close()
                last = self.redact(f"HTTP {e.code} {terminal_safe(str(e.reason))[:100]}".strip())
                if e.code not in self.RETRY_STATUS:
                    hint = " (redirects are not followed)" if 300 <= e.code < 400 else ""
                    raise RemoteError(f"{url}: {last}{hint}") from e
            except MalformedReply as e:
                if not retry_malformed:
                    raise
                last = f"malformed reply: {e}"
            except (OSError, http.client.HTTPException) as e:  # URLError, ConnectionError, TimeoutError too
                last = self.redact(terminal_safe(f"{type(e).__name__}: {getattr(e, 'reason', e)}")[:200])
            if attempt < self.max_retries:
                delay = self.backoff_s * 2**attempt
                time.sleep(delay + random.uniform(0, delay))  # jitter spreads out retries of many workers
        raise RemoteError(f"{url}: gave up after {self.max_retries + 1} attempts; last error: {last}")

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "<key>") if self.api_key else text


# --------------------------------------------------------------------------- chat endpoints

SENT_SAMPLING = ("max_new_tokens", "temperature", "top_p", "seed", "n")
"""The decoding settings an OpenAI-compatible chat request carries (n as n requests); every other
setting of a SamplingParams must stay at its default, or the endpoint would decode otherwise than
the config says without a word."""


def check_writer(cfg, prefix: str, own: str, own_model: str) -> None:
    """The settings every text writer shares (refine's TeacherConfig, the loops' GeneratorConfig):
    kind `own` (the stage's model, `own_model` in words), 'local' (another model: `model`) or 'openai'
    (`base_url`, `model`, an optional `api_key_env`); concurrency, retries, batch size, max_chars and
    timeout in range; only the decoding settings a chat request carries. No model, no request."""
    for key, low in (("concurrency", 1), ("max_retries", 0), ("batch_size", 1), ("max_chars", 1)):
        if getattr(cfg, key) < low:
            raise ConfigError(f"{prefix}{key}: {getattr(cfg, key)!r} is not allowed; "
                              f"expected an integer >= {low}")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"{prefix}timeout_s: {cfg.timeout_s!r} is not allowed; expected a number > 0")
    if cfg.kind == own and (cfg.model or cfg.base_url):
        raise ConfigError(f"{prefix}model/base_url: kind '{own}' uses {own_model}; leave them unset")
    if cfg.kind == "local":
        if not cfg.model:
            raise ConfigError(f"{prefix}model is required for {prefix}kind 'local' (a model folder or Hub id)")
        must_exist(prefix + "model", cfg.model, "model folder")
    if cfg.kind != "openai" and (cfg.base_url or cfg.api_key_env):
        raise ConfigError(f"{prefix}base_url/api_key_env: only for {prefix}kind 'openai', not {cfg.kind!r}")
    if cfg.kind == "openai":
        if not (cfg.base_url and cfg.model):
            raise ConfigError(f"{prefix}base_url and {prefix}model are required for {prefix}kind 'openai'")
        if cfg.api_key_env:
            check_api_key_env(cfg.api_key_env, prefix + "api_key_env")
        insecure_ok = cfg.allow_insecure_http or not cfg.api_key_env
        check_key_destination(cfg.base_url, insecure_ok, prefix + "base_url")
        default = type(cfg.sampling)()
        unsent = [f.name for f in dataclasses.fields(cfg.sampling)
                  if f.name not in SENT_SAMPLING and getattr(cfg.sampling, f.name) != getattr(default, f.name)]
        if unsent:
            raise ConfigError(f"{prefix}sampling.{unsent[0]}: not sent to an OpenAI-compatible endpoint (only "
                              "max_new_tokens, temperature, top_p and seed are); leave it at its default")


def check_writer_key(cfg, prefix: str) -> None:
    """An endpoint's key variable is set (checked at the start, not at the first request)."""
    if cfg.kind == "openai" and cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"environment variable {cfg.api_key_env} ({prefix}api_key_env) is not set")


def chat_content(payload) -> tuple[str | None, str | None]:
    """(the text of a chat-completions reply, None) or (None, what is missing): a reply is untrusted."""
    try:
        message = payload["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None, "no choices[0].message in the reply"
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return None, "message content is not text"
    return content, None


class ChatEndpoint(JSONClient):
    """An OpenAI-compatible chat endpoint for `cfg` (a writer's settings, `check_writer`): the key from
    the environment, `identity` (endpoint, model and the server's weights fingerprint when it gives one:
    what a cache of its replies is keyed by), one request per reply. A reply that is not JSON, too
    large or not in the API's shape is (None, why), never an error; transient failures are retried
    (`JSONClient`), and after the last one RemoteError is raised."""

    def __init__(self, cfg, backoff_s: float, what: str, url_key: str, logger: logging.Logger = log):
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        super().__init__(cfg.base_url, key, cfg.timeout_s, cfg.max_retries, backoff_s, cfg.allow_insecure_http,
                         cfg.api_key_env, what=what, url_key=url_key, logger=logger)
        self.model, self.url = cfg.model, self.base_url + "/chat/completions"
        self.fingerprint = self.fetch_fingerprint(cfg.model)
        served = f":{self.fingerprint}" if self.fingerprint else ""
        self.identity = f"openai:{self.base_url}:{cfg.model}{served}"

    def body(self, messages: list[dict], sampling, seed: int | None) -> dict:
        """The request for one reply: max_tokens, temperature, top_p (below 1) and `seed` (when sampling)."""
        body = {"model": self.model, "messages": messages, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature}
        if sampling.top_p < 1.0:
            body["top_p"] = sampling.top_p
        if seed is not None and sampling.temperature > 0:
            body["seed"] = seed
        return body

    def chat(self, messages: list[dict], sampling, seed: int | None) -> tuple[str | None, str | None]:
        """(text, None) or (None, why it is unusable) for one request."""
        try:
            return self.request("POST", self.url, json.dumps(self.body(messages, sampling, seed)).encode(),
                                chat_content, retry_malformed=False)
        except MalformedReply as e:  # answered, but not JSON, not UTF-8 or too large: an unusable answer
            return None, str(e)


def stream_map(fn: Callable, items: list, concurrency: int) -> Iterator[tuple[int, object]]:
    """(index, fn(item)) as each finishes, on `concurrency` threads. After a failure the calls already
    in flight still finish and are yielded (they are paid for), the rest are cancelled, then the
    first error is raised."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        error = None
        for f in as_completed(futures):
            if f.cancelled():
                continue
            try:
                yield futures[f], f.result()
            except Exception as e:  # noqa: BLE001 - re-raised once the paid-for results are out
                if error is None:
                    error = e
                    for g in futures:
                        g.cancel()
        if error is not None:
            raise error


def cache_file(setting: str | None, output_dir: str | Path | None, default_name: str) -> Path | None:
    """Where a cache setting puts its SQLite file: auto (or unset) -> <output_dir>/<default_name> (None
    without an output directory), none/off -> no cache, anything else -> that file."""
    value = str(setting if setting is not None else "auto").strip()
    if value.lower() in ("none", "off", "false", "no", "null"):
        return None
    if value.lower() in ("auto", ""):
        return Path(output_dir) / default_name if output_dir is not None else None
    return Path(value)


def cache_key(*parts) -> str:
    """A stable digest of JSON-able parts (dict keys sorted)."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()


class SQLiteCache:
    """A persistent `key -> value` table (value REAL or TEXT), safe to share between threads; every
    store is committed, so what a cut run paid for is kept. Safe to share between processes too:
    write-ahead logging (readers never block the writer), a 30 s busy timeout, and a few retries of
    a store that still finds the file locked."""

    BUSY_TIMEOUT_S = 30.0
    RETRIES = 5

    def __init__(self, path: str | Path, table: str = "scores", column: str = "score", sql_type: str = "REAL"):
        if not (table.isidentifier() and column.isidentifier() and sql_type in ("REAL", "TEXT")):
            raise ValueError(f"bad cache table {table!r}/{column!r}/{sql_type!r}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.table, self.column = Path(path), table, column
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=self.BUSY_TIMEOUT_S)
        try:
            self.retry(lambda: self.db.execute("PRAGMA journal_mode=WAL").fetchall())
        except sqlite3.OperationalError:  # read-only, or a file system without WAL: the default journal
            pass
        create = f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, {column} {sql_type} NOT NULL)"
        self.retry(lambda: self.db.execute(create))
        self.lock = threading.Lock()

    def lookup(self, keys: list[str]) -> dict:
        found = {}
        with self.lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT key, {self.column} FROM {self.table} WHERE key IN ({marks})"
                found.update(self.retry(lambda: self.db.execute(sql, chunk).fetchall()))
        return found

    def store(self, rows: list[tuple[str, object]]) -> None:
        def write():
            try:
                self.db.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?)", rows)
                self.db.commit()
            except sqlite3.OperationalError:
                self.db.rollback()
                raise

        with self.lock:
            self.retry(write)

    def retry(self, action):
        """action(), tried again (after 0.1, 0.2, 0.4 ... s) while another process holds the file locked."""
        for attempt in range(self.RETRIES + 1):
            try:
                return action()
            except sqlite3.OperationalError as e:
                if attempt == self.RETRIES or not any(w in str(e) for w in ("locked", "busy")):
                    raise
                time.sleep(0.1 * 2**attempt * (1 + random.random()))
