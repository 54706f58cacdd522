"""A scripted OpenAI-compatible chat endpoint on loopback for the data-loop tests (curriculum, augment).

`chat_endpoint(answer)` serves /v1/chat/completions: `answer(user_text, body)` returns the reply's
content (a str), or bytes sent raw as the whole body (for malformed replies). Every request's user
text is recorded in `.calls`; /v1/models answers 404 (no fingerprint)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.loops import textgen


class Endpoint:
    def __init__(self, answer):
        self.answer, self.calls, self.lock = answer, [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                with endpoint.lock:
                    endpoint.calls.append(text)
                reply = endpoint.answer(text, body)
                raw = reply if isinstance(reply, bytes) else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Retries of the endpoint client wait 10 ms, not seconds."""
    monkeypatch.setattr(textgen, "BACKOFF_S", 0.01)


@pytest.fixture
def endpoint():
    """Start scripted endpoints with `endpoint(answer)`; all are closed after the test."""
    made = []

    def start(answer):
        made.append(Endpoint(answer))
        return made[-1]

    yield start
    for e in made:
        e.close()
