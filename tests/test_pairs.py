"""`alignkit pairs` (issue 22): each selection rule against hand-computed cases, the stage's outputs
satisfying their definitions (chosen scored above rejected, exact mix ratios, no identical sides, the
bottom-three rule), resume after a kill without paying twice, bad input stopped before any model call,
and a tiny pairs -> dpo pipeline."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit import generation
from alignkit.config import ConfigError, ModelConfig
from alignkit.data.prompts import PromptSource
from alignkit.data.schema import DataError
from alignkit.generation import SamplingParams
from alignkit.loops import pairs as P
from alignkit.loops.pairs import PairsConfig, run_pairs
from alignkit.rewards.backends import RewardConfig
from alignkit.rewards.toy import toy_reward

CALLS: list[str] = []
"""Responses scored by `by_length` (a test verifier), to count what a rerun pays for."""
STOP_AT: list[int] = []
"""When set, `by_length` raises KeyboardInterrupt (a kill) at that many calls."""


def by_length(prompt: str, response: str) -> float:
    """A test reward with many distinct values: the length of the answer."""
    CALLS.append(response)
    if STOP_AT and len(CALLS) >= STOP_AT[0]:
        raise KeyboardInterrupt
    return float(len(response.strip()))


LENGTH = RewardConfig(kind="rule", rule="tests.test_pairs:by_length", allow_python_verifier=True)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def text(side: list[dict]) -> str:
    assert len(side) == 1 and side[0]["role"] == "assistant"
    return side[0]["content"]


# --------------------------------------------------------------------------- the rules, by hand


def test_mix_count_rounds_half_up_and_mix_rows_are_exact_and_seeded():
    assert [P.mix_count(25, 0.1), P.mix_count(10, 0.2), P.mix_count(7, 0.5), P.mix_count(3, 0.0),
            P.mix_count(3, 1.0), P.mix_count(1000, 0.1)] == [3, 2, 4, 0, 3, 100]
    for n, mix in ((25, 0.1), (10, 0.2), (1000, 0.2), (7, 1.0)):
        rows = P.mix_rows(n, mix, seed=3)
        assert len(rows) == P.mix_count(n, mix) and rows == sorted(set(rows)) and all(0 <= k < n for k in rows)
    assert P.mix_rows(100, 0.2, 0) == P.mix_rows(100, 0.2, 0) != P.mix_rows(100, 0.2, 1)


def test_rejection_verdict():
    assert P.rejection_verdict("4", "5") is None
    assert P.rejection_verdict("4", " 4\n") == P.SAME_TEXT
    assert P.rejection_verdict("4", "5", 1.0, 0.0, require_agreement=True) is None
    assert P.rejection_verdict("4", "5", 0.0, 0.0, require_agreement=True) == P.DISAGREE  # a tie is no agreement
    assert P.rejection_verdict("4", "5", 0.0, 1.0, require_agreement=True) == P.DISAGREE
    assert P.rejection_verdict("4", "5", 0.0, 1.0, require_agreement=False) is None


def test_select_self_bottom_three_by_hand():
    texts = list("abcdefgh")
    scores = [0.9, 0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 0.7]
    # best: 0 (ties with 4, the earliest wins); the three lowest: 6 (0.0), 1 (0.1), 3 (0.2)
    drawn = {P.select_self(texts, scores, random.Random(s)) for s in range(200)}
    assert drawn == {(0, 6), (0, 1), (0, 3)}
    # min_gap 0.75: only 0.0 and 0.1 are far enough below 0.9
    assert {P.select_self(texts, scores, random.Random(s), 0.75) for s in range(100)} == {(0, 6), (0, 1)}
    assert P.select_self(texts, scores, random.Random(0), 1.0) == P.GAP
    assert P.select_self(["a", "b", "c"], [1.0, 1.0, 1.0], random.Random(0)) == P.TIE
    # a text equal to the chosen one (whitespace aside) is never the rejected one
    assert P.select_self(["x", " x ", "y"], [1.0, 0.0, 0.5], random.Random(0)) == (0, 2)
    # two samples: the other one, if lower
    assert P.select_self(["a", "b"], [0.0, 1.0], random.Random(0)) == (1, 0)


def test_select_self_draw_is_seeded_per_prompt():
    texts, scores = list("abcdefgh"), [0.9, 0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 0.7]
    one = [P.select_self(texts, scores, P.prompt_rng(0, f"prompt {k}")) for k in range(30)]
    assert one == [P.select_self(texts, scores, P.prompt_rng(0, f"prompt {k}")) for k in range(30)]
    assert one != [P.select_self(texts, scores, P.prompt_rng(1, f"prompt {k}")) for k in range(30)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", " a", "c", "dd", "e", "", "  "]), st.sampled_from([0.0, 0.5, 1.0, 2.0])),
                min_size=2, max_size=8), st.sampled_from([0.0, 0.5, 1.5]), st.integers(0, 5))
def test_select_self_always_satisfies_its_definition(samples, min_gap, seed):
    texts, scores = [t for t, _ in samples], [s for _, s in samples]
    picked = P.select_self(texts, scores, random.Random(seed), min_gap)
    usable = [k for k in range(len(texts)) if texts[k].strip()]  # an empty sample is never a side
    if isinstance(picked, str):
        assert picked in (P.TIE, P.GAP, P.EMPTY_TIE)
        assert picked != P.TIE or len(set(scores)) == 1
        assert picked != P.EMPTY_TIE or len({scores[k] for k in usable}) <= 1
        return
    c, r = picked
    top = max(scores[k] for k in usable)
    assert scores[c] == top and c == min(k for k in usable if scores[k] == top) and texts[r].strip()
    assert scores[c] > scores[r] and scores[c] - scores[r] >= min_gap and texts[c].strip() != texts[r].strip()
    eligible = sorted((k for k in usable if scores[k] < scores[c] and scores[c] - scores[k] >= min_gap
                       and texts[k].strip() != texts[c].strip()), key=lambda k: (scores[k], k))
    assert r in eligible[:3]


def test_select_best_worst_by_hand():
    assert P.select_best_worst(list("abcd"), [0.2, 0.9, 0.0, 0.0]) == (1, 2)  # worst tie: the earliest
    assert P.select_best_worst(list("abcd"), [0.9, 0.9, 0.0, 0.1]) == (0, 2)
    assert P.select_best_worst(list("ab"), [0.3, 0.3]) == P.TIE
    assert P.select_best_worst(list("ab"), [0.3, 0.1], min_gap=0.5) == P.GAP
    assert P.select_best_worst(["a", "a "], [0.3, 0.1]) == P.GAP  # never identical sides
    # An empty sample (a model may stop at once) is never a side: `alignkit dpo` refuses empty responses.
    assert P.select_best_worst(["a", "", "b", "c"], [0.9, 0.0, 0.1, 0.5]) == (0, 2)
    assert P.select_best_worst(["", "a", "b"], [0.9, 0.1, 0.1]) == P.EMPTY_TIE
    assert P.select_self(["a", " ", "b"], [1.0, 0.0, 1.0], random.Random(0)) == P.EMPTY_TIE
    assert P.select_self(["", "a", "b"], [1.0, 0.5, 0.0], random.Random(0)) == (1, 2)
    assert P.rejection_verdict("12", " ") == P.EMPTY


def test_refine_verdict_and_pair_row():
    assert P.refine_verdict("12", "13", 0.0, 1.0) is None
    assert P.refine_verdict("12", " 12", 0.0, 0.0) == P.NOT_REFINED
    assert P.refine_verdict("12", "13", 0.5, 0.5) == "revision not scored above the original"
    assert P.refine_verdict("12", "13", 0.5, 0.6, min_gap=0.2) == P.GAP
    row = P.pair_row([{"role": "user", "content": "q"}], "yes", "no", "policy", 3, 1.0, 0.0)
    assert row["chosen"] == [{"role": "assistant", "content": "yes"}] and row["category"] == "3"
    with pytest.raises(ValueError):
        P.pair_row([{"role": "user", "content": "q"}], "yes", " ", "policy")
    with pytest.raises(ValueError):
        P.pair_row([{"role": "user", "content": "q"}], "same", " same ", "policy")


def test_split_eval_is_exact():
    rows = [{"k": k} for k in range(40)]
    train, test = P.split_eval(rows, 0.1, 0)
    assert len(test) == 4 and len(train) == 36 and sorted(r["k"] for r in train + test) == list(range(40))
    assert P.split_eval(rows, 0.0, 0) == (rows, [])


# --------------------------------------------------------------------------- the stage on a tiny model


def self_config(out: Path, model: Path, data: Path, **kw) -> PairsConfig:
    base = dict(output_dir=str(out), mode="self", model=ModelConfig(name_or_path=str(model)),
                prompts=PromptSource(dataset=str(data), split="test", max_prompts=16),
                sampling=SamplingParams(max_new_tokens=6, seed=0), temperatures=[0.7, 1.5],
                samples_per_temperature=[2, 3], reward=LENGTH, batch_size=4, quiet=True)
    return PairsConfig(**{**base, **kw})


def check_pairs(rows: list[dict], score) -> None:
    for r in rows:
        chosen, rejected = text(r["chosen"]), text(r["rejected"])
        assert chosen.strip() != rejected.strip()
        q = r["prompt"][-1]["content"]
        assert score(q, chosen) == r["score_chosen"] and score(q, rejected) == r["score_rejected"]
        assert r["score_chosen"] > r["score_rejected"]


@pytest.mark.parametrize("mode", ["self", "best-worst"])
def test_self_and_best_worst_pairs_satisfy_their_definition(tmp_path, tiny_model_dir, toy_data_dir, mode):
    out = run_pairs(self_config(tmp_path / mode, tiny_model_dir, toy_data_dir, mode=mode, eval_share=0.2))
    card = json.loads((out / "card.json").read_text())
    train, cands = read(out / "dataset" / "train.jsonl"), read(out / "candidates.jsonl")
    test = read(out / "dataset" / "test.jsonl") if (out / "dataset" / "test.jsonl").exists() else []
    rows = train + test
    assert card["counts"]["prompts"] == 16 and card["counts"]["samples"] == 16 * 5 == len(cands)
    assert card["counts"]["pairs"] == len(rows) > 0 and card["counts"]["test"] == len(test) == P.mix_count(len(rows), 0.2)
    assert card["counts"]["pairs"] + card["counts"]["dropped"] == 16
    assert card["reward"].startswith("rule:tests.test_pairs:by_length") and card["policy"] == str(tiny_model_dir)
    check_pairs(rows, lambda q, a: float(len(a.strip())))
    by_prompt: dict[str, list[dict]] = {}
    for c in cands:
        by_prompt.setdefault(json.dumps(c["prompt"]), []).append(c)
    for r in rows:
        samples = by_prompt[json.dumps(r["prompt"])]
        scores = sorted(c["score"] for c in samples)
        assert r["score_chosen"] == scores[-1]
        eligible = sorted(c["score"] for c in samples if c["score"] < scores[-1]
                          and c["response"].strip() != text(r["chosen"]).strip())
        if mode == "self":
            assert r["score_rejected"] in eligible[:3]  # the bottom-three rule
        else:
            assert r["score_rejected"] == scores[0]
    ties = sum(len({c["score"] for c in s}) == 1 for s in by_prompt.values())
    assert card["dropped"].get(P.TIE, 0) == ties


def test_toy_verifier_ties_are_dropped_and_counted(tmp_path, tiny_model_dir, toy_data_dir):
    """A random model is never right: every prompt's samples all score 0, all dropped, and the stage says so."""
    cfg = self_config(tmp_path / "ties", tiny_model_dir, toy_data_dir, reward=RewardConfig(kind="rule", rule="toy"))
    with pytest.raises(DataError, match="no pair was made.*all samples tie"):
        run_pairs(cfg)
    assert not (tmp_path / "ties" / "card.json").exists()


def prefs_dir(tmp_path: Path, n: int = 25) -> Path:
    from alignkit.demo.world import write_preference_data

    return write_preference_data(tmp_path / "prefs", n_train=n, n_test=5)


def test_rejection_mix_is_exact_and_keeps_the_rest(tmp_path, tiny_model_dir):
    data = prefs_dir(tmp_path)
    original = read(data / "train_prefs.jsonl")
    for mix in (0.1, 0.2, 1.0):
        cfg = PairsConfig(output_dir=str(tmp_path / f"rs-{mix}"), mode="rejection", mix=mix,
                          model=ModelConfig(name_or_path=str(tiny_model_dir)),
                          prompts=PromptSource(dataset=str(data), split="train_prefs"),
                          sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=0), batch_size=8, quiet=True)
        out = run_pairs(cfg)
        rows, card = read(out / "dataset" / "train.jsonl"), json.loads((out / "card.json").read_text())
        assert len(rows) == len(original) == card["counts"]["dataset_rows"] == 25
        policy = [k for k, r in enumerate(rows) if r["origin"] == "policy"]
        assert len(policy) == card["counts"]["replaced"] == P.mix_count(25, mix) == card["counts"]["replacements_planned"]
        assert policy == P.mix_rows(25, mix, 0)
        for k, (r, o) in enumerate(zip(rows, original)):
            assert text(r["chosen"]) == o["chosen"][-1]["content"]
            assert text(r["rejected"]).strip() != text(r["chosen"]).strip()
            if k not in policy:
                assert text(r["rejected"]) == o["rejected"][-1]["content"]
        assert card["reward"] is None and card["parameters"]["mix"] == mix


def test_rejection_with_reward_agreement(tmp_path, tiny_model_dir):
    """The toy verifier scores every chosen answer 1 and a random model's samples 0: all kept. By length,
    a replacement is kept only when the chosen answer is longer than the sample."""
    data = prefs_dir(tmp_path, n=20)
    base = dict(mode="rejection", mix=1.0, require_reward_agreement=True, model=ModelConfig(name_or_path=str(tiny_model_dir)),
                prompts=PromptSource(dataset=str(data), split="train_prefs"),
                sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=0), batch_size=8, quiet=True)
    out = run_pairs(PairsConfig(output_dir=str(tmp_path / "toy"), reward=RewardConfig(kind="rule", rule="toy"), **base))
    card = json.loads((out / "card.json").read_text())
    assert card["counts"]["replaced"] == 20 and card["reward"].startswith("rule:toy")
    check_pairs(read(out / "dataset" / "train.jsonl"), toy_reward)
    out = run_pairs(PairsConfig(output_dir=str(tmp_path / "len"), reward=LENGTH, **base))
    rows, card = read(out / "dataset" / "train.jsonl"), json.loads((out / "card.json").read_text())
    cands = read(out / "candidates.jsonl")
    agree = [c["chosen_score"] > c["score"] for c in cands]
    assert card["counts"]["replaced"] == sum(agree) == sum(r["origin"] == "policy" for r in rows)
    refused = sum(v for k, v in card["dropped"].items() if k.startswith("replacement refused"))
    assert refused == 20 - sum(agree) and len(rows) == 20
    check_pairs([r for r in rows if r["origin"] == "policy"], lambda q, a: float(len(a.strip())))


def test_refine_mode_reads_a_refine_folder(tmp_path):
    folder = tmp_path / "refine"
    folder.mkdir()
    user = [{"role": "user", "content": "What is 2 plus 2?"}]
    responses = [
        {"id": 0, "sample": 0, "prompt": user, "response": "4", "refined": True, "score": 1.0, "original_score": 0.0},
        {"id": 1, "sample": 0, "prompt": user, "response": "5", "refined": False, "score": 0.0, "original_score": 0.0},
        {"id": 2, "sample": 0, "prompt": user, "response": "4 ", "refined": True, "score": 1.0, "original_score": 0.5},
    ]
    records = [{"id": 0, "sample": 0, "round": 1, "answer": "3"}, {"id": 1, "sample": 0, "round": 1, "answer": "5"},
               {"id": 2, "sample": 0, "round": 1, "answer": "4!"}, {"id": 2, "sample": 0, "round": 2, "answer": "x"}]
    (folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
    (folder / "refinements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "refine.json").write_text(json.dumps({"judge": "rule:toy:src=x"}))
    out = run_pairs(PairsConfig(output_dir=str(tmp_path / "pairs"), mode="refine", refine_dir=str(folder),
                                min_gap=0.6, quiet=True))
    rows, card = read(out / "dataset" / "train.jsonl"), json.loads((out / "card.json").read_text())
    assert [(text(r["chosen"]), text(r["rejected"])) for r in rows] == [("4", "3")]
    assert card["dropped"] == {P.NOT_REFINED: 1, P.GAP: 1} and card["reward"] == "rule:toy:src=x"
    (folder / "refinements.jsonl").write_text(json.dumps({"id": 0}) + "\n")
    with pytest.raises(DataError, match="refinements.jsonl: line 1"):
        run_pairs(PairsConfig(output_dir=str(tmp_path / "pairs2"), mode="refine", refine_dir=str(folder), quiet=True))


# --------------------------------------------------------------------------- resume


def test_a_killed_run_resumes_without_paying_twice(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    cfg = self_config(tmp_path / "run", tiny_model_dir, toy_data_dir, batch_size=1)  # chunks of 8 prompts
    real_write, real_generate = generation.write_results, generation.generate
    writes = []

    def killed_write(*a, **k):  # the process dies after the first chunk of the second pass is on disk
        writes.append(1)
        real_write(*a, **k)
        if len(writes) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(generation, "write_results", killed_write)
    with pytest.raises(KeyboardInterrupt):
        run_pairs(cfg)
    monkeypatch.setattr(generation, "write_results", real_write)
    generated = []

    def counting_generate(model, chat, prompts, params, *a, **k):
        generated.append((params.temperature, len(prompts)))
        return real_generate(model, chat, prompts, params, *a, **k)

    monkeypatch.setattr(generation, "generate", counting_generate)
    CALLS.clear()
    STOP_AT[:] = [70]  # killed again, mid-scoring: the first batch of 64 scores is in the cache
    with pytest.raises(KeyboardInterrupt):
        run_pairs(cfg)
    assert generated == [(1.5, 8)]  # only the second pass's missing chunk
    assert not (tmp_path / "run" / "card.json").exists()
    STOP_AT.clear()
    CALLS.clear()
    generated.clear()
    out = run_pairs(cfg)
    distinct = {(json.dumps(c["prompt"]), c["response"]) for c in read(out / "candidates.jsonl")}
    assert generated == [] and len(CALLS) == len(distinct) - 64  # no sample and no score paid twice
    CALLS.clear()
    fresh = run_pairs(self_config(tmp_path / "fresh", tiny_model_dir, toy_data_dir, batch_size=1))
    assert read(out / "dataset" / "train.jsonl") == read(fresh / "dataset" / "train.jsonl")  # resumed exactly


# --------------------------------------------------------------------------- bad input, before any model call


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("alignkit.models.load_causal_lm", refuse)
    monkeypatch.setattr(generation, "load_causal_lm", refuse, raising=False)


def test_bad_config_values_are_refused(tmp_path, toy_data_dir, no_model):
    base = dict(output_dir=str(tmp_path / "o"), prompts=PromptSource(dataset=str(toy_data_dir), split="test"),
                reward=LENGTH, quiet=True)
    cases = [
        (dict(mix=1.5, mode="rejection"), "mix: 1.5"),
        (dict(temperatures=[0.7], samples_per_temperature=[2, 3]), "same length"),
        (dict(temperatures=[0.7, 0.7], samples_per_temperature=[2, 3]), "distinct"),
        (dict(temperatures=[0.0], samples_per_temperature=[4]), "distinct numbers > 0"),
        (dict(temperatures=[0.7], samples_per_temperature=[1]), "at least 2"),
        (dict(min_gap=-1.0), "min_gap"),
        (dict(eval_share=1.0), "eval_share"),
        (dict(mode="refine"), "refine_dir is required"),
        (dict(mode="refine", refine_dir=str(tmp_path / "nowhere")), "no such refine output folder"),
        (dict(reward=RewardConfig(kind="hf")), "reward.model is required"),
        (dict(sampling=SamplingParams(n=2, temperature=1.0)), "sampling.n"),
        (dict(prompts=PromptSource(dataset=str(tmp_path / "missing.jsonl"))), "no such dataset"),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_pairs(PairsConfig(**{**base, **kw}))
    assert not (tmp_path / "o").exists()


def test_bad_data_is_refused_before_sampling(tmp_path, tiny_model_dir, toy_data_dir, no_model):
    chats = PromptSource(dataset=str(toy_data_dir), split="train")  # conversations, not pairs
    with pytest.raises(DataError, match="preference pairs need 'chosen' and 'rejected'"):
        run_pairs(PairsConfig(output_dir=str(tmp_path / "a"), mode="rejection", prompts=chats, quiet=True,
                              model=ModelConfig(name_or_path=str(tiny_model_dir))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl.*row 1|line 1"):
        run_pairs(PairsConfig(output_dir=str(tmp_path / "b"), mode="rejection", quiet=True,
                              prompts=PromptSource(dataset=str(bad)), model=ModelConfig(name_or_path=str(tiny_model_dir))))
    countdown = RewardConfig(kind="rule", rule="countdown")  # needs nums and target columns the toy rows lack
    with pytest.raises(ConfigError, match="prompt 1: verifier rule:countdown"):
        run_pairs(self_config(tmp_path / "c", tiny_model_dir, toy_data_dir, reward=countdown))


def test_cli_exits_2_on_a_bad_value(tmp_path, capsys):
    from alignkit.cli import main

    assert main(["pairs", "--mode", "self", "--prompts.dataset", str(tmp_path / "nope.jsonl"),
                 "--output-dir", str(tmp_path / "o")]) == 2


# --------------------------------------------------------------------------- end to end: pairs -> dpo


def test_pipeline_pairs_then_dpo(tmp_path, tiny_model_dir, toy_data_dir):
    from alignkit.pipeline import RunConfig, run_pipeline

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"""
run_dir: {tmp_path / 'run'}
stages:
  pairs:
    mode: best-worst
    model: {{name_or_path: "{tiny_model_dir}"}}
    prompts: {{dataset: "{toy_data_dir}", split: test, max_prompts: 12}}
    sampling: {{max_new_tokens: 6}}
    temperatures: [1.0]
    samples_per_temperature: [3]
    reward: {{kind: rule, rule: "tests.test_pairs:by_length"}}
    eval_share: 0.25
  dpo:
    model: {{name_or_path: "{tiny_model_dir}"}}
    data: {{dataset: "${{pairs.dataset}}", split: train, eval_split: test}}
    train: {{max_steps: 2, batch_size: 2, grad_accum: 1, precision: fp32, save_steps: null, eval_steps: 2,
             logging_steps: 1}}
""")
    from alignkit import config as config_lib

    with config_lib.granted(config_lib.Grants(allow_python_verifier=True)):
        run_pipeline(RunConfig(pipeline=str(pipe), quiet=True))
    run = tmp_path / "run"
    assert (run / "dpo" / "final").is_dir()
    record = json.loads((run / "pairs" / "stage.json").read_text())
    assert record["status"] == "done" and record["outputs"]["dataset"] == "dataset"
    metrics = read(run / "dpo" / "metrics.jsonl")
    assert any("eval_loss" in m for m in metrics)
    report = (run / "report" / "report.md").read_text()
    assert "## Preference pairs" in report and "best-worst" in report


# --------------------------------------------------------------------------- rounds (iterative DPO)


def test_self_improve_rounds(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    from alignkit import rounds as R
    from alignkit.config import DataConfig, TrainConfig
    from alignkit.report import write_report
    from alignkit.train.dpo import DPOConfig

    model = ModelConfig(name_or_path=str(tiny_model_dir))
    cfg = R.SelfImproveConfig(
        output_dir=str(tmp_path / "si"), model=model, rounds=2, quiet=True,
        pairs=self_config(tmp_path / "ignored", tiny_model_dir, toy_data_dir, mode="best-worst", temperatures=[1.0],
                          samples_per_temperature=[3], eval_share=0.25),
        dpo=DPOConfig(data=DataConfig(dataset="set-per-round"),
                      train=TrainConfig(max_steps=2, batch_size=2, grad_accum=1, precision="fp32", save_steps=None,
                                        logging_steps=1)),
        eval=R.RoundsEval(prompts=PromptSource(dataset=str(toy_data_dir), split="test", skip_prompts=16, max_prompts=8),
                          sampling=SamplingParams(max_new_tokens=6), reward=LENGTH, bootstrap=50))
    out = R.run_self_improve(cfg)
    summary = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    r1, r2 = summary["rounds"]
    assert r1["started_from"] == str(tiny_model_dir) and r2["started_from"] == r1["model"] == str(out / "round-1" / "dpo" / "final")
    for r in (r1, r2):
        assert r["wins"] + r["losses"] + r["ties"] == 8 and 0 <= r["sign_test_p"] <= 1 and r["pairs"] > 0
    pairs_model = yaml_load(out / "round-2" / "pairs" / "config.yaml")["model"]["name_or_path"]
    assert pairs_model == r1["model"]  # round 2 samples from round 1's model
    assert (out / "round-0" / "responses.jsonl").is_file()
    # a rerun finds every round done and runs nothing
    monkeypatch.setattr(R, "run_dpo", lambda *a, **k: pytest.fail("a finished round ran again"))
    monkeypatch.setattr(R, "run_pairs", lambda *a, **k: pytest.fail("a finished round ran again"))
    R.run_self_improve(cfg)
    with pytest.raises(ConfigError, match="different job.*rounds"):
        R.run_self_improve(replace(cfg, rounds=3))
    report = write_report(out, draw=False).read_text()
    assert "iterative (online) DPO" in report and "| 2 |" in report


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_rounds_refuse_bad_settings_before_any_model_call(tmp_path, toy_data_dir, no_model):
    from alignkit import rounds as R

    pairs = PairsConfig(prompts=PromptSource(dataset=str(toy_data_dir), split="test"), reward=LENGTH)
    for kw, message in ((dict(rounds=0), "rounds: 0"), (dict(pairs=replace(pairs, mode="refine", refine_dir=str(tmp_path))), "refine"),
                        (dict(eval=R.RoundsEval(reward=RewardConfig(kind="hf"))), "eval.reward.model")):
        with pytest.raises(ConfigError, match=message):
            R.run_self_improve(R.SelfImproveConfig(**{"output_dir": str(tmp_path / "x"), "pairs": pairs, **kw}))


# --------------------------------------------------------------------------- the reference recipes


def test_reference_recipes_load_offline(tmp_path):
    from alignkit import config as config_lib
    from alignkit.pipeline import read_pipeline
    from alignkit.stages import STAGES

    root = Path(__file__).resolve().parents[1] / "recipes"
    pipe = read_pipeline(root / "rs-dpo-qwen2.5-0.5b.yaml", run_dir=str(tmp_path / "rs"))
    stages = {s.name: s for s in pipe.stages}
    assert {stages[n].config.mix for n in ("pairs-rs10", "pairs-rs20")} == {0.1, 0.2}
    assert all(stages[n].config.mode == "rejection" for n in ("pairs-rs10", "pairs-rs20"))
    assert stages["dpo-rs10"].config.data.dataset == str(tmp_path / "rs" / "pairs-rs10" / "dataset")
    assert stages["dpo-rs20"].config.data.dataset == str(tmp_path / "rs" / "pairs-rs20" / "dataset")
    cfg = config_lib.load(STAGES["self-improve"].config, root / "self-improve-qwen2.5-0.5b.yaml")
    assert (cfg.rounds, cfg.pairs.mode, cfg.pairs.temperatures, cfg.pairs.samples_per_temperature) == (
        3, "self", [0.2, 0.7, 1.2], [2, 3, 3])
    assert sum(cfg.pairs.samples_per_temperature) == 8
