"""`alignkit serve-chat`: a local model behind the OpenAI-compatible chat API.

POST /v1/chat/completions with {"model", "messages", "max_tokens", "temperature", "top_p", "seed"}
returns the model's reply (transformers engine, `generation.generate`) as a chat.completion;
GET /v1/models lists the served name and `alignkit_fingerprint` (a hash of the weights'
fingerprint, never a path). Use it as a `refine` teacher (teacher.kind: openai) or any client's
endpoint. The recipe's `sampling` is the default decoding; a request may change temperature,
top_p and seed, and ask for fewer tokens (max_tokens is capped at sampling.max_new_tokens).

The port is untrusted; the checks are serve-reward's (`alignkit.serving`): a bearer token beyond
loopback, JSON bodies with a valid Content-Length up to 8 MiB, idle timeouts, a connection cap, one
generation at a time on one worker thread, 504 past `request_timeout_s`.
Simplified: one completion per request (n: 1), no streaming, no tools, no batching across clients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from ..config import ConfigError, ModelConfig
from ..generation import SamplingParams, generation_dtype, model_fingerprint
from ..serving import (MODEL_ROUTES, BadRequest, CappedHTTPServer, check_bind, json_handler, model_list,
                       read_chat_messages, read_token)

log = logging.getLogger(__name__)

@dataclass
class ServeChatConfig:
    host: str = "127.0.0.1"
    """Address to bind. Anything beyond loopback (e.g. 0.0.0.0) requires auth_token_env."""
    port: int = 8001
    served_model_name: str | None = None
    """Model name clients send and receive; defaults to the model's folder name or Hub id."""
    auth_token_env: str | None = None
    """Name of the environment variable holding the bearer token clients must send (required beyond loopback)."""
    max_connections: int = 32
    """Connections served at once; more get 503."""
    socket_timeout_s: float = 15.0
    """Idle time after which a connection is closed (also the limit for sending one request)."""
    request_timeout_s: float = 300.0
    """A request whose generation (queue included) takes longer gets 504."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512))
    """Default decoding; requests may set temperature, top_p, seed and a smaller max_tokens."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def validate(self, prefix: str = "") -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{prefix}port: {self.port!r} is not allowed; expected a port number in [0, 65535]")
        if self.max_connections < 1:
            raise ConfigError(f"{prefix}max_connections: {self.max_connections!r} is not allowed; expected an integer >= 1")
        for key in ("socket_timeout_s", "request_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{prefix}{key}: {getattr(self, key)!r} is not allowed; expected a number > 0")
        if self.sampling.n != 1:
            raise ConfigError(f"{prefix}sampling.n: {self.sampling.n} is not allowed; the server returns one completion (n: 1)")


def number(request: dict, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = request.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((value > low if low_open else value >= low) and value <= high):
        raise BadRequest(f"'{key}' must be a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def read_chat_request(body: bytes, defaults: SamplingParams) -> tuple[list[dict], SamplingParams]:
    """(messages, decoding) of a chat-completions request, or BadRequest saying what is wrong."""
    request, messages = read_chat_messages(body)
    if messages[-1]["role"] != "user":
        raise BadRequest("messages must end with a user message")
    if request.get("n", 1) != 1:
        raise BadRequest("only n: 1 is supported")
    if request.get("stream"):
        raise BadRequest("streaming is not supported")
    params = defaults
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("'max_tokens' must be a positive integer")
        params = replace(params, max_new_tokens=min(max_tokens, defaults.max_new_tokens))
    temperature, top_p = number(request, "temperature", 0, 2), number(request, "top_p", 0, 1, low_open=True)
    if temperature is not None:
        params = replace(params, temperature=temperature)
    if top_p is not None:
        params = replace(params, top_p=top_p)
    seed = request.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise BadRequest("'seed' must be a non-negative integer")
        params = replace(params, seed=seed)
    return [{"role": m["role"], "content": m["content"]} for m in messages], params


# complete(messages, params) -> (text, finish_reason, prompt_tokens, completion_tokens)
Completer = Callable[[list[dict], SamplingParams], tuple[str, str, int, int]]


def make_chat_server(complete: Completer, name: str, fingerprint: str, defaults: SamplingParams,
                     host: str = "127.0.0.1", port: int = 8001, token: str | None = None, max_connections: int = 32,
                     socket_timeout_s: float = 15.0, request_timeout_s: float = 300.0) -> CappedHTTPServer:
    """A chat server answering with `complete`; call serve_forever(). Refuses to bind beyond loopback without a token."""
    check_bind(host, token)

    class Handler(json_handler(socket_timeout_s, token)):
        def do_GET(self):
            if not self.get_allowed():
                return
            if self.path.rstrip("/") in MODEL_ROUTES:
                return self.reply(200, model_list(name, fingerprint))
            self.reply(404, {"error": {"message": "no such route; use /v1/models or /v1/chat/completions"}})

        def do_POST(self):
            body = self.post_body()
            if body is None:
                return
            try:
                messages, params = read_chat_request(body, defaults)
            except BadRequest as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            job = self.server.worker.submit(complete, messages, params)  # one model: one generation at a time
            try:
                text, finish, n_prompt, n_completion = job.result(timeout=request_timeout_s)
            except FutureTimeout:
                job.cancel()
                return self.reply(504, {"error": {"message": f"generation took longer than {request_timeout_s:g} s"}})
            except BadRequest as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            except Exception as e:  # noqa: BLE001 - the client learns that generation failed, the log says why
                log.exception("generation failed")
                return self.reply(500, {"error": {"message": f"generation failed ({type(e).__name__})"}})
            self.reply(200, {
                "id": f"chatcmpl-{time.time_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "alignkit_fingerprint": fingerprint,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion},
            })

    server = CappedHTTPServer((host, port), Handler, max_connections, "chat-generator")
    server.fingerprint = fingerprint
    return server


def model_completer(model_cfg: ModelConfig, precision: str = "auto") -> Completer:
    """A Completer for a local model on the transformers engine (prompts beyond its context get 400)."""
    import torch

    from ..data.chat import tokenize_prompt
    from ..generation import generate
    from ..models import load_causal_lm, load_tokenizer

    chat = load_tokenizer(model_cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_cfg, chat, dtype=generation_dtype(precision)).to(device)
    limit = getattr(model.config, "max_position_embeddings", None)

    def complete(messages: list[dict], params: SamplingParams) -> tuple[str, str, int, int]:
        n_prompt = len(tokenize_prompt(chat.tokenizer, messages))
        if limit and n_prompt >= limit:
            raise BadRequest(f"the prompt has {n_prompt} tokens; the model takes at most {limit - 1}")
        if limit:
            params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, limit - n_prompt)))
        c = generate(model, chat, [messages], params)[0][0]
        return c.text, c.finish_reason, n_prompt, len(c.token_ids)

    return complete


def served_name(cfg: ServeChatConfig) -> str:
    """The name clients see: never a local path."""
    if cfg.served_model_name:
        return cfg.served_model_name
    source = cfg.model.name_or_path
    return Path(source).resolve().name if Path(source).exists() else source


def chat_fingerprint(cfg: ServeChatConfig) -> str:
    """A hash of the weights' fingerprint and dtype (reveals no path)."""
    identity = json.dumps([model_fingerprint(cfg.model), str(generation_dtype(cfg.precision))], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def build_chat_server(cfg: ServeChatConfig) -> CappedHTTPServer:
    token = read_token(cfg.auth_token_env)
    check_bind(cfg.host, token)  # before the model loads
    return make_chat_server(model_completer(cfg.model, cfg.precision), served_name(cfg), chat_fingerprint(cfg),
                            cfg.sampling, cfg.host, cfg.port, token, cfg.max_connections, cfg.socket_timeout_s,
                            cfg.request_timeout_s)


def serve_chat(cfg: ServeChatConfig) -> None:
    server = build_chat_server(cfg)
    auth = f"bearer token from ${cfg.auth_token_env} required" if cfg.auth_token_env else "none (loopback only)"
    print(f"serving {served_name(cfg)} on http://{cfg.host}:{server.server_address[1]}/v1/chat/completions\n"
          f"  auth: {auth}; fingerprint {server.fingerprint}; at most {cfg.max_connections} connections, "
          f"request limit {cfg.request_timeout_s:g} s")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
