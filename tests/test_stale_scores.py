"""Stale or silently wrong scores (issue #18 items 1, 2, 2b, 7, 8, 10, 12, 13; #17.6, #17.7): the score
cache keys the verifier's code, never keeps a failure or a non-finite value, survives concurrent
writers; failing verifiers stop a stage; eval, best-of-N and refine sides draw independent noise."""

import importlib
import json
import sqlite3
import sys
import threading
import time

import pytest
import torch

from alignkit.config import ModelConfig
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.generation import PromptSource, SamplingParams
from alignkit.remote import SQLiteCache
from alignkit.rewards.backends import HFRewardModel, RewardConfig, RewardFailed, RuleReward, build_backend

from .conftest import read_jsonl

ASK = [{"role": "user", "content": "What is 2 plus 3?"}]
SEEN: list = []


def takes_columns(prompt, response, **columns):
    """The documented verifier form; records what it was given."""
    SEEN.append(sorted(columns))
    return float(len(response))


def explode(prompt, response):
    raise NameError("name 'answr' is not defined")


def explode_on_b(prompt, response):
    if response.startswith("b"):
        raise ValueError("cannot read it")
    return 1.0


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def responses_file(path, answers):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "response": a} for i, a in enumerate(answers)]
    return write(path, rows)


# --------------------------------------------------------------------------- the cache


def test_verifier_source_is_in_the_cache_identity(tmp_path, monkeypatch):
    """#18.2: after editing a module:function verifier, its cached scores are not served."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "myverifier.py").write_text("def score(prompt, response):\n    return 1.0\n")
    cfg = RewardConfig(kind="rule", rule="myverifier:score", allow_python_verifier=True)
    cache = tmp_path / "scores.sqlite"
    assert build_backend(cfg, cache).score([ASK], ["5"]) == [1.0]
    (tmp_path / "myverifier.py").write_text("def score(prompt, response):\n    return 2.0\n")
    sys.modules.pop("myverifier", None)
    importlib.invalidate_caches()
    again = build_backend(cfg, cache)
    assert again.score([ASK], ["5"]) == [2.0] and again.misses == 1
    assert ":src=" in again.identity and again.identity != RuleReward("toy").identity


def test_failures_are_never_cached_and_are_counted(tmp_path):
    """#18.2: a verifier crash scores 0.0 for that answer but is not stored; a rerun tries it again."""
    cfg = RewardConfig(kind="rule", rule="tests.test_stale_scores:explode_on_b", allow_python_verifier=True)
    answers = ["b"] + [f"a{i}" for i in range(10)]  # 1 failure in 11: under the default share 0.1
    backend = build_backend(cfg, tmp_path / "scores.sqlite")
    assert backend.score([ASK] * 11, answers) == [0.0] + [1.0] * 10
    rerun = build_backend(cfg, tmp_path / "scores.sqlite")
    assert rerun.score([ASK] * 11, answers) == [0.0] + [1.0] * 10
    assert rerun.misses == 1  # only the failure again
    assert (backend.backend.failures, backend.backend.scored) == (1, 11)
    assert (rerun.backend.failures, rerun.backend.scored) == (1, 11)  # the hits count as successful calls


def test_too_many_failures_stop_the_stage(tmp_path):
    """#18.2/2b: a verifier that fails on more than reward.max_failure_share of its calls stops the stage."""
    cfg = RewardConfig(kind="rule", rule="tests.test_stale_scores:explode", allow_python_verifier=True)
    for cache in (None, tmp_path / "scores.sqlite"):
        with pytest.raises(RewardFailed, match=r"failed on 3 of 3 .*max_failure_share 0.1.*NameError"):
            build_backend(cfg, cache).score([ASK] * 3, ["a", "b", "c"])
    share = RewardConfig(kind="rule", rule="tests.test_stale_scores:explode_on_b", allow_python_verifier=True,
                         max_failure_share=0.5)
    assert build_backend(share, None).score([ASK] * 2, ["a", "b"]) == [1.0, 0.0]  # 1 of 2: not more than half
    with pytest.raises(Exception, match="max_failure_share: 2 is not allowed"):
        build_backend(RewardConfig(kind="rule", rule="toy", max_failure_share=2), None)


def test_eval_counts_failures_and_stops_on_too_many(tmp_path):
    """#18.2: winrate.json and the report count the verifier's failures; a crashing verifier is an error,
    not 0/0/3 with exit 0. #18.10: the failed run leaves no earlier winrate.json beside its config."""
    a = responses_file(tmp_path / "a.jsonl", ["b0"] + [f"a{i}" for i in range(1, 6)])
    b = responses_file(tmp_path / "b.jsonl", ["a"] * 6)
    out = tmp_path / "eval"
    reward = RewardConfig(kind="rule", rule=f"{__name__}:explode_on_b", allow_python_verifier=True)
    run_eval(EvalConfig(output_dir=str(out), model=a, reference=b, reward=reward, bootstrap=50))
    result = json.loads((out / "winrate.json").read_text())
    assert result["reward_failures"] == {"failed": 1, "calls": 12}  # 12 distinct (prompt, answer); b0 failed
    report = (out / "report.md").read_text()
    assert "Verifier failures" in report and "1 of 12" in report
    from alignkit.report import write_report

    assert "the verifier failed on 1 of 12 answers" in write_report(tmp_path, draw=False).read_text()
    crash = RewardConfig(kind="rule", rule="tests.test_stale_scores:explode", allow_python_verifier=True)
    with pytest.raises(RewardFailed, match="failed on 12 of 12"):
        run_eval(EvalConfig(output_dir=str(out), model=a, reference=b, reward=crash, bootstrap=50))
    assert not (out / "winrate.json").exists() and not (out / "report.md").exists()  # #18.10: no stale result
    assert "explode" in (out / "config.yaml").read_text()


def test_a_verifier_taking_prompt_and_columns_gets_the_rows_own_prompt_column_once():
    """#18.2b: the demo's RL rows {"prompt": ..., "category": ...} and a verifier (prompt, response,
    **columns) raised TypeError (multiple values for 'prompt') on every call, every reward 0."""
    SEEN.clear()
    rule = RuleReward("tests.test_stale_scores:takes_columns", allow_python=True)
    rows = [{"prompt": "What is 2 plus 3?", "category": "add"},
            {"prompt": "x", "response": "y", "category": "add"}]
    assert rule.score([ASK, ASK], ["5", "555"], rows) == [1.0, 3.0]
    assert rule.failures == 0 and SEEN == [["category"], ["category"]]


def test_rl_on_the_demo_row_shape_scores_and_stops_on_a_crashing_verifier(tmp_path, tiny_model_dir):
    """#18.2b: rl with (prompt, response, **columns) on {"prompt", "category"} rows scores, and an
    always-failing verifier stops rl with an error (it trained on zeros and exited 0)."""
    from alignkit.train import rl
    from alignkit.train.loop import StepFailed

    from .test_rl import rl_cfg

    write(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus 1?", "category": "add"}
                                       for i in range(4)])
    SEEN.clear()
    cfg = rl_cfg(tmp_path / "ok", tiny_model_dir, tmp_path / "prompts.jsonl", rl=dict(k=2),
                 train=dict(max_steps=1, batch_size=2, metric_for_best=None))
    cfg.prompts = PromptSource(dataset=str(tmp_path / "prompts.jsonl"), split="train")
    cfg.reward = RewardConfig(kind="rule", rule=f"{__name__}:takes_columns", allow_python_verifier=True)
    rl.run_rl(cfg)
    assert SEEN and all(s == ["category"] for s in SEEN)
    cfg.output_dir = str(tmp_path / "crash")
    cfg.reward = RewardConfig(kind="rule", rule="tests.test_stale_scores:explode", allow_python_verifier=True)
    with pytest.raises(StepFailed, match="max_failure_share"):
        rl.run_rl(cfg)


def test_cached_values_must_be_finite_numbers(tmp_path):
    """#17.6: a shipped scores.sqlite with 9e999 (inf) or text is not trusted: each bad row is a miss."""
    backend = build_backend(RewardConfig(kind="rule", rule="toy"), tmp_path / "scores.sqlite")
    keys = [backend.key(ASK, r) for r in ("5", "6", "7")]
    db = sqlite3.connect(tmp_path / "scores.sqlite")
    rows = [(keys[0], 9e999), (keys[1], "oops"), (keys[2], 0.5)]
    db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", rows)
    db.commit()
    db.close()
    scores = backend.score([ASK] * 3, ["5", "6", "7"])
    assert scores == [1.0, 0.0, 0.5] and backend.misses == 2
    again = build_backend(RewardConfig(kind="rule", rule="toy"), tmp_path / "scores.sqlite")
    assert again.score([ASK] * 3, ["5", "6", "7"]) == scores
    assert again.misses == 0  # the rescored rows replaced the bad ones


class NaNModel(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(len(input_ids), 1)
        logits[-1] = float("nan")
        return type("Out", (), {"logits": logits})()


def test_a_local_reward_model_returning_nan_stops_even_without_a_cache(toy_chat):
    """#17.7: NaN from a local reward model gave 0/0/0 and mean nan with the cache off."""
    model = HFRewardModel.__new__(HFRewardModel)
    model.tokenizer, model.causal, model.device, model.model = toy_chat.tokenizer, False, "cpu", NaNModel()
    model.batch_size, model.max_length, model.identity = 4, 64, "hf:test-nan"
    with pytest.raises(RewardFailed, match=r"hf:test-nan returned a non-finite score \(nan\) for pair 2"):
        model.score([ASK, [{"role": "user", "content": "Say hi."}]], ["5", "hi there"])


def test_concurrent_writers_and_a_reader_share_one_cache(tmp_path):
    """#18.12: several writers and a long open read on one score cache ('database is locked' before)."""
    path = tmp_path / "scores.sqlite"
    SQLiteCache(path)
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM scores").fetchall()  # holds the file open for reading meanwhile
    errors, done = [], []

    def write(w):
        cache = SQLiteCache(path)
        cache.BUSY_TIMEOUT_S = 2.0
        try:
            for i in range(40):
                cache.store([(f"{w}-{i}", float(i))])
                cache.lookup([f"{w}-{i}"])
            done.append(w)
        except sqlite3.OperationalError as e:
            errors.append(str(e))

    start = time.monotonic()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    reader.rollback()
    reader.close()
    assert not errors and sorted(done) == [0, 1, 2, 3]
    assert len(SQLiteCache(path).lookup([f"{w}-{i}" for w in range(4) for i in range(40)])) == 160
    assert time.monotonic() - start < 15


# --------------------------------------------------------------------------- independent samples


def test_eval_sides_of_one_model_sample_independently(tmp_path, tiny_model_dir, toy_data_dir):
    """#18.8: A and B the same model at temperature 1 gave identical answer pairs (shared noise)."""
    out = tmp_path / "eval"
    run_eval(EvalConfig(output_dir=str(out), model=str(tiny_model_dir), reference=str(tiny_model_dir),
                        prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=6),
                        sampling=SamplingParams(temperature=1.0, max_new_tokens=8), bootstrap=20, quiet=True,
                        reward=RewardConfig(kind="rule", rule="toy")))
    rows = read_jsonl(out / "per_prompt.jsonl")
    assert len(rows) == 6 and sum(r["response_a"] != r["response_b"] for r in rows) >= 3


def test_bon_reference_of_the_same_model_is_not_sample_zero(tmp_path, tiny_model_dir, toy_data_dir):
    """#18.1: bon.reference = the same model at the same temperature was candidate 0 for every prompt."""
    from alignkit.testtime.bon import BonConfig, BonParams, run_bon

    out = tmp_path / "bon"
    run_bon(BonConfig(output_dir=str(out), model=ModelConfig(name_or_path=str(tiny_model_dir)), bootstrap=20,
                      quiet=True,
                      prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=6),
                      sampling=SamplingParams(temperature=1.0, max_new_tokens=8),
                      bon=BonParams([1.0], [2], str(tiny_model_dir)),
                      reward=RewardConfig(kind="rule", rule="toy")))
    sample0 = {c["id"]: c["response"] for c in read_jsonl(out / "candidates.jsonl") if c["sample"] == 0}
    reference = {r["id"]: r["response"] for r in read_jsonl(out / "reference" / "responses.jsonl")}
    assert len(reference) == 6 and sum(reference[i] != sample0[i] for i in reference) >= 3
