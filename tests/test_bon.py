"""#10 `alignkit bon`: best-of-N from prefix samples, deterministic choice, sweep rows, resume, early checks."""

import json
import os
from pathlib import Path

import pytest

from alignkit import config as C
from alignkit.config import ConfigError, ModelConfig
from alignkit.demo.task import solve, toy_reward
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.generation import PromptSource, SamplingParams
from alignkit.rewards.backends import RewardConfig
from alignkit.testtime.bon import BonConfig, BonParams, best_index, run_bon

from .conftest import read_jsonl

N_PROMPTS = 10
GRADED = RewardConfig(kind="rule", rule="tests.test_bon:prefix_match", allow_python_verifier=True)


def prefix_match(prompt: str, response: str) -> float:
    """A graded toy reward (loaded as 'tests.test_bon:prefix_match'): characters of the right answer the
    response starts with. Ties are common (0 for most wrong answers), so the tie-break is exercised."""
    return float(len(os.path.commonprefix([solve(prompt) or "", response.strip()])))


def needs_a_column(prompt: str, response: str, answer: str) -> float:
    """A verifier that needs the prompt row's `answer` column, which bon does not pass."""
    return float(response == answer)


def bon_cfg(out, model, data, temps, n_values, reference=None, reward=GRADED, **kw) -> BonConfig:
    return BonConfig(output_dir=str(out), model=ModelConfig(name_or_path=str(model)), bootstrap=200, batch_size=8,
                     prompts=PromptSource(dataset=str(data), split="test", max_prompts=N_PROMPTS),
                     sampling=SamplingParams(max_new_tokens=12, **kw), bon=BonParams(temps, n_values, reference),
                     reward=reward, quiet=True)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, trained_toy_model, toy_data_dir) -> Path:
    """Temperatures 0.7 and 1.5 x N 1, 2, 4 against the SFT model's greedy answers."""
    out = tmp_path_factory.mktemp("bon") / "sweep"
    run_bon(bon_cfg(out, trained_toy_model, toy_data_dir, [0.7, 1.5], [1, 2, 4], str(trained_toy_model)))
    return out


@pytest.fixture(scope="module")
def separate(tmp_path_factory, trained_toy_model, toy_data_dir) -> dict[int, Path]:
    """Best-of-N at temperature 1.5 as separate runs, one per N."""
    root = tmp_path_factory.mktemp("bon-separate")
    return {n: run_bon(bon_cfg(root / f"n{n}", trained_toy_model, toy_data_dir, [1.5], [n])) for n in (1, 2, 4)}


def test_sweep_prefix_samples_give_the_answers_of_separate_runs(sweep, separate):
    """#10: the sweep's prefix sampling gives the same chosen answers as separate runs at each N."""
    def chosen(path):
        return [(r["id"], r["response"], r["chosen_sample"]) for r in read_jsonl(path)]

    for n, out in separate.items():
        assert chosen(out / "responses.jsonl") == chosen(sweep / "best" / f"t1.5-n{n}.jsonl")
        assert len(read_jsonl(out / "candidates.jsonl")) == n * N_PROMPTS  # the separate run drew n samples
    assert len(read_jsonl(sweep / "candidates.jsonl")) == 2 * 4 * N_PROMPTS  # the sweep: 4 per temperature, once
    # The settings differ (else the comparison says nothing): a larger N picks another sample somewhere.
    assert any(r["chosen_sample"] > 0 for r in read_jsonl(separate[4] / "responses.jsonl"))


def test_chosen_is_the_argmax_with_the_lowest_index_on_ties(sweep):
    """#10: the best sample is kept; on tied scores the lowest sample index wins."""
    assert best_index([1.0, 3.0, 3.0, 2.0]) == 1 and best_index([0.0, 0.0]) == 0
    assert best_index([-1.0, 2.0]) == 1
    cands = read_jsonl(sweep / "candidates.jsonl")
    assert all(c["score"] == prefix_match(c["prompt"][-1]["content"], c["response"]) for c in cands)
    tied = 0
    for t in (0.7, 1.5):
        for n in (1, 2, 4):
            for row in read_jsonl(sweep / "best" / f"t{t:g}-n{n}.jsonl"):
                mine = [c for c in cands if c["temperature"] == t and c["id"] == row["id"]]
                mine.sort(key=lambda c: c["sample"])
                scores = [c["score"] for c in mine][:n]
                best = max(scores)
                assert row["chosen_sample"] == scores.index(best) and row["score"] == best
                tied += scores.count(best) > 1
    assert tied  # ties happened and were broken by index


def test_sweep_rows_match_counts_from_the_candidates(sweep):
    """#10: sweep.json (its exact schema) holds the wins/losses/ties computed by hand from candidates.jsonl."""
    result = json.loads((sweep / "sweep.json").read_text())
    assert set(result) == {"reference", "judge", "temperatures", "n_values", "rows", "reward_failures"}
    assert result["reward_failures"] == {"failed": 0, "calls": result["reward_failures"]["calls"]}  # #18.2
    assert result["temperatures"] == [0.7, 1.5] and result["n_values"] == [1, 2, 4]
    assert result["judge"].startswith("rule:tests.test_bon:prefix_match:src=")  # #18.2: the source digest
    ref = {json.dumps(r["prompt"]): prefix_match(r["prompt"][-1]["content"], r["response"])
           for r in read_jsonl(sweep / "reference" / "responses.jsonl")}
    cands = read_jsonl(sweep / "candidates.jsonl")
    assert [(r["temperature"], r["n"]) for r in result["rows"]] == [(t, n) for t in (0.7, 1.5) for n in (1, 2, 4)]
    for row in result["rows"]:
        assert set(row) == {"temperature", "n", "win_rate", "ci95", "win_rate_ties_half", "ci95_ties_half", "wins",
                            "losses", "ties", "sign_test_p", "non_tied_win_share", "ceiling", "mean_reward"}
        best = {}
        for c in cands:
            if c["temperature"] == row["temperature"] and c["sample"] < row["n"]:
                key = json.dumps(c["prompt"])
                best[key] = max(best.get(key, float("-inf")), c["score"])
        wins = sum(best[k] > ref[k] for k in best)
        losses = sum(best[k] < ref[k] for k in best)
        assert (row["wins"], row["losses"], row["ties"]) == (wins, losses, N_PROMPTS - wins - losses)
        assert row["win_rate"] == pytest.approx(wins / N_PROMPTS)
        ties = N_PROMPTS - wins - losses
        assert row["win_rate_ties_half"] == pytest.approx((wins + 0.5 * ties) / N_PROMPTS)
        assert row["non_tied_win_share"] == (wins / (wins + losses) if wins + losses else None)
        assert row["ceiling"] == pytest.approx(row["n"] / (row["n"] + 1))
        assert row["mean_reward"] == pytest.approx(sum(best.values()) / N_PROMPTS)
    table = (sweep / "sweep.md").read_text()
    assert "judge ceiling N/(N+1)" in table and "0.800" in table
    assert "N/(N+1) of the non-tied comparisons" in table


def test_chosen_answers_are_accepted_by_eval(tmp_path, sweep, separate):
    """#10: responses.jsonl works as `model:` in `alignkit eval`, which agrees with the sweep's row."""
    run_eval(EvalConfig(output_dir=str(tmp_path / "eval"), model=str(separate[4] / "responses.jsonl"),
                        reference=str(sweep / "reference" / "responses.jsonl"), reward=GRADED, bootstrap=200,
                        prompts=PromptSource(dataset="unused"), quiet=True))
    r = json.loads((tmp_path / "eval" / "winrate.json").read_text())
    rows = json.loads((sweep / "sweep.json").read_text())["rows"]
    row = next(x for x in rows if (x["temperature"], x["n"]) == (1.5, 4))
    assert r["n"] == N_PROMPTS
    assert (r["wins"], r["losses"], r["ties"]) == (row["wins"], row["losses"], row["ties"])
    assert r["win_rate"] == pytest.approx(row["win_rate"]) and r["ci95"] == pytest.approx(row["ci95"])


def test_resume_after_a_cut_run_and_a_changed_job_refused(tmp_path, trained_toy_model, toy_data_dir):
    """#10: a cut run resumes (kept samples are not redrawn); a different job stops, naming what changed."""
    from alignkit.cli import main

    out = tmp_path / "bon"
    args = ["bon", "--output-dir", str(out), "--model.name-or-path", str(trained_toy_model),
            "--prompts.dataset", str(toy_data_dir), "--prompts.split", "test", "--prompts.max-prompts", str(N_PROMPTS),
            "--sampling.max-new-tokens", "12", "--bon.temperatures", "1.0", "--bon.n-values", "3",
            "--reward.kind", "rule", "--reward.rule", "toy", "--quiet"]
    assert main(args) == 0
    samples = out / "samples" / "t1" / "responses.jsonl"
    first, chosen = samples.read_text().splitlines(), read_jsonl(out / "responses.jsonl")
    assert len(first) == 3 * N_PROMPTS
    assert all(r["score"] == toy_reward(r["prompt"][-1]["content"], r["response"]) for r in chosen)
    samples.write_text("\n".join(first[:10]) + "\n" + first[10][:20])  # cut mid-line after 3 prompts and a bit
    (out / "responses.jsonl").unlink()
    (out / "candidates.jsonl").unlink()
    assert main(args) == 0
    again = samples.read_text().splitlines()
    assert again[:9] == first[:9]  # the 3 complete prompts were kept, not redrawn
    assert sorted(map(json.loads, again), key=lambda r: (r["id"], r["sample"])) == list(map(json.loads, first))
    assert read_jsonl(out / "responses.jsonl") == chosen
    changed = bon_cfg(out, trained_toy_model, toy_data_dir, [1.0], [3], reward=RewardConfig(kind="rule"))
    changed.sampling.max_new_tokens = 8
    with pytest.raises(ConfigError, match=r"sampling\.max_new_tokens: 12 -> 8"):
        run_bon(changed)


def test_bad_settings_are_refused_before_any_work(tmp_path, trained_toy_model, toy_data_dir):
    """#10: N, temperatures, reference and reward are checked before anything is generated or written."""
    base = {"model.name_or_path": str(trained_toy_model), "prompts.dataset": str(toy_data_dir),
            "reward.kind": "rule", "output_dir": str(tmp_path / "out")}
    for bad, match in [({"bon.n_values": [4, 2]}, "ascending, distinct"),
                       ({"bon.n_values": [2, 2]}, "ascending, distinct"),
                       ({"bon.n_values": [0, 1]}, "integers >= 1"), ({"bon.temperatures": [-0.5]}, ">= 0"),
                       ({"bon.temperatures": [1.0, 1.0]}, "distinct"), ({"bon.temperatures": [0.0, 1.0]}, "greedy"),
                       ({"bon.temperatures": [0.5, 1.0]}, "bon.reference is required"),
                       ({"bon.reference": str(tmp_path / "nope.jsonl")}, "no such responses file"),
                       ({"sampling.n": 4, "sampling.temperature": 1.0}, "bon.n_values"),
                       ({"reward.kind": "hf"}, "reward.model is required")]:
        with pytest.raises(ConfigError, match=match):
            C.load(BonConfig, None, {**base, **bad})
    greedy = C.load(BonConfig, None, {**base, "bon.temperatures": [0.0], "bon.n_values": [1]})
    assert greedy.bon.temperatures == [0.0]  # best-of-1 greedy is allowed
    for rule, match in [("no-such-rule", "no-such-rule"),
                        ("tests.test_bon:needs_a_column", "needs the prompt row's column")]:
        cfg = C.load(BonConfig, None, {**base, "reward.rule": rule, "reward.allow_python_verifier": True})
        with pytest.raises(ConfigError, match=match):
            run_bon(cfg)
    assert not (tmp_path / "out").exists()


def test_the_sweep_recipe_loads():
    """#10: recipes/bon-sweep-qwen2.5-0.5b.yaml: DPO model, 4 samples at 0.25/0.6/1.0, against Instruct."""
    cfg = C.load(BonConfig, Path(__file__).resolve().parents[1] / "recipes" / "bon-sweep-qwen2.5-0.5b.yaml")
    assert cfg.model.name_or_path == "runs/dpo-qwen2.5-0.5b-ultrafeedback/final"
    assert cfg.bon.temperatures == [0.25, 0.6, 1.0] and max(cfg.bon.n_values) == 4
    assert cfg.bon.reference == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.reward.kind == "hf" and cfg.reward.model
    assert cfg.prompts.dataset == "HuggingFaceH4/ultrafeedback_binarized" and cfg.prompts.split == "test_prefs"
