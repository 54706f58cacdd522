"""The trust boundary (#17.1-4, 11, 12): a recipe, a pipeline file or a --var is data, not permission.

Each attack of the security review runs end to end against loopback stubs: a recipe that enables a
Python verifier (`timeit:timeit` runs the response as setup code), one that trusts a checkpoint's own
code, one that sends the user's key to its own host. Then the remote client facing a hostile endpoint:
no proxy for loopback, a wall-clock deadline per request, terminal-safe error text. Every server
binds 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from alignkit import config as config_lib
from alignkit.cli import STAGES, main, parse
from alignkit.config import ConfigError, Grants, granted
from alignkit.pipeline import read_pipeline
from alignkit.remote import JSONClient, RemoteError
from alignkit.rewards.backends import RemoteReward, RewardConfig

ASK = [{"role": "user", "content": "Rate me"}]


def echo_length(prompt: str, response: str) -> float:
    """A harmless user verifier, loaded as 'tests.test_trust_boundary:echo_length'."""
    return float(len(response))


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def stub():
    """Start loopback stubs; each is shut down at the end of the test."""
    servers = []

    def start(handler):
        server, url = serve(handler)
        servers.append(server)
        return url

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


class Judge(BaseHTTPRequestHandler):
    """A remote judge that records the Authorization header of every request and scores by length."""

    seen: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        Judge.seen.append(self.headers.get("Authorization"))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        Judge.seen.append(self.headers.get("Authorization"))
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        reply = {"choices": [{"message": {"role": "assistant", "content": f"reward:{len(text)}"}}]}
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def write_yaml(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def answers(tmp_path: Path, response: str = "fine") -> str:
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"instruction": "pass", "response": response}) + "\n")
    return str(path)


def eval_recipe(tmp_path: Path, reward: dict, name: str = "recipe.yaml") -> str:
    a = answers(tmp_path)
    return write_yaml(tmp_path / name, {"model": a, "reference": a, "bootstrap": 10, "reward": reward})


def pipeline(tmp_path: Path, stage: dict, vars: dict | None = None) -> str:
    stages = {"judge": {"kind": "eval", **stage}}
    doc = {"run_dir": str(tmp_path / "run"), "vars": vars or {}, "stages": stages}
    return write_yaml(tmp_path / "pipeline.yaml", doc)


# --------------------------------------------------------------------------- 1. Python verifiers


def test_a_recipe_cannot_enable_a_python_verifier(tmp_path, capsys, monkeypatch):
    """#17.1: `reward.rule: timeit:timeit` with `allow_python_verifier: true` in a recipe ran the response
    as Python. Refused, naming the flag; the response never runs; the flag (command line) still works."""
    monkeypatch.chdir(tmp_path)
    a = answers(tmp_path, "open('pwned', 'w').write('ran')")
    reward = {"kind": "rule", "rule": "timeit:timeit", "allow_python_verifier": True}
    recipe = write_yaml(tmp_path / "r.yaml", {"model": a, "reference": a, "bootstrap": 10, "reward": reward})
    assert main(["eval", "--config", recipe, "--output-dir", "out", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "reward.allow_python_verifier" in err and "pass --allow-python-verifier" in err, err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    # "yes" is also true: the check reads the value as the config would
    recipe = write_yaml(tmp_path / "r.yaml", {"model": a, "reference": a, "reward": {
        "kind": "rule", "rule": "tests.test_trust_boundary:echo_length", "allow_python_verifier": "yes"}})
    assert main(["eval", "--config", recipe, "--output-dir", "out", "--quiet"]) == 2
    assert main(["eval", "--config", recipe, "--output-dir", "out", "--quiet",
                 "--allow-python-verifier"]) == 0
    assert json.loads((tmp_path / "out" / "winrate.json").read_text())["n"] == 1
    assert not (tmp_path / "pwned").exists()


def test_a_pipeline_or_a_var_cannot_enable_a_python_verifier_even_in_a_dry_run(tmp_path, capsys):
    """#17.1: `alignkit run --dry-run` accepted the self-granted verifier silently; so did a --var."""
    a = answers(tmp_path)
    reward = {"kind": "rule", "rule": "tests.test_trust_boundary:echo_length", "allow_python_verifier": True}
    stage = {"model": a, "reference": a, "bootstrap": 10, "reward": reward}
    path = pipeline(tmp_path, stage)
    assert main(["run", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stage 'judge': reward.allow_python_verifier" in err and "--allow-python-verifier" in err, err
    # through a var the file wires into the power, set from the command line
    path = pipeline(tmp_path, {**stage, "reward": {**reward, "allow_python_verifier": "${vars.fast}"}},
                    vars={"fast": False})
    assert main(["run", path, "--dry-run"]) == 0  # the safe value stays allowed
    assert main(["run", path, "--dry-run", "--var", "fast=true"]) == 2
    assert "reward.allow_python_verifier: 'true' is not honoured" in capsys.readouterr().err
    # through a stage recipe
    recipe = write_yaml(tmp_path / "stage.yaml", {"reward": stage["reward"]})
    path = pipeline(tmp_path, {"recipe": recipe, "model": a, "reference": a, "bootstrap": 10})
    assert main(["run", path, "--dry-run"]) == 2
    # the runner passes the command line's grant to its stages
    assert main(["run", "--allow-python-verifier", path, "--quiet"]) == 0
    record = json.loads((tmp_path / "run" / "judge" / "stage.json").read_text())
    assert record["status"] == "done" and record["config"]["reward"]["allow_python_verifier"] is True


# --------------------------------------------------------------------------- 2. remote code of a checkpoint


EVIL_CONFIG = '''import os
from pathlib import Path

from transformers import PretrainedConfig

Path(os.environ["ALIGNKIT_TEST_MARKER"]).write_text("ran")


class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def test_a_recipe_cannot_trust_a_checkpoints_code(tmp_path, capsys, monkeypatch):
    """#17.2: `model.trust_remote_code: true` in a recipe ran the folder's configuration_*.py. Refused
    (single stage, init-model, pipeline dry run); --trust-remote-code on the command line runs it."""
    evil = tmp_path / "evil"
    evil.mkdir()
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig"}
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (evil / "configuration_evil.py").write_text(EVIL_CONFIG)
    marker = tmp_path / "marker"
    monkeypatch.setenv("ALIGNKIT_TEST_MARKER", str(marker))
    prompts = answers(tmp_path)
    model = {"name_or_path": str(evil), "trust_remote_code": True}
    recipe = write_yaml(tmp_path / "gen.yaml", {"model": model, "prompts": {"dataset": prompts},
                                                "output_dir": str(tmp_path / "out")})
    assert main(["generate", "--config", recipe]) == 2
    assert "model.trust_remote_code: True is not honoured from a file" in capsys.readouterr().err
    init = write_yaml(tmp_path / "init.yaml", {"model_config": str(evil), "trust_remote_code": True})
    assert main(["init-model", "--config", init, "--output-dir", str(tmp_path / "init")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    stages = {"gen": {"kind": "generate", "model": {"name_or_path": str(evil), "trust_remote_code": True},
                      "prompts": {"dataset": prompts}}}
    path = write_yaml(tmp_path / "pipeline.yaml", {"run_dir": str(tmp_path / "run"), "stages": stages})
    assert main(["run", path, "--dry-run"]) == 2
    assert "stage 'gen': model.trust_remote_code" in capsys.readouterr().err
    assert not marker.exists()
    with granted(Grants(trust_remote_code=True)):  # what `alignkit run --trust-remote-code` reads under
        assert read_pipeline(path).stages[0].config.model.trust_remote_code is True
    # the command line can: the checkpoint's code runs (the stage then fails on this non-model)
    with contextlib.suppress(Exception):
        main(["generate", "--config", recipe, "--trust-remote-code"])
    assert marker.read_text() == "ran"
    cfg = parse("generate", ["--config", recipe, "--trust-remote-code"])
    assert cfg.model.trust_remote_code is True


# --------------------------------------------------------------------------- 3. keys go to their hosts


def test_a_recipe_cannot_send_a_key_to_its_own_host(tmp_path, stub, capsys, monkeypatch):
    """#17.3: a recipe named OPENAI_API_KEY and its own host; the stub received `Authorization: Bearer`.
    Refused before any request; --allow-key, or the host and key both on the command line, allow it."""
    Judge.seen = []
    url = stub(Judge)
    port = url.split(":")[2].split("/")[0]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-victim")
    reward = {"kind": "remote", "base_url": url, "model": "m", "api_key_env": "OPENAI_API_KEY",
              "max_retries": 0}
    recipe = eval_recipe(tmp_path, reward)
    out = ["--output-dir", str(tmp_path / "out"), "--quiet"]
    assert main(["eval", "--config", recipe, *out]) == 2
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY would be sent to 127.0.0.1" in err, err
    assert f"--allow-key OPENAI_API_KEY=127.0.0.1:{port}" in err, err
    a = answers(tmp_path)
    assert main(["run", pipeline(tmp_path, {"model": a, "reference": a, "reward": reward}), "--dry-run"]) == 2
    assert "stage 'judge': reward.api_key_env: OPENAI_API_KEY would be sent" in capsys.readouterr().err
    assert main(["eval", "--config", recipe, *out, "--allow-key", "OPENAI_API_KEY=127.0.0.2"]) == 2  # not it
    assert Judge.seen == []  # nothing was sent
    assert main(["eval", "--config", recipe, *out, "--allow-key", f"OPENAI_API_KEY=127.0.0.1:{port}"]) == 0
    assert Judge.seen and set(Judge.seen) == {"Bearer sk-victim"}
    # the user names host and key on the command line: that is their choice
    Judge.seen = []
    named = ["--reward.base-url", url, "--reward.api-key-env", "OPENAI_API_KEY"]
    recipe = eval_recipe(tmp_path, {"kind": "remote", "model": "m", "max_retries": 0}, "plain.yaml")
    assert main(["eval", "--config", recipe, "--output-dir", str(tmp_path / "out2"), "--quiet", *named]) == 0
    assert set(Judge.seen) == {"Bearer sk-victim"}


@pytest.mark.parametrize("url, key, ok", [
    ("https://integrate.api.nvidia.com/v1", "NVIDIA_API_KEY", True),
    ("https://INTEGRATE.api.nvidia.com/v1", "NVIDIA_API_KEY", True),
    ("https://api.openai.com/v1", "OPENAI_API_KEY", True),
    ("https://integrate.api.nvidia.com.attacker.example/v1", "NVIDIA_API_KEY", False),
    ("https://api.openai.com/v1", "NVIDIA_API_KEY", False),
    ("https://nvidia.com/v1", "NVIDIA_API_KEY", False),
    ("https://attacker.example/v1", "ANTHROPIC_API_KEY", False),
    ("http://127.0.0.1:8000/v1", "ALIGNKIT_API_KEY", False),  # every user of the machine shares loopback
])
def test_a_key_goes_only_to_its_own_service_from_a_file(tmp_path, url, key, ok):
    """#17.3: the allow-list matches the exact host (over https); anything else needs --allow-key."""
    recipe = write_yaml(tmp_path / "r.yaml", {"kind": "remote", "model": "m", "base_url": url,
                                              "api_key_env": key})
    if ok:
        assert config_lib.load(RewardConfig, recipe).api_key_env == key
    else:
        with pytest.raises(ConfigError, match=f"{key} would be sent to .*pass --allow-key {key}="):
            config_lib.load(RewardConfig, recipe)


def test_key_grants_and_urls(tmp_path):
    """#17.3: --allow-key NAME=HOST (any port) or HOST:PORT (that port); URLs that parsers may read
    differently are refused; a teacher's key follows the same rule."""
    from alignkit.testtime.refine import RefineConfig

    def load(url, *grants):
        reward = {"kind": "remote", "model": "m", "base_url": url, "api_key_env": "MY_API_KEY"}
        recipe = write_yaml(tmp_path / "r.yaml", reward)
        with granted(Grants(keys=tuple(config_lib.parse_key_grant(g) for g in grants))):
            return config_lib.load(RewardConfig, recipe)

    assert load("https://judge.example:8443/v1", "MY_API_KEY=judge.example").base_url
    assert load("https://judge.example:8443/v1", "MY_API_KEY=https://judge.example:8443/v1").base_url
    for url, grant in [("https://judge.example:8443/v1", "MY_API_KEY=judge.example:443"),
                       ("https://judge.example/v1", "OTHER_API_KEY=judge.example"),
                       ("https://judge.example.evil/v1", "MY_API_KEY=judge.example")]:
        with pytest.raises(ConfigError, match="would be sent to"):
            load(url, grant)
    for url in ("https://api.openai.com@evil.example/v1", "https://evil.example\\@api.openai.com/v1",
                "https://api.openai.com /v1", "https://api.openai.com:99999/v1"):
        with pytest.raises(ConfigError, match="base_url"):
            load(url, "MY_API_KEY=api.openai.com")
    for bad in ("MY_API_KEY", "=host", "MY_API_KEY=", "MY_API_KEY=a/b", "my key=host", "MY_API_KEY=u@host"):
        with pytest.raises(ConfigError, match="--allow-key"):
            config_lib.parse_key_grant(bad)
    teacher = {"kind": "openai", "model": "m", "base_url": "https://evil.example/v1",
               "api_key_env": "OPENAI_API_KEY"}
    teacher = write_yaml(tmp_path / "t.yaml", {"reward": {"kind": "rule"}, "teacher": teacher})
    with pytest.raises(ConfigError, match="teacher.api_key_env: OPENAI_API_KEY would be sent to evil"):
        config_lib.load(RefineConfig, teacher)


def test_a_file_cannot_allow_insecure_http(tmp_path, capsys):
    """#17.3: allow_insecure_http is a power too: refused from a file, granted by the flag."""
    recipe = eval_recipe(tmp_path, {"kind": "remote", "model": "m", "base_url": "http://judge.example/v1",
                                    "allow_insecure_http": True})
    assert main(["eval", "--config", recipe]) == 2
    err = capsys.readouterr().err
    assert "reward.allow_insecure_http: True is not honoured" in err and "--allow-insecure-http" in err, err
    cfg = parse("eval", ["--config", recipe, "--allow-insecure-http"])
    assert cfg.reward.allow_insecure_http is True


def test_saved_configs_load_again_as_recipes(tmp_path, capsys):
    """#17: a config.yaml a run saves holds the safe values, so it loads as a recipe; one saved under a
    grant needs the same flag again."""
    for name, stage in STAGES.items():  # every stage's defaults pass the boundary
        saved = tmp_path / f"{name}.yaml"
        config_lib.save(stage.config(), saved)
        values = config_lib.flatten(yaml.safe_load(saved.read_text()), config_lib.leaf_fields(stage.config))
        config_lib.enforce_trust(config_lib.build(stage.config, values), values, {})
    a = answers(tmp_path)
    base = ["eval", "--model", a, "--reference", a, "--bootstrap", "10", "--quiet", "--reward.kind", "rule"]
    assert main([*base, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main(["eval", "--config", str(tmp_path / "plain" / "config.yaml"), "--output-dir",
                 str(tmp_path / "again")]) == 0
    rule = ["--reward.rule", "tests.test_trust_boundary:echo_length", "--allow-python-verifier"]
    assert main([*base, *rule, "--output-dir", str(tmp_path / "granted")]) == 0
    capsys.readouterr()
    again = ["eval", "--config", str(tmp_path / "granted" / "config.yaml"), "--output-dir",
             str(tmp_path / "again2")]
    assert main(again) == 2 and "--allow-python-verifier" in capsys.readouterr().err
    assert main([*again, "--allow-python-verifier"]) == 0


# --------------------------------------------------------------------------- 4. proxies


class Proxy(BaseHTTPRequestHandler):
    """An http proxy that records what it is asked to forward (and forwards nothing)."""

    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        Proxy.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_CONNECT = do_POST


def test_a_loopback_key_never_goes_through_a_proxy(stub, monkeypatch):
    """#17.4: http_proxy in the environment carried a loopback plain-http key to the proxy."""
    Judge.seen, Proxy.seen = [], []
    judge, proxy = stub(Judge), stub(Proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy.removesuffix("/v1"))
    remote = RemoteReward(judge, "m", api_key="k-loopback", max_retries=0)
    assert remote.score([ASK], ["abc"]) == [3.0]
    assert Proxy.seen == [] and Judge.seen[-1] == "Bearer k-loopback"
    # beyond loopback the environment's proxy is used (urllib's rules), e.g. for a corporate network
    client = JSONClient("http://judge.invalid/v1", max_retries=0)
    with pytest.raises(RemoteError, match="HTTP 502"):
        client.request("GET", "http://judge.invalid/v1/models", None)
    assert Proxy.seen == [("http://judge.invalid/v1/models", None)]


# --------------------------------------------------------------------------- 11. deadline


class Trickle(BaseHTTPRequestHandler):
    """Sends its reply one byte every 0.1 s (each read within any per-read timeout), for at most 6 s."""

    phase = "body"

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"choices": [{"message": {"content": "reward:1" + " " * 200}}]}).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        data = head + body if Trickle.phase == "headers" else body
        if Trickle.phase == "body":
            self.wfile.write(head)
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                if time.monotonic() - t0 > 6:
                    break
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        self.close_connection = True


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_trickling_endpoint_meets_a_deadline(stub, phase):
    """#17.11: `timeout_s` was per read; an endpoint sending a byte at a time held a call forever.
    Now it bounds each attempt (connect, headers and body)."""
    Trickle.phase = phase
    url = stub(Trickle)
    remote = RemoteReward(url, "m", timeout_s=1.0, max_retries=0)
    outcome = {}

    def call():
        try:
            outcome["value"] = remote.score([ASK], ["abc"])
        except RemoteError as e:
            outcome["error"] = str(e)

    t0 = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=10)
    elapsed = time.monotonic() - t0
    assert not worker.is_alive() and elapsed < 3.5, (elapsed, outcome)
    assert "no complete reply within 1 s" in outcome.get("error", ""), outcome


# --------------------------------------------------------------------------- 12. remote text on the terminal


class Forger(BaseHTTPRequestHandler):
    """Answers 400 with a reason phrase that sets the terminal's title and forges a line."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(400, "\x1b]0;owned\x07\x1b[2K\x1b[1Aall good\x9b")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST


def test_remote_error_text_reaches_the_terminal_inert(tmp_path, stub, capsys):
    """#17.12: the HTTP reason phrase of a remote error reached the terminal raw."""
    url = stub(Forger)
    with pytest.raises(RemoteError) as e:
        RemoteReward(url, "m", max_retries=0).score([ASK], ["abc"])
    assert "HTTP 400" in str(e.value) and "all good" in str(e.value)
    assert not any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in str(e.value)), repr(str(e.value))
    recipe = eval_recipe(tmp_path, {"kind": "remote", "model": "m", "max_retries": 0})
    assert main(["eval", "--config", recipe, "--reward.base-url", url, "--output-dir", str(tmp_path / "out"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "\x1b" not in err and "\x07" not in err and "\x9b" not in err, repr(err)


@pytest.mark.parametrize("writer", ["teacher", "generator"])
def test_every_writer_refuses_decoding_an_endpoint_would_not_apply(writer):
    """A refine teacher and a data loop's generator share one check (`remote.check_writer`): a decoding
    setting that a chat request does not carry (every SamplingParams field but SENT_SAMPLING) is refused
    rather than silently dropped, and the sent ones pass. The generator used to let length_penalty by."""
    import dataclasses

    from alignkit.generation import SamplingParams
    from alignkit.loops.textgen import GeneratorConfig
    from alignkit.remote import SENT_SAMPLING
    from alignkit.testtime.teacher import TeacherConfig

    cls = TeacherConfig if writer == "teacher" else GeneratorConfig
    unsent = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "num_beams": 2, "length_penalty": 0.5}
    assert {f.name for f in dataclasses.fields(SamplingParams)} - set(SENT_SAMPLING) == set(unsent)
    for name, value in unsent.items():
        cfg = cls(kind="openai", model="m", base_url="https://x/v1",
                  sampling=dataclasses.replace(SamplingParams(), **{name: value}))
        with pytest.raises(ConfigError, match=rf"{writer}\.sampling\.{name}: not sent"):
            cfg.validate(f"{writer}.")
    cls(kind="openai", model="m", base_url="https://x/v1",
        sampling=SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=3)).validate(f"{writer}.")
