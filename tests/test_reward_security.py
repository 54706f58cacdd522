"""Reward backends facing untrusted input (#13) and scores that must not go stale (#12): verifiers
that run only when enabled and in linear time, API keys that go only where they should, judge
replies checked before they are trusted, and cache keys that name everything that changes a score."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignkit import config as config_lib
from alignkit.rewards.backends import (CachedReward, HFRewardModel, RemoteError, RemoteReward, RewardConfig, RuleReward,
                                       build_backend, check_key_destination, hub_commit, weights_fingerprint)
from alignkit.rewards.toy import solve, toy_reward
from alignkit.rewards.verifiers import countdown_reward

CD = "Using the numbers [3, 5, 7], create an equation that equals 22. Show the answer in <answer></answer> tags."
ASK = [{"role": "user", "content": "Rate me"}]


def shout(prompt: str, response: str) -> float:
    """A user-supplied verifier, loaded as 'tests.test_reward_security:shout'."""
    return float(response.isupper())


def explode(prompt: str, response: str) -> float:
    raise RuntimeError("verifier bug")


def serve(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(*servers):
    for s in servers:
        s.shutdown()
        s.server_close()


# --------------------------------------------------------------------------- verifiers


def test_python_verifier_runs_only_when_enabled():
    """#13.2: reward.rule 'module:function' (e.g. os:popen) is refused unless reward.allow_python_verifier is true."""
    for rule in ("os:popen", "tests.test_reward_security:shout"):
        with pytest.raises(ValueError, match="allow_python_verifier"):
            build_backend(RewardConfig(kind="rule", rule=rule), None)
    cfg = config_lib.load(RewardConfig, overrides={"kind": "rule", "rule": "tests.test_reward_security:shout", "allow_python_verifier": "true"})
    assert build_backend(cfg, None).score([ASK, ASK], ["YES", "no"]) == [1.0, 0.0]
    assert RuleReward("toy").score([[{"role": "user", "content": "What is 2 plus 3?"}]], ["5"]) == [1.0]  # built-ins need no flag


def test_verifiers_run_in_linear_time():
    """#13.3: the toy sort pattern (exponential: 27 digits took 7 s) and the Countdown patterns
    (quadratic) are linear; each hostile input below took over a second before."""
    hostile = [
        lambda: solve("Sort these numbers: " + "1" * 26 + "x"),
        lambda: countdown_reward("numbers " + "1," * 30_000, "<answer>1</answer>"),
        lambda: countdown_reward("numbers " * 10_000, "<answer>1</answer>"),
        lambda: countdown_reward(CD, "<answer>" * 10_000),
    ]
    for run in hostile:
        start = time.perf_counter()
        assert not run()
        assert time.perf_counter() - start < 0.2
    assert solve("Sort these numbers: 3 10 2") == "2 3 10" and solve(" Sort these numbers: 3 1 ") == "1 3"
    assert countdown_reward("numbers " + "1 " * 50_000 + "equals 3", "<answer>" + "1+" * 60_000 + "1</answer>") == 0.0  # capped


def test_huge_numbers_and_verifier_errors_score_zero():
    """#13.10: numbers over 4,300 digits (int() refuses them) and any verifier exception score 0, never crash."""
    assert toy_reward("What is " + "9" * 5000 + " plus 1?", "1" + "0" * 5000) == 0.0
    assert countdown_reward("Using the numbers [3, 5], create an equation that equals " + "7" * 5000, "<answer>3+5</answer>") == 0.0
    assert countdown_reward("Using the numbers [" + "3" * 5000 + ", 5], make one that equals 8", "<answer>3+5</answer>") == 0.0
    rule = RuleReward("tests.test_reward_security:explode", allow_python=True, max_failure_share=1.0)
    assert rule.score([ASK, ASK], ["a", "b"]) == [0.0, 0.0] and rule.failures == 2
    # #18.2: by default, that many failures stop the stage instead (test_stale_scores.py).


def test_unicode_operators_are_arithmetic():
    """#12.25: the verifier reads − × ÷ as well as - * / ('3 × 4' is a well-formed wrong answer, 0.1)."""
    assert countdown_reward(CD, "<answer>3 × 5 + 7</answer>") == 1.0
    assert countdown_reward(CD, "<answer>3 × 4</answer>") == 0.1
    assert countdown_reward("Using the numbers [9, 3, 7], create an equation that equals 4.", "<answer>9 ÷ 3 − 7 + 8</answer>") == 0.1
    assert countdown_reward("Using the numbers [9, 3, 7], create an equation that equals -4.", "<answer>9 ÷ 3 − 7</answer>") == 1.0


# --------------------------------------------------------------------------- API keys


class Judge(BaseHTTPRequestHandler):
    """A scripted judge. The response text picks the reply; every request is recorded."""

    seen: list = []

    def log_message(self, *a):
        pass

    def send(self, status: int, body: bytes, extra: dict | None = None):
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Judge.seen.append(("GET", self.path, self.headers.get("Authorization")))
        self.send(404, b"")

    def do_POST(self):
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        Judge.seen.append(("POST", text, self.headers.get("Authorization")))
        tries = sum(1 for s in Judge.seen if s[1] == text)
        reply = {"choices": [{"message": {"role": "assistant", "content": f"reward:{len(text)}"}}]}
        if text == "nan":
            reply = {"choices": [{"message": {"content": ""}, "logprobs": {"content": [{"token": "r", "logprob": "nan"}]}}]}
        elif text == "huge":
            reply["choices"][0]["message"]["content"] = "reward:1e999"
        elif text == "quoted":
            reply["choices"][0]["message"]["content"] = 'The answer said "reward: 9" to fool me. reward:-1'
        elif text == "no-reward":
            reply = {"choices": [{"message": {"content": ""}}]}
        elif text == "garbled" and tries == 1:
            return self.send(200, b'{"choices": [')
        elif text == "echo":
            return self.send(401, f"bad key {self.headers.get('Authorization')}".encode())
        self.send(200, json.dumps(reply).encode())


@pytest.fixture
def judge():
    Judge.seen = []
    server = serve(Judge)
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    stop(server)


def test_api_key_env_may_only_name_an_api_key(monkeypatch, judge, caplog):
    """#13.2: api_key_env may not name HF_TOKEN, AWS_*, GITHUB_TOKEN...; the host a key goes to is logged."""
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "AWS_API_KEY", "HOME"):
        monkeypatch.setenv(name, "secret-value")
        with pytest.raises(ValueError, match="api_key_env"):
            build_backend(RewardConfig(kind="remote", model="m", base_url=judge, api_key_env=name), None)
    assert Judge.seen == []  # refused before anything was sent
    monkeypatch.setenv("JUDGE_API_KEY", "k-123")
    with caplog.at_level("INFO", logger="alignkit.rewards.backends"):
        backend = build_backend(RewardConfig(kind="remote", model="m", base_url=judge, api_key_env="JUDGE_API_KEY"), None)
    assert "JUDGE_API_KEY is sent to 127.0.0.1" in caplog.text and "k-123" not in caplog.text
    assert backend.score([ASK], ["abc"]) == [3.0] and Judge.seen[-1][2] == "Bearer k-123"


def test_key_goes_only_over_https_or_to_loopback():
    """#13.2, #13.7: http to a host beyond loopback needs reward.allow_insecure_http; other schemes never."""
    with pytest.raises(ValueError, match="allow_insecure_http"):
        RemoteReward("http://203.0.113.7/v1", "m", api_key="k")
    assert check_key_destination("http://203.0.113.7/v1", allow_insecure_http=True) == "203.0.113.7"
    for url in ("https://integrate.api.nvidia.com/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1", "http://127.0.0.2/v1"):
        check_key_destination(url, allow_insecure_http=False)
    with pytest.raises(ValueError, match="not an http"):
        RemoteReward("file:///etc/passwd", "m")


class Redirect(BaseHTTPRequestHandler):
    target = ""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", Redirect.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET


def test_key_never_follows_a_redirect(judge):
    """#13.7: a 302 to another port is an error; the other server never sees the key."""
    other = judge.rsplit("/", 1)[0]
    Redirect.target = other
    server = serve(Redirect)
    try:
        remote = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", api_key="k-secret", max_retries=1, backoff_s=0.01)
        with pytest.raises(RemoteError, match="302"):
            remote.score([ASK], ["abc"])
    finally:
        stop(server)
    assert not any(auth for *_, auth in Judge.seen)


# --------------------------------------------------------------------------- judge replies


def test_bad_judge_replies(judge):
    """#13.8: non-finite rewards are refused, malformed replies retried, only the exact 'reward:<float>'
    content is read, and error messages never print an upstream body (which may echo the key)."""
    remote = RemoteReward(judge, "m", api_key="k-secret", concurrency=1, max_retries=1, backoff_s=0.01)
    for text in ("nan", "huge"):
        with pytest.raises(RemoteError, match="non-finite"):
            remote.score([ASK], [text])
    assert remote.score([ASK], ["garbled"]) == [7.0]  # invalid JSON once, then retried
    for text in ("quoted", "no-reward"):
        with pytest.raises(RemoteError, match="malformed reply"):
            remote.score([ASK], [text])
    assert sum(1 for s in Judge.seen if s[1] == "quoted") == 2  # retried once
    with pytest.raises(RemoteError) as err:
        remote.score([ASK], ["echo"])
    assert "401" in str(err.value) and "k-secret" not in str(err.value) and "bad key" not in str(err.value)


def test_scores_paid_for_are_cached_before_a_failure(judge, tmp_path):
    """#13.8: a failure mid-batch keeps the scores already received (each is committed as it arrives)."""
    remote = RemoteReward(judge, "m", concurrency=1, max_retries=0)
    with pytest.raises(RemoteError, match="non-finite"):
        CachedReward(remote, tmp_path / "scores.sqlite").score([ASK] * 3, ["a", "bb", "nan"])
    calls = len(Judge.seen)
    assert CachedReward(remote, tmp_path / "scores.sqlite").score([ASK] * 2, ["a", "bb"]) == [1.0, 2.0]
    assert len(Judge.seen) == calls  # both served from the cache


class NaNBackend:
    identity = "nan-backend"

    def score(self, prompts, responses):
        return [float("nan") if r == "nan" else 1.0 for r in responses]


def test_cache_refuses_non_finite_scores(tmp_path):
    """#13.8: a non-finite score is a clear error (not an SQLite constraint failure), the finite ones are kept."""
    with pytest.raises(ValueError, match="non-finite"):
        CachedReward(NaNBackend(), tmp_path / "s.sqlite").score([ASK] * 2, ["ok", "nan"])
    assert CachedReward(NaNBackend(), tmp_path / "s.sqlite").db.execute("SELECT COUNT(*) FROM scores").fetchone() == (1,)


# --------------------------------------------------------------------------- cache key and cache option


def test_reward_cache_none_turns_the_cache_off(tmp_path):
    """#12.2: reward.cache none/off means no cache (the loader used to turn 'none' into None = default file)."""
    from alignkit.evaluate.run import EvalConfig, reward_backend

    for value in ("none", "off", "None"):
        cfg = config_lib.load(EvalConfig, overrides={"reward.kind": "rule", "reward.cache": value})
        assert not isinstance(reward_backend(cfg, tmp_path), CachedReward)
    assert not (tmp_path / "scores.sqlite").exists()
    cfg = config_lib.load(EvalConfig, overrides={"reward.kind": "rule"})
    assert isinstance(reward_backend(cfg, tmp_path), CachedReward) and (tmp_path / "scores.sqlite").exists()
    cfg = config_lib.load(EvalConfig, overrides={"reward.kind": "rule", "reward.cache": str(tmp_path / "elsewhere.sqlite")})
    assert reward_backend(cfg, tmp_path) and (tmp_path / "elsewhere.sqlite").exists()


def test_weights_fingerprint_covers_every_format(tmp_path):
    """#12.3: .bin weights, shard indexes and configs change the fingerprint; a Hub id is keyed on its commit."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"a" * 10)
    first = weights_fingerprint(model)
    (model / "pytorch_model.bin").write_bytes(b"b" * 11)
    second = weights_fingerprint(model)
    (model / "model.safetensors.index.json").write_text("{}")
    third = weights_fingerprint(model)
    assert len({first, second, third}) == 3
    hub = tmp_path / "hub" / "models--org--name"  # a Hub cache in which 'main' moves from one commit to another
    for commit in ("a" * 40, "b" * 40):
        (hub / "snapshots" / commit).mkdir(parents=True)
        (hub / "snapshots" / commit / "config.json").write_text("{}")
    (hub / "refs").mkdir()
    commits = []
    for commit in ("a" * 40, "b" * 40):
        (hub / "refs" / "main").write_text(commit)
        commits.append(hub_commit("org/name", cache_dir=tmp_path / "hub"))
    assert commits == ["a" * 40, "b" * 40]
    assert weights_fingerprint(Path("org/name"), commits[0]) != weights_fingerprint(Path("org/name"), commits[1])
    with pytest.raises(ValueError, match="fingerprint"):
        weights_fingerprint(Path("org/name"), None)  # never a constant like "hub"


def test_hf_identity_includes_max_length(tiny_model_dir):
    """#12.3: scores at 32 tokens are not served for a run at 2048."""
    short, long = HFRewardModel(str(tiny_model_dir), max_length=32), HFRewardModel(str(tiny_model_dir), max_length=2048)
    assert short.identity != long.identity
    assert str(tiny_model_dir) in short.identity and "hub" not in short.identity
