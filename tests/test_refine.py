"""#10 `alignkit refine` and `alignkit serve-chat`: a teacher rewrites a student's answers and the toy
verifier keeps the better one. Every teacher endpoint is a loopback server with an ephemeral port
(serve-chat itself, or a scripted handler); every client loop is bounded."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignkit import config as C
from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.generation import SamplingParams
from alignkit.testtime import teacher as teacher_lib
from alignkit.testtime.chat_server import (ServeChatConfig, chat_fingerprint, make_chat_server, model_completer,
                                           read_chat_request)
from alignkit.testtime.refine import RefineConfig, run_refine

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "{instruction}\n{answer}"  # lets a scripted teacher read both back


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(teacher_lib, "BACKOFF_S", 0.01)


@pytest.fixture
def serve():
    servers = []

    def run(server):
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield run
    for s in servers:
        s.shutdown()
        s.server_close()


def write_answers(path: Path, pairs: list[tuple[str, str]]) -> str:
    rows = [{"id": i, "sample": 0, "prompt": [{"role": "user", "content": q}], "response": a, "category": "add"}
            for i, (q, a) in enumerate(pairs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def scripted(replies: dict, calls: list):
    """A serve-chat Completer answering by instruction (the first line of TEMPLATE); records every prompt."""
    def complete(messages, params):
        prompt = messages[-1]["content"]
        calls.append(prompt)
        reply = replies[prompt.split("\n")[0]]
        return (reply(prompt) if callable(reply) else reply), "stop", 1, 1

    return complete


def refine_cfg(tmp_path, responses, base_url, **extra) -> RefineConfig:
    values = {"output_dir": str(tmp_path / "out"), "responses": responses, "teacher.kind": "openai",
              "teacher.base_url": base_url, "teacher.model": "teacher", "teacher.concurrency": 1,
              "template": TEMPLATE, "reward.kind": "rule", "reward.rule": "toy", "bootstrap": 50, "quiet": True,
              **extra}
    return C.load(RefineConfig, None, values)


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_refinement_keeps_the_higher_scored_answer(tmp_path, serve):
    """#10: the revision is kept only when the judge scores it higher; ties keep the original."""
    answers = write_answers(tmp_path / "student.jsonl", [
        ("What is 1 plus 1?", "3"),   # wrong -> right: revision kept
        ("What is 2 plus 2?", "4"),   # right -> wrong: answer kept
        ("What is 3 plus 3?", "5"),   # wrong -> wrong: a tie, answer kept
        ("What is 4 plus 4?", "8"),   # right -> right (spaced): a tie, answer kept
    ])
    replies = {"What is 1 plus 1?": "2", "What is 2 plus 2?": "5", "What is 3 plus 3?": "7", "What is 4 plus 4?": " 8 "}
    calls = []
    url = serve(make_chat_server(scripted(replies, calls), "teacher", "ab" * 16, SamplingParams(), port=0))
    out = run_refine(refine_cfg(tmp_path, answers, url, reference=answers))
    kept = {r["prompt"][0]["content"]: r["response"] for r in read(out / "responses.jsonl")}
    assert kept == {"What is 1 plus 1?": "2", "What is 2 plus 2?": "4", "What is 3 plus 3?": "5", "What is 4 plus 4?": "8"}
    records = read(out / "refinements.jsonl")
    assert [r["kept"] for r in records] == ["revision", "answer", "answer", "answer"]
    assert [(r["score_answer"], r["score_revision"]) for r in records] == [(0, 1), (1, 0), (0, 0), (1, 1)]
    summary = json.loads((out / "refine.json").read_text())
    assert summary["improved"] == 1 and summary["improved_share"] == 0.25 and summary["mean_reward_gain"] == 0.25
    assert (summary["vs_original"]["wins"], summary["vs_original"]["losses"], summary["vs_original"]["ties"]) == (1, 0, 3)
    assert summary["teacher"] == f"openai:{url}:teacher:{'ab' * 16}" and len(calls) == 4
    assert summary["vs_reference"] == summary["vs_original"] and summary["original_vs_reference"]["ties"] == 4
    # responses.jsonl is a responses file `alignkit eval` accepts as model:
    assert main(["eval", "--model", str(out / "responses.jsonl"), "--reference", answers, "--reward.kind", "rule",
                 "--reward.rule", "toy", "--output-dir", str(tmp_path / "eval"), "--bootstrap", "50"]) == 0
    assert json.loads((tmp_path / "eval" / "winrate.json").read_text())["wins"] == 1


def test_critique_mode_makes_two_calls_and_rounds_build_on_the_kept_answer(tmp_path, serve):
    """#10: critique first: a critique call, then a revision that sees the critique; round 2 starts from
    round 1's keeper; an unusable critique keeps the answer without a revision call."""
    answers = write_answers(tmp_path / "student.jsonl", [("What is 1 plus 1?", "3"), ("What is 5 plus 5?", "9")])
    calls = []

    def teacher(prompt):
        if prompt.endswith("CRITIQUE ME"):
            return "the sum is wrong"
        return "2" if "the sum is wrong" in prompt else "9"

    replies = {"What is 1 plus 1?": teacher, "What is 5 plus 5?": lambda p: "" if p.endswith("CRITIQUE ME") else "10"}
    url = serve(make_chat_server(scripted(replies, calls), "teacher", "cd" * 16, SamplingParams(), port=0))
    cfg = refine_cfg(tmp_path, answers, url, critique=True, rounds=2, template="{instruction}\n{answer}\n{critique}",
                     critique_template="{instruction}\n{answer}\nCRITIQUE ME")
    out = run_refine(cfg)
    first = [c for c in calls if c.startswith("What is 1")]
    assert len(first) == 4  # two rounds of (critique, revision)
    assert first[0].endswith("CRITIQUE ME") and first[1] == "What is 1 plus 1?\n3\nthe sum is wrong"
    assert first[2] == "What is 1 plus 1?\n2\nCRITIQUE ME"  # round 2 critiques the kept revision
    assert [c for c in calls if c.startswith("What is 5")] == ["What is 5 plus 5?\n9\nCRITIQUE ME"]  # round 2: cached
    records = read(out / "refinements.jsonl")
    assert [(r["round"], r["critique"], r["kept"]) for r in records if r["id"] == 0] == [
        (1, "the sum is wrong", "revision"), (2, "the sum is wrong", "answer")]
    assert [(r["problem"], r["kept"]) for r in records if r["id"] == 1] == [("critique: empty answer", "answer")] * 2
    assert [r["response"] for r in read(out / "responses.jsonl")] == ["2", "9"]


def test_serve_chat_end_to_end_and_a_rerun_pays_nothing(tmp_path, serve, tiny_model_dir):
    """#10: the student's answers generated from a model, the teacher served by serve-chat (a real model) on
    loopback, replies cached: a rerun asks the endpoint nothing and gives the same result."""
    from alignkit.config import ModelConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {a} plus 1?"}) + "\n" for a in range(3)))
    model = ModelConfig(name_or_path=str(tiny_model_dir))
    completer, calls = model_completer(model, "fp32"), []

    def counted(messages, params):
        calls.append(params)
        text, *rest = completer(messages, params)
        return (text if text.strip() else "no answer", *rest)  # an empty reply would be asked again (#18.13)

    fingerprint = chat_fingerprint(ServeChatConfig(model=model, precision="fp32"))
    url = serve(make_chat_server(counted, "tiny", fingerprint, SamplingParams(max_new_tokens=8), port=0))
    values = {"output_dir": str(tmp_path / "out"), "model.name_or_path": str(tiny_model_dir),
              "prompts.dataset": str(prompts), "prompts.split": "train", "sampling.max_new_tokens": 4,
              "teacher.kind": "openai", "teacher.base_url": url, "teacher.model": "tiny",
              "teacher.sampling.max_new_tokens": 100, "reward.kind": "rule", "reward.rule": "toy",
              "bootstrap": 50, "quiet": True}
    out = run_refine(C.load(RefineConfig, None, values))
    first = json.loads((out / "refine.json").read_text())
    assert len(calls) == 3 and all(p.max_new_tokens == 8 for p in calls)  # max_tokens capped at the server's
    assert first["teacher_calls_this_run"] == 3 and fingerprint in first["teacher"]
    assert len(read(out / "student" / "responses.jsonl")) == 3
    records = read(out / "refinements.jsonl")
    out = run_refine(C.load(RefineConfig, None, values))
    second = json.loads((out / "refine.json").read_text())
    assert len(calls) == 3 and second["teacher_calls_this_run"] == 0
    assert read(out / "refinements.jsonl") == records and second["n"] == 3


def test_self_teacher_refines_with_the_student_model_and_caches(tmp_path, tiny_model_dir):
    """#10: teacher.kind self uses the student model (transformers engine); a rerun loads and generates nothing."""
    answers = write_answers(tmp_path / "student.jsonl", [("What is 1 plus 1?", "3"), ("What is 2 plus 1?", "3")])
    values = {"output_dir": str(tmp_path / "out"), "responses": answers, "model.name_or_path": str(tiny_model_dir),
              "teacher.kind": "self", "teacher.sampling.max_new_tokens": 4, "reward.kind": "rule", "reward.rule": "toy",
              "bootstrap": 50, "quiet": True}
    out = run_refine(C.load(RefineConfig, None, values))
    assert json.loads((out / "refine.json").read_text())["teacher_calls_this_run"] == 2
    assert json.loads((out / "refine.json").read_text())["teacher"].startswith("local:")
    out = run_refine(C.load(RefineConfig, None, values))
    assert json.loads((out / "refine.json").read_text())["teacher_calls_this_run"] == 0


class Flaky(BaseHTTPRequestHandler):
    """A teacher answering 'a plus 1' correctly. mode flaky: each conversation's first attempt gets 503;
    two: two conversations are answered, then every request gets 503; up: every request is answered."""

    seen: list = []
    answered: list = []
    mode = "flaky"

    def log_message(self, *a):
        pass

    def send(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send(404, b"")

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        Flaky.seen.append(prompt)
        if (Flaky.mode == "flaky" and Flaky.seen.count(prompt) == 1) or (Flaky.mode == "two" and len(Flaky.answered) >= 2):
            return self.send(503, b'{"error": "busy"}')
        Flaky.answered.append(prompt)
        self.send(200, json.dumps({"choices": [{"message": {"content": str(int(prompt.split()[2]) + 1)}}]}).encode())


def test_a_failing_teacher_stops_clearly_and_a_rerun_resumes_without_paying_twice(tmp_path, serve, capsys):
    """#10: transient failures are retried; an endpoint still failing after its retries stops the run
    (exit 2, a message saying how to resume); the rerun asks only for what is missing."""
    answers = write_answers(tmp_path / "student.jsonl", [(f"What is {a} plus 1?", "0") for a in range(4)])
    url = serve(ThreadingHTTPServer(("127.0.0.1", 0), Flaky))
    Flaky.seen, Flaky.answered, Flaky.mode = [], [], "flaky"
    out = run_refine(refine_cfg(tmp_path, answers, url, **{"teacher.max_retries": 1}))
    assert len(Flaky.seen) == 8 and json.loads((out / "refine.json").read_text())["improved"] == 4

    (out / "teacher.sqlite").unlink()
    Flaky.seen, Flaky.answered, Flaky.mode = [], [], "two"
    args = ["refine", "--responses", answers, "--output-dir", str(out), "--teacher.kind", "openai",
            "--teacher.base-url", url, "--teacher.model", "t", "--teacher.concurrency", "1", "--teacher.max-retries", "1",
            "--template", TEMPLATE, "--reward.kind", "rule", "--reward.rule", "toy", "--bootstrap", "50", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "teacher failed" in err and "gave up after 2 attempts" in err and "HTTP 503" in err
    assert "run the same command again to resume" in err and "teacher.sqlite" in err
    failed = [p for p in Flaky.seen if p not in Flaky.answered]
    assert len(Flaky.answered) == 2 and failed and all(failed.count(p) == 2 for p in failed)  # each tried 1 + 1 retry
    paid = list(Flaky.answered)

    Flaky.seen, Flaky.answered, Flaky.mode = [], [], "up"
    assert main(args) == 0
    assert len(Flaky.seen) == 2 and not set(Flaky.seen) & set(paid)  # only the two never answered
    summary = json.loads((out / "refine.json").read_text())
    assert summary["improved"] == 4 and summary["teacher_calls_this_run"] == 2


class Hostile(BaseHTTPRequestHandler):
    """Scripted raw replies by instruction."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        kind = prompt.split("\n")[0]
        body = HOSTILE[kind]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass


def chat(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


HOSTILE = {
    "huge": chat("x" * 50_000),
    "empty": chat(""),
    "blank": chat(" \n\t "),
    "number": chat(42),
    "parts": chat([{"type": "text", "text": "2"}]),
    "null": chat(None),
    "no fields": b"{}",
    "no choices": b'{"choices": []}',
    "not json": b"<html>busy</html>",
    "not utf-8": b'{"choices": [{"message": {"content": "\xff\xfe"}}]}',
    "over 1 MiB": chat("y" * (1 << 20)),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "surrogate": b'{"choices": [{"message": {"content": "\\ud800 ok"}}]}',
}


def test_hostile_teacher_replies_keep_the_answer_and_are_counted(tmp_path, serve):
    """#10: huge, empty, non-text, fieldless, non-JSON, non-UTF-8 replies: no crash; the answer kept, each counted."""
    answers = write_answers(tmp_path / "student.jsonl", [(kind, "original") for kind in HOSTILE])
    url = serve(ThreadingHTTPServer(("127.0.0.1", 0), Hostile))
    out = run_refine(refine_cfg(tmp_path, answers, url, **{"teacher.max_chars": 100, "teacher.concurrency": 4}))
    rows = {r["id"]: r for r in read(out / "refinements.jsonl")}
    kinds = list(HOSTILE)
    assert all(r["kept"] == "answer" for r in rows.values())
    assert [r["response"] for r in read(out / "responses.jsonl")] == ["original"] * len(HOSTILE)
    huge = rows[kinds.index("huge")]
    assert huge["truncated"] and len(huge["revision"]) == 100
    assert rows[kinds.index("surrogate")]["revision"] == "? ok"
    problems = {k: rows[i]["problem"] for i, k in enumerate(kinds)}
    assert problems["empty"] == problems["blank"] == "empty answer"
    assert problems["number"] == problems["parts"] == problems["null"] == "message content is not text"
    assert problems["no fields"] == problems["no choices"] == "no choices[0].message in the reply"
    assert problems["not json"] == problems["not utf-8"] == problems["deep"] == "reply is not JSON"
    assert problems["over 1 MiB"] == "reply larger than 1 MiB"
    summary = json.loads((out / "refine.json").read_text())
    assert summary["unusable_teacher_replies"] == len(HOSTILE) - 2 and summary["truncated_teacher_replies"] == 1


class Echo(BaseHTTPRequestHandler):
    """Answers 401 and echoes the Authorization header back in its body."""

    auth: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.do_POST()

    def do_POST(self):
        Echo.auth.append(self.headers.get("Authorization"))
        body = f"bad key {self.headers.get('Authorization')}".encode()
        self.send_response(401, f"bad key {self.headers.get('Authorization')}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_api_key_never_appears_in_errors_logs_or_files(tmp_path, serve, monkeypatch, capsys, caplog):
    """#10: the teacher's key is sent as a bearer token, logged by name and host only, and never shown."""
    Echo.auth = []
    monkeypatch.setenv("TEACHER_API_KEY", "sk-very-secret")
    answers = write_answers(tmp_path / "student.jsonl", [("What is 1 plus 1?", "3")])
    url = serve(ThreadingHTTPServer(("127.0.0.1", 0), Echo))
    args = ["refine", "--responses", answers, "--output-dir", str(tmp_path / "out"), "--teacher.kind", "openai",
            "--teacher.base-url", url, "--teacher.model", "t", "--teacher.api-key-env", "TEACHER_API_KEY",
            "--reward.kind", "rule", "--reward.rule", "toy", "--quiet"]
    with caplog.at_level("INFO"):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "<key>" in err and "sk-very-secret" not in err
    assert "TEACHER_API_KEY is sent to 127.0.0.1" in caplog.text and "sk-very-secret" not in caplog.text
    assert Echo.auth and set(Echo.auth) == {"Bearer sk-very-secret"}
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert b"sk-very-secret" not in f.read_bytes(), f


@pytest.mark.parametrize("values, match", [
    ({"template": "{instruction} {answr}"}, r"template: field '\{answr\}' is not allowed"),
    ({"template": "{instruction} {answer!r}"}, r"field '\{answer!r\}' is not allowed"),
    ({"template": "{instruction} {answer} {critique}"}, r"template: field '\{critique\}' is not allowed"),
    ({"critique": True, "template": "{instruction} {answer}"}, r"template: needs the field\(s\) \{critique\}"),
    ({"critique": True, "critique_template": "{answer} {critique}"}, r"critique_template: field '\{critique\}'"),
    ({"critique_template": "{answer}"}, "critique is false"),
    ({"template": "{instruction"}, "template: "),
    ({"rounds": 0}, "rounds: 0"),
    ({"teacher.kind": "local"}, "teacher.model is required"),
    ({"teacher.kind": "local", "teacher.model": "./no/such/model"}, "teacher.model: './no/such/model': no such model"),
    ({"teacher.kind": "openai", "teacher.model": "m"}, "teacher.base_url and teacher.model are required"),
    ({"teacher.model": "m"}, "kind 'self' uses the student model"),
    ({"teacher.kind": "openai", "teacher.model": "m", "teacher.base_url": "http://127.0.0.1:1/v1",
      "teacher.api_key_env": "HF_TOKEN"}, r"teacher.api_key_env: 'HF_TOKEN' is not allowed"),
    ({"teacher.kind": "openai", "teacher.model": "m", "teacher.base_url": "http://203.0.113.7/v1",
      "teacher.api_key_env": "T_API_KEY"}, "unencrypted to 203.0.113.7.*teacher.allow_insecure_http"),
    ({"teacher.kind": "openai", "teacher.model": "m", "teacher.base_url": "file:///etc/passwd"}, "not an http"),
    ({"teacher.kind": "openai", "teacher.model": "m", "teacher.base_url": "https://x/v1", "teacher.sampling.top_k": 5},
     "teacher.sampling.top_k: not sent"),
    ({"teacher.sampling.n": 2, "teacher.sampling.temperature": 1.0}, "teacher.sampling.n: 2"),
    ({"teacher.max_chars": 0}, "teacher.max_chars: 0"),
    ({"reward.kind": "hf"}, "reward.model is required"),
    ({"responses": "answers.json"}, "expected a responses .jsonl"),
])
def test_bad_settings_are_refused_when_the_recipe_loads(values, match):
    """#10: templates, teacher, key rules and reward are checked before any generation or call."""
    base = {"reward.kind": "rule", "reward.rule": "toy"}
    with pytest.raises(ConfigError, match=match):
        C.load(RefineConfig, None, {**base, **values})


def test_an_unset_key_or_bad_rule_stops_before_generation(tmp_path, monkeypatch):
    """#10: the key's variable and the reward are checked before the student generates or a teacher is called."""
    from alignkit.config import ModelConfig
    from alignkit.rewards.backends import RewardConfig

    monkeypatch.delenv("MISSING_API_KEY", raising=False)
    teacher = teacher_lib.TeacherConfig(kind="openai", base_url="http://127.0.0.1:9/v1", model="m",
                                        api_key_env="MISSING_API_KEY")
    cfg = RefineConfig(output_dir=str(tmp_path / "out"), model=ModelConfig(name_or_path="nobody/no-model"), teacher=teacher,
                       reward=RewardConfig(kind="rule"))
    with pytest.raises(ConfigError, match="MISSING_API_KEY .*is not set"):
        run_refine(cfg)
    cfg.teacher, cfg.reward.rule = teacher_lib.TeacherConfig(kind="self"), "no-such-verifier"
    with pytest.raises(ConfigError, match="no-such-verifier"):
        run_refine(cfg)
    assert not (tmp_path / "out").exists()


def test_serve_chat_checks_requests(serve):
    """#10: serve-chat refuses what it cannot answer (400) and binds beyond loopback only with a token."""
    defaults = SamplingParams(max_new_tokens=16)
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    for bad, why in [({"messages": []}, "non-empty"), ({**ok, "n": 2}, "n: 1"), ({**ok, "stream": True}, "streaming"),
                     ({"messages": [{"role": "assistant", "content": "x"}]}, "end with a user"),
                     ({**ok, "temperature": 9}, "temperature"), ({**ok, "max_tokens": 0}, "max_tokens"),
                     ({**ok, "seed": -1}, "seed"), ({"messages": [{"role": "user", "content": 3}]}, "string content")]:
        with pytest.raises(ValueError, match=why):
            read_chat_request(json.dumps(bad).encode(), defaults)
    messages, params = read_chat_request(json.dumps({**ok, "max_tokens": 99, "temperature": 0.5, "seed": 3}).encode(),
                                         defaults)
    assert messages == ok["messages"] and (params.max_new_tokens, params.temperature, params.seed) == (16, 0.5, 3)
    with pytest.raises(ConfigError, match="requires a bearer token"):
        make_chat_server(lambda m, p: ("", "stop", 0, 0), "m", "0" * 32, defaults, host="0.0.0.0", port=0)
    import urllib.error
    import urllib.request

    url = serve(make_chat_server(lambda m, p: ("hello", "stop", 1, 1), "m", "0" * 32, defaults, port=0))
    listing = json.loads(urllib.request.urlopen(url + "/models", timeout=5).read())
    assert listing["data"][0]["id"] == "m" and listing["data"][0]["alignkit_fingerprint"] == "0" * 32
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(ok).encode(),
                                 headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    locked = serve(make_chat_server(lambda m, p: ("hello", "stop", 1, 1), "m", "0" * 32, defaults, port=0, token="tok"))
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(urllib.request.Request(locked + "/chat/completions", data=json.dumps(ok).encode(),
                                                      headers={"Content-Type": "application/json"}), timeout=5)


def test_refine_recipe_loads():
    """#10: the shipped recipe validates (self teacher; the alternatives are commented out)."""
    cfg = C.load(RefineConfig, ROOT / "recipes" / "refine-qwen2.5-0.5b.yaml")
    assert cfg.teacher.kind == "self" and cfg.reward.kind == "hf" and cfg.output_dir.startswith("runs/")


def test_self_teacher_must_be_the_model_that_wrote_the_answers(tmp_path, tiny_model_dir):
    """#10: with a responses file and teacher.kind self, `model` is the teacher: a model other than the one that
    wrote the answers (e.g. model left at its default) is refused before any model loads, naming both."""
    rows = [{"id": 0, "sample": 0, "prompt": [{"role": "user", "content": "What is 1 plus 1?"}], "response": "3",
             "model": str(tiny_model_dir)}]
    answers = tmp_path / "student.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"output_dir": str(tmp_path / "out"), "responses": str(answers), "teacher.kind": "self",
              "teacher.sampling.max_new_tokens": 4, "reward.kind": "rule", "reward.rule": "toy", "bootstrap": 50,
              "quiet": True}
    with pytest.raises(ConfigError, match="were written by .*set model.name_or_path to the student"):
        run_refine(C.load(RefineConfig, None, values))
    assert not (tmp_path / "out").exists()
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "model"}) + "\n")
    with pytest.raises(ConfigError, match="does not say which model wrote the answers"):
        run_refine(C.load(RefineConfig, None, values | {"responses": str(unlabelled)}))
    out = run_refine(C.load(RefineConfig, None, values | {"model.name_or_path": str(tiny_model_dir) + "/"}))
    assert json.loads((out / "refine.json").read_text())["n"] == 1


def test_unusable_teacher_replies_are_not_cached_a_rerun_asks_again(tmp_path, serve):
    """#18.13: an empty teacher reply was cached forever; a rerun now asks again (good ones stay cached)."""
    answers = write_answers(tmp_path / "student.jsonl", [("What is 1 plus 1?", "3"), ("What is 2 plus 2?", "5")])
    calls = []
    replies = {"What is 1 plus 1?": "2", "What is 2 plus 2?": "   "}
    url = serve(make_chat_server(scripted(replies, calls), "teacher", "ef" * 16, SamplingParams(), port=0))
    run_refine(refine_cfg(tmp_path, answers, url))
    assert len(calls) == 2
    out = run_refine(refine_cfg(tmp_path, answers, url))
    assert [c.split("\n")[0] for c in calls[2:]] == ["What is 2 plus 2?"]  # only the unusable one again
    assert json.loads((out / "refine.json").read_text())["unusable_teacher_replies"] == 1


def test_chat_template_and_round_are_in_the_teacher_key_and_seed(tmp_path, tiny_model_dir, toy_chat):
    """#18.7: a rerun with another chat template made 0 teacher calls; rounds: 3 at temperature 1 gave the
    same revision in every round (same key and seed)."""
    answers = write_answers(tmp_path / "student.jsonl", [("What is 1 plus 1?", "3"), ("What is 2 plus 1?", "5")])
    values = {"output_dir": str(tmp_path / "out"), "responses": answers,
              "model.name_or_path": str(tiny_model_dir), "teacher.kind": "self",
              "teacher.sampling.max_new_tokens": 6, "teacher.sampling.temperature": 1.0,
              "reward.kind": "rule", "reward.rule": "toy", "bootstrap": 20, "quiet": True, "rounds": 3}
    out = run_refine(C.load(RefineConfig, None, values))
    records = read(out / "refinements.jsonl")
    assert json.loads((out / "refine.json").read_text())["teacher_calls_this_run"] == 6
    per_answer = [[r["revision"] for r in records if r["id"] == i] for i in (0, 1)]
    assert all(len(revs) == 3 for revs in per_answer) and any(len(set(revs)) > 1 for revs in per_answer)
    other = {**values, "model.chat_template": "{{- 'Q ' }}" + toy_chat.tokenizer.chat_template}
    out = run_refine(C.load(RefineConfig, None, other))
    assert json.loads((out / "refine.json").read_text())["teacher_calls_this_run"] == 6
    out = run_refine(C.load(RefineConfig, None, values))  # the first template again: all cached
    assert json.loads((out / "refine.json").read_text())["teacher_calls_this_run"] == 0
