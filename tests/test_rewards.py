"""Reward backends: verifiers never execute model output; remote == local through serve-reward;
retries; the cache pays once."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.rewards.backends import CachedReward, HFRewardModel, RemoteError, RemoteReward, RuleReward
from alignkit.rewards.server import make_server
from alignkit.rewards.verifiers import UnsafeExpression, countdown_reward, safe_arithmetic

CD = "Using the numbers [3, 5, 7], create an equation that equals 22. Show the answer in <answer></answer> tags."


def test_safe_arithmetic():
    value, used = safe_arithmetic("(3 + 5) * 7 / 2")
    assert value == 28 and used == [3, 5, 7, 2]
    for hostile in ["__import__('os').system('echo pwned')", "open('x')", "a + 1", "2 ** 100000", "[1] * 10", "1 if 1 else 2", "(lambda: 1)()", "1; 2", "3 / 0"]:
        with pytest.raises(UnsafeExpression):
            safe_arithmetic(hostile)


def test_countdown_verifier(tmp_path, monkeypatch):
    assert countdown_reward(CD, "I think <answer>3 * 5 + 7</answer>") == 1.0
    assert countdown_reward(CD, "<answer>3 * 5 + 7 = 22</answer>") == 1.0
    assert countdown_reward(CD, "<answer>3 + 5 + 7</answer>") == 0.1  # well formed, wrong value
    assert countdown_reward(CD, "<answer>3 * 5 + 7 + 0</answer>") == 0.1  # uses a number not given
    assert countdown_reward(CD, "3 * 5 + 7") == 0.0  # no answer tags
    assert countdown_reward(CD, "<answer>3 * 5 +</answer>") == 0.0  # malformed
    # Hostile outputs are parsed and rejected; nothing runs.
    marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    for hostile in [f"<answer>__import__('os').system('touch {marker}')</answer>", "<answer>open('pwned', 'w').write('x')</answer>", "<answer>exec('1')</answer>"]:
        assert countdown_reward(CD, hostile) == 0.0
    assert not marker.exists() and not (tmp_path / "pwned").exists()


def test_rule_backend_scores_the_toy_task():
    rule = RuleReward("toy")
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}]] * 3
    assert rule.score(prompts, ["5", " 5 ", "__import__('os')"]) == [1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory, tiny_model_dir):
    """A small causal reward model trained on toy preferences (as `alignkit rm` writes it)."""
    from alignkit.config import DataConfig, ModelConfig, TrainConfig
    from alignkit.demo.world import write_preference_data
    from alignkit.train.rm import RMConfig, run_rm

    root = tmp_path_factory.mktemp("toy-rm")
    data = write_preference_data(root / "prefs", n_train=64, n_test=16)
    cfg = RMConfig(output_dir=str(root / "rm"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)),
                   data=DataConfig(dataset=str(data), split="train_prefs"),
                   train=TrainConfig(max_steps=20, batch_size=8, learning_rate=3e-3, save_steps=None, precision="fp32", logging_steps=10))
    run_rm(cfg)
    return root / "rm" / "final"


PROMPTS = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a in range(4) for b in range(3)]
RESPONSES = [str(a + b + (i % 2)) for i, (a, b) in enumerate((a, b) for a in range(4) for b in range(3))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server):
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return server


def test_remote_backend_against_serve_reward_equals_local(toy_rm):
    local = HFRewardModel(str(toy_rm), batch_size=4)
    server = start(make_server(local, "127.0.0.1", 0, "toy-rm"))
    try:
        remote = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}/v1", "toy-rm", concurrency=4, backoff_s=0.05)
        assert remote.score(PROMPTS, RESPONSES) == pytest.approx(local.score(PROMPTS, RESPONSES), abs=1e-5)
    finally:
        server.shutdown()
        server.server_close()


def test_remote_survives_server_restart_mid_run(toy_rm):
    local = HFRewardModel(str(toy_rm), batch_size=4)
    port = free_port()
    server = start(make_server(local, "127.0.0.1", port))
    remote = RemoteReward(f"http://127.0.0.1:{port}/v1", "toy-rm", concurrency=2, backoff_s=0.1, max_retries=6)
    result = {}
    runner = threading.Thread(target=lambda: result.update(scores=remote.score(PROMPTS * 20, RESPONSES * 20)))
    runner.start()
    time.sleep(0.05)
    assert runner.is_alive()  # the server goes away mid-run
    server.shutdown()
    server.server_close()  # requests now fail with connection errors and are retried
    time.sleep(0.5)
    server = start(make_server(local, "127.0.0.1", port))
    runner.join(timeout=60)
    server.shutdown()
    server.server_close()
    assert result["scores"] == pytest.approx(local.score(PROMPTS * 20, RESPONSES * 20), abs=1e-5)


class Flaky(BaseHTTPRequestHandler):
    """503 twice, then a dropped connection, then a Nemotron-style answer."""

    calls = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        Flaky.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if Flaky.calls <= 2:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif Flaky.calls == 3:
            self.connection.close()  # no response at all
        else:
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "reward:-3.25"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def test_remote_retries_503_and_dropped_connections_then_gives_up_clearly():
    Flaky.calls = 0
    server = start(ThreadingHTTPServer(("127.0.0.1", 0), Flaky))
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        assert RemoteReward(url, "m", concurrency=1, backoff_s=0.01).score(PROMPTS[:1], ["x"]) == [-3.25]
        assert Flaky.calls == 4
        Flaky.calls = -100  # keeps failing
        with pytest.raises(RemoteError, match="gave up after 3 attempts; last error: HTTP 503"):
            RemoteReward(url, "m", concurrency=1, backoff_s=0.01, max_retries=2).score(PROMPTS[:1], ["x"])
    finally:
        server.shutdown()
        server.server_close()


def test_bad_requests_get_400(toy_rm):
    import urllib.error
    import urllib.request

    server = start(make_server(RuleReward("toy"), "127.0.0.1", 0))
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", data=b'{"messages": [{"role": "user", "content": "q"}]}', method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 400
    finally:
        server.shutdown()
        server.server_close()


class Counting:
    identity = "counting"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += len(responses)
        return [float(len(r)) for r in responses]


def test_cache_pays_once_and_persists(tmp_path):
    inner = Counting()
    cached = CachedReward(inner, tmp_path / "scores.sqlite")
    first = cached.score(PROMPTS, RESPONSES)
    assert cached.score(PROMPTS, RESPONSES) == first and inner.calls == len(PROMPTS)
    again = CachedReward(inner, tmp_path / "scores.sqlite")  # a new process, same file
    assert again.score(PROMPTS + [[{"role": "user", "content": "new"}]], RESPONSES + ["x"]) == first + [1.0]
    assert inner.calls == len(PROMPTS) + 1
    other = Counting()
    other.identity = "other-backend"
    CachedReward(other, tmp_path / "scores.sqlite").score(PROMPTS, RESPONSES)
    assert other.calls == len(PROMPTS)  # keyed by backend identity too
