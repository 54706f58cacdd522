"""serve-reward facing whatever reaches its port (#13.4, #13.5, #13.6, #13.3) and reporting its model's
fingerprint so that remote scores never go stale (#12.4). Every server runs on 127.0.0.1 with an
ephemeral port; every client loop is bounded."""

import json
import shutil
import socket
import threading
import time

import pytest

from alignkit.rewards.backends import CachedReward, HFRewardModel, RemoteError, RemoteReward, RewardConfig, RuleReward
from alignkit.rewards.server import MAX_BODY, ServeRewardConfig, build_server, make_server

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]}).encode()
PROMPTS = [[{"role": "user", "content": f"What is {a} plus 1?"}] for a in range(6)]
RESPONSES = [str(a + 1) for a in range(6)]


def start(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def running():
    servers = []

    def run(server):
        servers.append(start(server))
        return server.server_address[1]

    yield run
    for s in servers:
        s.shutdown()
        s.server_close()


def exchange(port: int, raw: bytes, wait_s: float = 3.0) -> bytes:
    """Send raw bytes and read until the server closes the connection (or wait_s passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(raw)
        out, deadline = b"", time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                return out + b"<closed>"
            out += chunk
        return out


def post(path="/v1/chat/completions", body=BODY, headers=None) -> bytes:
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    return f"POST {path} HTTP/1.1\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items() if v is not None) + b"\r\n" + body


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_bad_framing_gets_400_and_a_closed_connection(running):
    """#13.4: missing, negative or non-numeric Content-Length and any Transfer-Encoding are refused."""
    port = running(make_server(RuleReward("toy"), "127.0.0.1", 0))
    for headers in ({"Content-Length": "-1"}, {"Content-Length": "abc"}, {"Content-Length": None}, {"Content-Length": "+5"},
                    {"Transfer-Encoding": "chunked"}):
        reply = exchange(port, post(headers=headers))
        assert status(reply) == 400 and reply.endswith(b"<closed>"), headers
        assert b"Content-Length" in reply or b"Transfer-Encoding" in reply
    reply = exchange(port, post(headers={"Content-Length": "1", "Transfer-Encoding": "chunked"}))
    assert status(reply) == 400


def test_early_replies_never_desync_the_connection(running):
    """#13.6: a body left unread after an early 404/413/415/401 is never answered as a second request."""
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok\r\n\r\n"
    cases = [(None, 404, post("/nope", smuggled)),
             (None, 413, post(body=smuggled, headers={"Content-Length": str(MAX_BODY + 1)})),
             (None, 415, post(body=smuggled, headers={"Content-Type": "text/plain"})),
             ("tok", 401, post(body=smuggled))]
    for token, code, raw in cases:
        reply = exchange(running(make_server(RuleReward("toy"), "127.0.0.1", 0, **({"token": token} if token else {}))), raw)
        assert status(reply) == code and reply.count(b"HTTP/1.1 ") == 1 and reply.endswith(b"<closed>"), code


def test_malformed_requests_get_400_with_a_reason(running):
    """#13.6: malformed JSON (also deeply nested) and wrong shapes get 400 with a reason, never a dropped connection."""
    port = running(make_server(RuleReward("toy"), "127.0.0.1", 0))
    for body, reason in [(b"[" * 100_000, b"not JSON"), (b"\xff\xfe", b"not JSON"), (b"[]", b"messages"),
                         (b'{"messages": ["x"]}', b"role"), (b'{"messages": [{"role": "user", "content": "q"}]}', b"assistant")]:
        reply = exchange(port, post(body=body, headers={"Connection": "close"}))
        assert status(reply) == 400 and reason in reply
    keep_alive = exchange(port, post() + post(), wait_s=1.0)  # two good requests on one connection: both answered
    assert keep_alive.count(b"HTTP/1.1 200") == 2


def test_beyond_loopback_needs_a_token(monkeypatch):
    """#13.5: binding beyond loopback without auth_token_env is refused at start-up, saying why."""
    with pytest.raises(ValueError, match="auth_token_env"):
        build_server(ServeRewardConfig(host="0.0.0.0", port=0, reward=RewardConfig(kind="rule")))
    monkeypatch.delenv("REWARD_TOKEN", raising=False)
    with pytest.raises(ValueError, match="REWARD_TOKEN"):
        build_server(ServeRewardConfig(host="127.0.0.1", port=0, auth_token_env="REWARD_TOKEN", reward=RewardConfig(kind="rule")))


def test_bearer_token_and_json_content_type(running, monkeypatch):
    """#13.5: with auth_token_env set, requests need the token (401 otherwise, /v1/models too);
    only application/json bodies are accepted (415 otherwise: a web page cannot post text/plain)."""
    monkeypatch.setenv("REWARD_TOKEN", "s3cret-token-0123456789")
    server, _ = build_server(ServeRewardConfig(port=0, auth_token_env="REWARD_TOKEN", reward=RewardConfig(kind="rule")))
    port = running(server)
    assert status(exchange(port, post())) == 401
    assert status(exchange(port, post(headers={"Authorization": "Bearer wrong"}))) == 401
    assert status(exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")) == 401
    ok = exchange(port, post(headers={"Authorization": "Bearer s3cret-token-0123456789", "Connection": "close"}))
    assert status(ok) == 200 and b"reward:1.0" in ok
    assert status(exchange(port, post(headers={"Authorization": "Bearer s3cret-token-0123456789", "Content-Type": "text/plain"}))) == 415
    remote = RemoteReward(f"http://127.0.0.1:{port}/v1", "toy", api_key="s3cret-token-0123456789", backoff_s=0.01)
    assert remote.score(PROMPTS, RESPONSES) == [1.0] * 6 and remote.fingerprint


def test_idle_connections_time_out_and_requests_are_capped(running):
    """#13.5, #17.8: idle sockets are closed after header_timeout_s and hold no slot; at most
    max_connections admitted requests at once (others get 503 at once)."""
    backend = Slow()
    port = running(make_server(backend, "127.0.0.1", 0, max_connections=1, header_timeout_s=0.5))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        assert status(exchange(port, post(headers={"Connection": "close"}), wait_s=2.0)) == 200  # idle: no slot
        slow_request = post(body=SLOW_BODY, headers={"Connection": "close"})
        slow = threading.Thread(target=exchange, args=(port, slow_request))
        slow.start()
        deadline = time.monotonic() + 3
        while not backend.started.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = exchange(port, post(headers={"Connection": "close"}), wait_s=2.0)
        assert status(busy) == 503 and b"busy" in busy
        backend.release.set()
        slow.join(5)
        for s in idle:  # closed once header_timeout_s passes, without a reply (they sent nothing)
            assert s.recv(100) == b""
    finally:
        backend.release.set()
        for s in idle:
            s.close()
    assert status(exchange(port, post(headers={"Connection": "close"}), wait_s=2.0)) == 200


class Slow:
    identity = "slow"

    def __init__(self):
        self.release, self.started = threading.Event(), threading.Event()

    def score(self, prompts, responses):
        if responses[0] == "slow":
            self.started.set()
            self.release.wait(10)
        return [1.0]


SLOW_BODY = json.dumps({"messages": [{"role": "assistant", "content": "slow"}]}).encode()


def test_slow_scoring_gets_504_and_does_not_hold_the_connection(running):
    """#13.3: scoring runs off the request thread with a time limit; a request over it gets 504."""
    backend = Slow()
    port = running(make_server(backend, "127.0.0.1", 0, score_timeout_s=0.3))
    slow = json.dumps({"messages": [{"role": "assistant", "content": "slow"}]}).encode()
    start_time = time.monotonic()
    assert status(exchange(port, post(body=slow, headers={"Connection": "close"}))) == 504
    assert time.monotonic() - start_time < 2
    backend.release.set()
    assert status(exchange(port, post(headers={"Connection": "close"}))) == 200


def test_models_reveals_no_path_and_reports_a_fingerprint(running, tiny_model_dir, tmp_path):
    """#13.5, #12.4: /v1/models names no local path (the served name of a folder is its name) and
    carries the fingerprint of the weights."""
    server, backend = build_server(ServeRewardConfig(port=0, reward=RewardConfig(kind="hf", model=str(tiny_model_dir))))
    port = running(server)
    reply = exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    entry = json.loads(reply.split(b"\r\n\r\n", 1)[1].removesuffix(b"<closed>"))["data"][0]
    assert str(tiny_model_dir) not in reply.decode() and str(tiny_model_dir.parent) not in reply.decode()
    assert entry["id"] == tiny_model_dir.name and len(entry["alignkit_fingerprint"]) == 32
    scored = exchange(port, post(headers={"Connection": "close"}))
    assert status(scored) == 200 and str(tiny_model_dir.parent) not in scored.decode()


def test_remote_scores_do_not_go_stale_when_the_model_is_replaced(tmp_path, tiny_model_dir):
    """#12.4: retrain/replace the model behind serve-reward and restart it: the client's cache key
    changes with the server's fingerprint, so the new model's scores are used, not the cached ones."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model_dir = tmp_path / "rm"
    shutil.copytree(tiny_model_dir, model_dir)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(model_dir)  # a reward model
    local = HFRewardModel(str(model_dir))
    server = start(make_server(local, "127.0.0.1", 0, "rm"))
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/v1"
    try:
        before = CachedReward(RemoteReward(url, "rm", backoff_s=0.01), tmp_path / "scores.sqlite").score(PROMPTS, RESPONSES)
        client_before = RemoteReward(url, "rm", backoff_s=0.01)
    finally:
        server.shutdown()
        server.server_close()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)  # "retrained": the score head flips sign
    with torch.no_grad():
        model.score.weight.mul_(-1)
    model.save_pretrained(model_dir)
    replaced = HFRewardModel(str(model_dir))
    server = start(make_server(replaced, "127.0.0.1", port, "rm"))
    try:
        after = CachedReward(RemoteReward(url, "rm", backoff_s=0.01), tmp_path / "scores.sqlite").score(PROMPTS, RESPONSES)
        with pytest.raises(RemoteError, match="changed during the run"):
            client_before.score(PROMPTS[:1], RESPONSES[:1])  # a client started before the swap notices it
    finally:
        server.shutdown()
        server.server_close()
    assert after == pytest.approx(replaced.score(PROMPTS, RESPONSES), abs=1e-5)
    assert after == pytest.approx([-s for s in before], abs=1e-4) and any(abs(s) > 1e-3 for s in before)


def test_serve_reward_honours_reward_cache(running, tmp_path):
    """#12.25: serve-reward --reward.cache FILE caches scores there; by default the server keeps no cache."""
    server, backend = build_server(ServeRewardConfig(port=0, reward=RewardConfig(kind="rule", cache=str(tmp_path / "s.sqlite"))))
    port = running(server)
    assert isinstance(backend, CachedReward)
    assert status(exchange(port, post(headers={"Connection": "close"}))) == 200
    assert backend.db.execute("SELECT COUNT(*) FROM scores").fetchone() == (1,)
    plain, default = build_server(ServeRewardConfig(port=0, reward=RewardConfig(kind="rule")))
    plain.server_close()
    assert isinstance(default, RuleReward)


def test_a_guessable_token_is_refused(monkeypatch):
    """A recipe may set `host: 0.0.0.0` and `auth_token_env: HOME`: the server would then guard the
    network with '/root'. A token shorter than MIN_TOKEN_CHARS is refused at start-up, naming the
    variable and how to make a good one."""
    monkeypatch.setenv("HOME", "/root")
    with pytest.raises(ValueError, match=r"HOME \(auth_token_env\) holds 5 characters; .* at least 16"):
        build_server(ServeRewardConfig(host="0.0.0.0", port=0, auth_token_env="HOME", reward=RewardConfig(kind="rule")))
    monkeypatch.setenv("HOME", "x" * 16)
    server, _ = build_server(ServeRewardConfig(host="127.0.0.1", port=0, auth_token_env="HOME",
                                               reward=RewardConfig(kind="rule")))
    server.server_close()
