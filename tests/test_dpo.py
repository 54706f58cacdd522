"""DPO: the losses against hand-computed values and TRL, reference caching, and training."""

import json
import math
from collections import defaultdict

import pytest
import torch

from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.train.dpo import DPOConfig, DPOParams, batch_sequence_logps, beta_at, dpo_losses, run_dpo, sequence_logps
from alignkit.train.loop import read_metrics

from .conftest import need_shared, read_jsonl

T = torch.tensor


def losses(pc, pr, rc, rr, nc=1.0, nr=1.0, **kw):
    params = DPOParams(**kw)
    return dpo_losses(T([pc]), T([pr]), T([rc]), T([rr]), T([nc]), T([nr]), params)


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_and_rewards_hand_computed():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5; margin 1.5; beta 0.1.
    loss, rc, rr = losses(-1.0, -3.0, -2.0, -2.5, beta=0.1)
    assert loss.item() == pytest.approx(-logsig(0.15), rel=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.1, -0.05))
    loss, *_ = losses(-1.0, -3.0, -2.0, -2.5, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * logsig(0.15) - 0.2 * logsig(-0.15), rel=1e-6)


def test_ipo_loss_uses_per_token_log_ratios():
    # Per-token gap: 1/4 - (-0.5)/2 = 0.5; target 1/(2*0.5) = 1 -> (0.5 - 1)^2.
    loss, *_ = losses(-1.0, -3.0, -2.0, -2.5, nc=4, nr=2, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(0.25)


def test_length_normalisation_averages_log_probs():
    # Sums over 4 and 2 tokens; averaged ratios: 1/4 and -0.25 -> margin 0.5, beta 1.
    loss, rc, rr = losses(-1.0, -3.0, -2.0, -2.5, nc=4, nr=2, beta=1.0, length_normalize=True)
    assert loss.item() == pytest.approx(-logsig(0.5), rel=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.25, -0.25))


def test_clamp_limits_the_margin():
    loss, *_ = losses(0.0, -500.0, 0.0, 0.0, beta=1.0, clamp_margin=20.0)
    assert loss.item() == pytest.approx(-logsig(20.0), rel=1e-6)
    loss, *_ = losses(-500.0, 0.0, 0.0, 0.0, beta=1.0, clamp_margin=20.0)
    assert loss.item() == pytest.approx(-logsig(-20.0), rel=1e-6)


def test_dpo_positive_only_acts_below_the_reference():
    def grad_of_chosen(policy_chosen, lam):
        pc = T([policy_chosen], requires_grad=True)
        loss, *_ = dpo_losses(pc, T([-3.0]), T([-2.0]), T([-2.5]), T([1.0]), T([1.0]), DPOParams(beta=0.1, dpop_lambda=lam))
        loss.sum().backward()
        return loss.item(), pc.grad.item()

    # Above the reference (-1 > -2): the penalty is zero and gradients are DPO's.
    assert grad_of_chosen(-1.0, 5.0) == pytest.approx(grad_of_chosen(-1.0, 0.0))
    # Below it (-4 < -2): the loss grows by lambda * 2 and the gradient pushes chosen up by lambda more.
    (l5, g5), (l0, g0) = grad_of_chosen(-4.0, 5.0), grad_of_chosen(-4.0, 0.0)
    assert l5 - l0 == pytest.approx(10.0)
    assert g5 - g0 == pytest.approx(-5.0)


def test_kl_penalty_on_both_responses():
    loss, *_ = losses(-1.0, -3.0, -2.0, -2.5, beta=0.1, kl_lambda=0.4)
    base, *_ = losses(-1.0, -3.0, -2.0, -2.5, beta=0.1)
    assert loss.item() - base.item() == pytest.approx(0.4 * 0.5 * (1.0**2 + 0.5**2))


def test_beta_warmup_is_linear():
    p = DPOParams(beta=0.015, beta_warmup_steps=10)
    assert [beta_at(p, s) for s in (0, 4, 9, 50)] == pytest.approx([0.0015, 0.0075, 0.015, 0.015])
    assert beta_at(DPOParams(beta=0.1), 0) == 0.1


def test_sequence_logps_hand_computed():
    logits = torch.log(T([[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]]))
    labels = T([[-100, 1, 0]])
    logp, n = sequence_logps(logits, labels)
    assert n.item() == 2 and logp.item() == pytest.approx(math.log(0.5) + math.log(0.2), rel=1e-6)


def test_agrees_with_trl_on_real_pairs(tmp_path, tiny_qwen_dir, request):
    """Same tiny Qwen, same ultrafeedback pairs, same batch: TRL's DPO/IPO loss and ours agree."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data.chat import tokenize_reply
    from alignkit.models import init_model

    ref_dir = init_model(str(need_shared("models", "qwen2.5-0.5b")), tmp_path / "ref", overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, seed=1)
    # The four shortest pairs keep the 152k-vocabulary logits small enough for a CPU test.
    rows = sorted(read_jsonl(need_shared("data", "ultrafeedback_binarized", "test_prefs.jsonl")), key=lambda r: len(json.dumps(r)))[:4]
    ds = Dataset.from_list([{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows])
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], beta=0.1, max_length=None, use_cpu=True, bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    request.addfinalizer(lambda: __import__("accelerate").state.AcceleratorState._reset_state(True))  # TRL's accelerator state is not ours
    examples = [trainer.train_dataset[i] for i in range(4)]

    # Tokenisation: same prompt ids; TRL's reply also carries the template's newline after <|im_end|>.
    for r, ex in zip(rows, examples):
        prompt_ids, chosen_ids = tokenize_reply(tok, r["chosen"][:-1], r["chosen"][-1]["content"], "<|im_end|>")
        assert prompt_ids == ex["prompt_ids"]
        assert ex["chosen_ids"] == chosen_ids + tok("\n", add_special_tokens=False)["input_ids"]

    batch = trainer.data_collator(examples)
    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
    with torch.no_grad():  # the log-probs exactly as training computes them (labelled positions only)
        pol_logps, n = batch_sequence_logps(policy, ours_batch)
        ref_logps, _ = batch_sequence_logps(ref, ours_batch)
    pc, pr = pol_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    nc, nr = n.chunk(2)
    for loss_type in ("sigmoid", "ipo"):
        trainer.loss_types, trainer._metrics = [loss_type], {"train": defaultdict(list), "eval": defaultdict(list)}
        with torch.no_grad():
            theirs = trainer._compute_loss(trainer.model, batch, return_outputs=False).item()
        ours, *_ = dpo_losses(pc, pr, rc, rr, nc, nr, DPOParams(beta=0.1, loss_type=loss_type))
        assert ours.mean().item() == pytest.approx(theirs, rel=1e-4), loss_type
        logged = trainer._metrics["eval"]  # TRL's own sequence log-probabilities
        assert logged["logps/chosen"][-1] == pytest.approx(pc.mean().item(), rel=1e-4)
        assert logged["logps/rejected"][-1] == pytest.approx(pr.mean().item(), rel=1e-4)


def dpo_cfg(out, model_dir, data_dir, **kw) -> DPOConfig:
    train = dict(max_steps=30, batch_size=8, learning_rate=1e-3, logging_steps=5, save_steps=None, precision="fp32", scheduler="constant", eval_steps=15)
    train.update(kw.pop("train", {}))
    return DPOConfig(
        output_dir=str(out),
        seed=0,
        quiet=True,
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(dataset=str(data_dir), split="train_prefs", eval_split="test_prefs", max_examples=64, max_eval_examples=16),
        train=TrainConfig(**train),
        dpo=DPOParams(**kw),
    )


@pytest.fixture(scope="module")
def toy_prefs(tmp_path_factory):
    from alignkit.demo.world import write_preference_data

    return write_preference_data(tmp_path_factory.mktemp("prefs"), n_train=64, n_test=16)


def test_dpo_learns_the_preferences(tmp_path, tiny_model_dir, toy_prefs):
    run_dpo(dpo_cfg(tmp_path / "run", tiny_model_dir, toy_prefs, beta=0.1, train={"max_steps": 60, "learning_rate": 3e-3}))
    train_logs = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    first, last = train_logs[0], train_logs[-1]
    assert last["reward_accuracy"] >= 0.85 and last["reward_margin"] > 0.5, last
    assert last["loss"] < first["loss"] < math.log(2) + 0.05
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    assert {"eval_reward_accuracy", "eval_reward_margin", "eval_rewards_chosen", "eval_rewards_rejected", "eval_logps_chosen"} <= set(evals[-1])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_precomputed_reference_equals_live_reference(tmp_path, tiny_model_dir, toy_prefs):
    cached = dpo_cfg(tmp_path / "cached", tiny_model_dir, toy_prefs, train={"max_steps": 4, "logging_steps": 1})
    live = dpo_cfg(tmp_path / "live", tiny_model_dir, toy_prefs, precompute_ref=False, train={"max_steps": 4, "logging_steps": 1})
    run_dpo(cached)
    run_dpo(live)
    a, b = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "live")
    for x, y in zip(a, b):
        for k in x:
            if k not in ("tokens_per_s",):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), k
    cache_files = list((tmp_path / "cached" / "ref_logps").glob("*.json"))
    assert len(cache_files) == 2  # train and eval sets
    # A second run with the same reference and data reads the cache instead of recomputing.
    train_cache = next(f for f in cache_files if len(json.loads(f.read_text())["chosen"]) == 64)
    cache = json.loads(train_cache.read_text())
    cache["chosen"] = [c - 1.0 for c in cache["chosen"]]  # visible if (and only if) the cache is used
    train_cache.write_text(json.dumps(cache))
    again = dpo_cfg(tmp_path / "again", tiny_model_dir, toy_prefs, ref_cache_dir=str(tmp_path / "cached" / "ref_logps"), train={"max_steps": 1, "logging_steps": 1})
    run_dpo(again)
    # Policy = reference, so the first loss is log 2 unless the (edited) cache supplied the reference.
    assert a[0]["loss"] == pytest.approx(math.log(2))
    assert read_metrics(tmp_path / "again")[0]["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))), rel=1e-5)


def test_bad_preference_rows_stop_before_training(tmp_path, tiny_model_dir):
    from alignkit.data.schema import DataError

    (tmp_path / "train_prefs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n"
    )
    cfg = dpo_cfg(tmp_path / "run", tiny_model_dir, tmp_path)
    cfg.data.eval_split = None
    with pytest.raises(DataError, match="line 2: field 'chosen': identical to rejected"):
        run_dpo(cfg)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with attention_dropout 0.1 in its config (as some checkpoints ship)."""
    import shutil

    out = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.1}))
    return out


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_dropout_is_off_so_the_policy_starts_as_the_reference(tmp_path, dropout_model_dir, toy_prefs,
                                                               precompute_ref):
    """#19.1: with dropout in the checkpoint, step 0's policy log-probs equal the reference's (loss log 2)."""
    cfg = dpo_cfg(tmp_path / "run", dropout_model_dir, toy_prefs, precompute_ref=precompute_ref,
                  train={"max_steps": 1, "logging_steps": 1, "eval_steps": None})
    cfg.data.eval_split = None
    run_dpo(cfg)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # The option keeps the checkpoint's dropout: the policy then disagrees with the reference.
    cfg.output_dir, cfg.dpo.disable_dropout = str(tmp_path / "kept"), False
    run_dpo(cfg)
    assert abs(read_metrics(tmp_path / "kept")[0]["loss"] - math.log(2)) > 1e-4
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.1  # the checkpoint keeps the dropout it was given
