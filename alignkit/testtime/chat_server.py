"""`alignkit serve-chat`: a local model behind the OpenAI-compatible chat API.

POST /v1/chat/completions with {"model", "messages", "max_tokens", "temperature", "top_p", "seed"}
returns the model's reply (transformers engine, `generation.generate`) as a chat.completion;
GET /v1/models lists the served name and `alignkit_fingerprint` (a hash of the weights'
fingerprint, never a path). Use it as a `refine` teacher (teacher.kind: openai) or any client's
endpoint. The recipe's `sampling` is the default decoding; a request may change temperature,
top_p and seed, and ask for fewer tokens (max_tokens is capped at sampling.max_new_tokens).

The port is untrusted; the checks are serve-reward's (`alignkit.serving`): a bearer token beyond
loopback and a loopback Host header without one, JSON bodies with a valid Content-Length up to 8 MiB,
total deadlines for headers and body, a cap on admitted requests (clients still sending headers do not
count), one generation at a time on one worker thread, 504 past `request_timeout_s`. A prompt longer
than `max_prompt_chars` characters is refused (400) before it is tokenised or queued: tokenising a
2 MB prompt would hold the single worker for seconds. Message content is tokenised as plain text
(`data.chat`: special-token text such as "<|im_end|>" in a message is never a control token).
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
from ..serving import (BadRequest, CappedHTTPServer, ServerOptions, check_bind, json_handler, read_chat_messages,
                       read_token)

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 8
"""The default max_prompt_chars is this many characters per token of context: English text averages
about 4 characters per token, so a prompt over the cap almost surely would not fit anyway."""


@dataclass
class ServeChatConfig(ServerOptions):
    port: int = 8001
    served_model_name: str | None = None
    """Model name clients send and receive; defaults to the model's folder name or Hub id."""
    max_prompt_chars: int | None = None
    """Prompts (all message contents together) longer than this many characters get 400 before tokenising;
    unset: CHARS_PER_TOKEN (8) x the model's context length in tokens (none when the config has no length)."""
    request_timeout_s: float = 300.0
    """A request whose generation (queue included) takes longer gets 504."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512))
    """Default decoding; requests may set temperature, top_p, seed and a smaller max_tokens."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ConfigError(f"{prefix}max_prompt_chars: {self.max_prompt_chars!r} is not allowed; "
                              "expected an integer >= 1")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"{prefix}request_timeout_s: {self.request_timeout_s!r} is not allowed; "
                              "expected a number > 0")
        if self.sampling.n != 1:
            raise ConfigError(f"{prefix}sampling.n: {self.sampling.n} is not allowed; "
                              "the server returns one completion (n: 1)")


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


def check_prompt_chars(messages: list[dict], max_chars: int | None) -> None:
    """BadRequest when the message contents hold more than max_chars characters in total."""
    n = sum(len(m["content"]) for m in messages)
    if max_chars is not None and n > max_chars:
        raise BadRequest(f"the prompt has {n} characters; this server takes at most {max_chars} "
                         "(max_prompt_chars) and refuses longer ones before tokenising")


# complete(messages, params) -> (text, finish_reason, prompt_tokens, completion_tokens)
Completer = Callable[[list[dict], SamplingParams], tuple[str, str, int, int]]


def make_chat_server(complete: Completer, name: str, fingerprint: str, defaults: SamplingParams,
                     host: str = "127.0.0.1", port: int = 8001, token: str | None = None, max_connections: int = 32,
                     socket_timeout_s: float = 15.0, request_timeout_s: float = 300.0,
                     header_timeout_s: float = 10.0, max_pending: int = 64,
                     max_prompt_chars: int | None = None) -> CappedHTTPServer:
    """A chat server answering with `complete`; call serve_forever(). Refuses to bind beyond loopback
    without a token. A prompt over max_prompt_chars characters gets 400 on the request's own thread
    (never queued)."""
    check_bind(host, token)

    class Handler(json_handler(socket_timeout_s, token, header_timeout_s, name, fingerprint)):
        def do_POST(self):
            body = self.post_body()
            if body is None:
                return
            try:
                messages, params = read_chat_request(body, defaults)
                check_prompt_chars(messages, max_prompt_chars)
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

    server = CappedHTTPServer((host, port), Handler, max_connections, "chat-generator", max_pending)
    server.fingerprint = fingerprint
    return server


def model_completer(model_cfg: ModelConfig, precision: str = "auto",
                    max_prompt_chars: int | None = None) -> Completer:
    """A Completer for a local model on the transformers engine (prompts beyond its context get 400).

    Prompts over max_prompt_chars characters (unset: CHARS_PER_TOKEN x the context length) are refused
    before tokenising; the limit in use is the completer's `max_prompt_chars` attribute."""
    import torch

    from ..data.chat import tokenize_prompt
    from ..generation import generate
    from ..models import load_causal_lm, load_tokenizer

    chat = load_tokenizer(model_cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_cfg, chat, dtype=generation_dtype(precision)).to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    chars = max_prompt_chars if max_prompt_chars is not None else (CHARS_PER_TOKEN * limit if limit else None)

    def complete(messages: list[dict], params: SamplingParams) -> tuple[str, str, int, int]:
        check_prompt_chars(messages, chars)
        n_prompt = len(tokenize_prompt(chat.tokenizer, messages))
        if limit and n_prompt >= limit:
            raise BadRequest(f"the prompt has {n_prompt} tokens; the model takes at most {limit - 1}")
        if limit:
            params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, limit - n_prompt)))
        c = generate(model, chat, [messages], params)[0][0]
        return c.text, c.finish_reason, n_prompt, len(c.token_ids)

    complete.max_prompt_chars = chars
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
    complete = model_completer(cfg.model, cfg.precision, cfg.max_prompt_chars)
    return make_chat_server(complete, served_name(cfg), chat_fingerprint(cfg), cfg.sampling, cfg.host,
                            cfg.port, token, cfg.max_connections, cfg.socket_timeout_s, cfg.request_timeout_s,
                            cfg.header_timeout_s, cfg.max_pending, complete.max_prompt_chars)


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
