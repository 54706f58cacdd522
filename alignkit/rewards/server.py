"""`alignkit serve-reward`: a reward backend behind the OpenAI-compatible reward API.

POST /v1/chat/completions with {"model", "messages": [..., {"role": "assistant", ...}]} returns
the score of the last assistant message as the message content 'reward:<float>' and as the
first token's logprob, the format of nvidia/llama-3.1-nemotron-70b-reward. Binds to loopback by
default; put it behind your own authenticating proxy before exposing it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .backends import RewardConfig, build_backend

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024


@dataclass
class ServeRewardConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    """Model name clients send and receive; defaults to reward.model."""
    reward: RewardConfig = field(default_factory=RewardConfig)


def make_server(backend, host: str = "127.0.0.1", port: int = 8000, name: str = "reward") -> ThreadingHTTPServer:
    lock = threading.Lock()  # one model, one batch at a time

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

        def reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                return self.reply(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            self.reply(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self.reply(404, {"error": {"message": f"no route {self.path}"}})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self.reply(413, {"error": {"message": "request too large"}})
            try:
                request = json.loads(self.rfile.read(length))
                messages = request["messages"]
                if not (isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"):
                    raise ValueError("messages must end with the assistant response to score")
                if not all(isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in messages):
                    raise ValueError("each message needs a role (system, user, assistant) and string content")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
            with lock:
                score = float(backend.score([prompt], [messages[-1]["content"]])[0])
            self.reply(
                200,
                {
                    "id": f"reward-{time.time_ns()}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"reward:{score}"},
                            "logprobs": {"content": [{"token": "reward", "logprob": score}]},
                            "finish_reason": "stop",
                        }
                    ],
                },
            )

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_reward(cfg: ServeRewardConfig) -> None:
    backend = build_backend(cfg.reward, cache_path=None)
    name = cfg.served_model_name or cfg.reward.model or cfg.reward.rule
    server = make_server(backend, cfg.host, cfg.port, name)
    print(f"serving {backend.identity} as '{name}' on http://{cfg.host}:{server.server_address[1]}/v1/chat/completions")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
