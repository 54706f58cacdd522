"""SimPO, ORPO and KTO: the losses against hand-computed values and TRL, grad_accum independence,
no reference model for the reference-free ones, KTO's unpaired rows, and small learning runs."""

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, validate
from alignkit.data.schema import DataError
from alignkit.train import dpo as dpo_mod
from alignkit.train.dpo import (
    DPOConfig, DPOParams, kto_losses, kto_reference_point, log1mexp, mismatched_partners, orpo_losses,
    run_dpo, simpo_losses,
)
from alignkit.train.loop import read_metrics

T = torch.tensor


def logsig(x):
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------- pure losses, hand-computed


def test_simpo_hand_computed():
    # Averages: chosen -4/4 = -1, rejected -6/2 = -3; beta 2, gamma 1: z = 2 * (-1 + 3) - 1 = 3.
    loss, rc, rr = simpo_losses(T([-4.0]), T([-6.0]), T([4.0]), T([2.0]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(-logsig(3.0), rel=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((-2.0, -6.0))
    loss, *_ = simpo_losses(T([-4.0]), T([-6.0]), T([4.0]), T([2.0]), beta=2.0, gamma=1.0,
                            label_smoothing=0.1)
    assert loss.item() == pytest.approx(-0.9 * logsig(3.0) - 0.1 * logsig(-3.0), rel=1e-6)


def test_orpo_hand_computed():
    # Chosen: 2 tokens, mean log p = log 0.5 -> odds 1; rejected: 3 tokens, mean log p = log 0.2 -> odds 1/4.
    # Log odds ratio log 4; loss = NLL log 2 + 0.1 * -log sigmoid(log 4) = log 2 + 0.1 * log(5/4).
    pc, pr = T([2 * math.log(0.5)]), T([3 * math.log(0.2)])
    loss, rc, rr, log_odds = orpo_losses(pc, pr, T([2.0]), T([3.0]), lam=0.1)
    assert log_odds.item() == pytest.approx(math.log(4), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), rel=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.1 * math.log(0.5), 0.1 * math.log(0.2)), rel=1e-6)


def test_log1mexp_is_accurate_on_both_branches():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    x = T([-1e-7, -0.5, -math.log(2), -1.0, -40.0], dtype=torch.float64)
    expected = T([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-12, atol=0)


def test_kto_hand_computed():
    # r = [-1 - (-1.5), -2 - (-1)] = [0.5, -1]; z0 0.2, beta 0.5; weights 1 (desirable), 2 (undesirable).
    losses, rewards = kto_losses(T([-1.0, -2.0]), T([-1.5, -1.0]), T([True, False]), 0.2, 0.5, 1.0, 2.0)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - sig(0.5 * 0.3), 2 * (1 - sig(0.5 * 1.2))], rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.25, -0.5])
    assert kto_reference_point(0.6, 3) == pytest.approx(0.2)
    assert kto_reference_point(-0.4, 2) == 0.0  # a KL estimate below zero is floored


def test_kto_reference_point_gets_no_gradient():
    ratio = T([0.3, -0.2], requires_grad=True)
    kl = ratio.sum()  # even if handed a graph, z0 is detached
    losses, _ = kto_losses(ratio, T([0.0, 0.0]), T([True, False]), kl, 1.0)
    losses.sum().backward()
    sig = torch.sigmoid
    # z0 = 0.1: d/dr of 1 - sigmoid(r - z0) at r = 0.3, and of 1 - sigmoid(z0 - r) at r = -0.2.
    expected = [-(sig(T(0.2)) * (1 - sig(T(0.2)))).item(), (sig(T(0.3)) * (1 - sig(T(0.3)))).item()]
    assert ratio.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_mismatched_partners_are_a_derangement():
    for n in (2, 3, 17):
        p = mismatched_partners(n, seed=3)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    assert mismatched_partners(17, 3) == mismatched_partners(17, 3)


# --------------------------------------------------------------------------- agreement with TRL

POLICY_W = T([-12.0, -3.5, -40.0, -0.7])
POLICY_L = T([-15.0, -2.0, -38.0, -9.0])
TOKENS_W = T([6.0, 2.0, 20.0, 1.0])
TOKENS_L = T([5.0, 4.0, 16.0, 3.0])


def test_simpo_agrees_with_trl_cpo_trainer():
    cpo = pytest.importorskip("trl.experimental.cpo")
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.4, 0.1)):
        trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                                  loss_type="simpo", accelerator=SimpleNamespace(device="cpu"))
        # TRL's CPO with loss_type simpo takes token-averaged log-probs; cpo_alpha 0 adds no NLL term.
        theirs, their_rc, their_rr = cpo.CPOTrainer.cpo_loss(trainer, POLICY_W / TOKENS_W,
                                                             POLICY_L / TOKENS_L)
        ours, rc, rr = simpo_losses(POLICY_W, POLICY_L, TOKENS_W, TOKENS_L, beta, gamma, eps)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rc, their_rc)
        torch.testing.assert_close(rr, their_rr)


def test_orpo_odds_ratio_agrees_with_trl_orpo_trainer():
    orpo = pytest.importorskip("trl.experimental.orpo")
    trainer = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    theirs, their_rc, their_rr, _, their_log_odds = orpo.ORPOTrainer.odds_ratio_loss(
        trainer, POLICY_W / TOKENS_W, POLICY_L / TOKENS_L)
    ours, rc, rr, log_odds = orpo_losses(POLICY_W, POLICY_L, TOKENS_W, TOKENS_L, 0.25)
    # TRL's loss is nll - mean(beta * log sigmoid(log odds));
    # ours per pair is nll_i - beta * log sigmoid(log odds_i).
    nll = -(POLICY_W / TOKENS_W)
    torch.testing.assert_close(ours - nll, -theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_odds.mean(), their_log_odds)
    torch.testing.assert_close(rc, their_rc)
    torch.testing.assert_close(rr, their_rr)


class StubLM:
    """Stands in for a model in TRL's KTO loss: per-token log-probs are a fixed function of the token id."""

    training = True

    def __call__(self, input_ids, attention_mask, labels, **_):
        keep = labels[:, 1:] != -100
        logps = torch.where(keep, -0.1 * labels[:, 1:].clamp(min=0).float() - 0.05, torch.zeros(()))
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)

    def sequence_logps(self, input_ids, labels):
        return self(input_ids, None, labels).log_probs.sum(-1)


def test_kto_agrees_with_trl_kto_trainer():
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (6, 7), generator=g)
    kl_ids = torch.randint(1, 30, (6, 7), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0]] * 3 + [[0, 0, 0, 1, 1, 1, 1]] * 3)  # completion positions
    label = torch.tensor([True, False, True, True, False, False])
    ref, ref_kl = -torch.rand(6, generator=g) * 5, -torch.rand(6, generator=g) * 5 - 8
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": mask,
             "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
    model = StubLM()
    for beta, wd, wu in ((0.1, 1.0, 1.0), (0.5, 1.33, 0.8)):
        fake = SimpleNamespace(
            model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
            calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=wd,
            undesirable_weight=wu, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
            aux_loss_enabled=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        )
        fake._compute_kl_logps = lambda m, b, fake=fake: KTOTrainer._compute_kl_logps(fake, m, b)
        theirs = KTOTrainer._compute_loss(fake, model, batch, return_outputs=False)
        policy = model.sequence_logps(ids, ids.masked_fill(mask == 0, -100))
        policy_kl = model.sequence_logps(kl_ids, kl_ids.masked_fill(mask == 0, -100))
        z0 = kto_reference_point(float((policy_kl - ref_kl).sum()), 6)
        assert z0 > 0  # the test covers a reference point that moves the loss
        ours, _ = kto_losses(policy, ref, label, z0, beta, wd, wu)
        assert ours.mean().item() == pytest.approx(theirs.item(), rel=1e-6)
        assert fake._metrics["train"]["kl"][-1] == pytest.approx(z0, rel=1e-6)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def toy_prefs(tmp_path_factory):
    from alignkit.demo.world import write_preference_data

    return write_preference_data(tmp_path_factory.mktemp("prefs"), n_train=64, n_test=16)


def unpaired_rows(pairs_file) -> list[dict]:
    """Each toy pair as two KTO rows: the chosen reply desirable, the rejected one not (shuffled)."""
    rows = []
    for line in pairs_file.read_text().splitlines():
        r = json.loads(line)
        rows.append({"prompt": r["prompt"], "completion": r["chosen"][-1]["content"], "label": True})
        rows.append({"prompt": r["prompt"], "completion": r["rejected"][-1]["content"], "label": False})
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def toy_unpaired(tmp_path_factory, toy_prefs):
    d = tmp_path_factory.mktemp("unpaired")
    for split in ("train_prefs", "test_prefs"):
        rows = unpaired_rows(toy_prefs / f"{split}.jsonl")
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def cfg_for(out, model_dir, data_dir, dpo: dict, **train) -> DPOConfig:
    t = dict(max_steps=30, batch_size=8, learning_rate=1e-3, logging_steps=5, save_steps=None,
             precision="fp32", scheduler="constant", eval_steps=None)
    t.update(train)
    return DPOConfig(
        output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(dataset=str(data_dir), split="train_prefs", eval_split="test_prefs", max_examples=64,
                        max_eval_examples=16),
        train=TrainConfig(**t), dpo=DPOParams(**dpo),
    )


@pytest.fixture(scope="module")
def sharp_reference(tmp_path_factory, tiny_model_dir):
    """The tiny model with its final norm scaled x30: confident and wrong, so KTO's KL estimate is
    positive."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("sharp") / "model"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 30
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


LOSSES = {"simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
          "orpo": dict(loss_type="orpo", beta=0.2),
          "kto": dict(loss_type="kto", beta=0.1)}


def data_for(name, toy_prefs, toy_unpaired):
    return toy_unpaired if name == "kto" else toy_prefs


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_ignores_how_the_batch_is_split(tmp_path, tiny_model_dir, toy_prefs, toy_unpaired,
                                             sharp_reference, name):
    """Global batch of 8 as 1x8, 2x4 and 8x1 micro-batches: same losses, same weights."""
    from safetensors.torch import load_file

    runs = {}
    # KTO against another reference: its KL reference point is then positive and moves the loss.
    extra = {"ref_model": str(sharp_reference)} if name == "kto" else {}
    for bs, accum in [(8, 1), (4, 2), (1, 8)]:
        out = tmp_path / f"b{bs}"
        cfg = cfg_for(out, tiny_model_dir, data_for(name, toy_prefs, toy_unpaired), LOSSES[name] | extra,
                      max_steps=3, batch_size=bs, grad_accum=accum, logging_steps=1, eval_steps=3)
        run_dpo(cfg)
        runs[bs] = (read_metrics(out), load_file(out / "final" / "model.safetensors"))
    keys = ("loss", "rewards_chosen", "rewards_rejected") + (("kl",) if name == "kto" else ())
    for bs in (4, 1):
        assert len(runs[bs][0]) == len(runs[8][0]) == 4  # three steps and one evaluation (batches of bs)
        for a, b in zip(runs[bs][0], runs[8][0]):
            for k in keys + tuple(f"eval_{k}" for k in keys):
                if k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (bs, k)
        for k, v in runs[8][1].items():
            torch.testing.assert_close(runs[bs][1][k], v, rtol=1e-4, atol=5e-5)
    if name == "kto":
        # The reference point is not floored to 0.
        assert min(m.get("kl", m.get("eval_kl")) for m in runs[8][0]) > 0.1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_new_losses_learn_the_toy_preferences(tmp_path, tiny_model_dir, toy_prefs, toy_unpaired, name):
    cfg = cfg_for(tmp_path / "run", tiny_model_dir, data_for(name, toy_prefs, toy_unpaired), LOSSES[name],
                  max_steps=80, learning_rate=3e-3, eval_steps=80)
    run_dpo(cfg)
    logs = read_metrics(tmp_path / "run")
    train_logs = [m for m in logs if "loss" in m]
    first, last = train_logs[0], train_logs[-1]
    margin = lambda m, p="": m[p + "rewards_chosen"] - m[p + "rewards_rejected"]  # noqa: E731
    assert last["loss"] < first["loss"], (first, last)
    rise = {"orpo": 0.02}.get(name, 0.2)  # ORPO's rewards are 0.2 x mean log p
    assert margin(last) > max(margin(first), 0) + rise, (first, last)
    if name != "kto":
        # On the demo world's pairs of 2026-12-07 (near misses one word off: harder than the earlier
        # world's) 80 steps gave SimPO 0.85 or more and ORPO 0.65 (40 steps: both 0.725); ORPO's log-odds
        # check below is its learning test.
        assert last["reward_accuracy"] >= {"orpo": 0.6}.get(name, 0.85), (first, last)
        assert last["reward_accuracy"] > first["reward_accuracy"], (first, last)
    if name == "orpo":
        assert last["log_odds_ratio"] > first["log_odds_ratio"] + 0.1
    evals = [m for m in logs if "eval_loss" in m][-1]
    assert {"eval_rewards_chosen", "eval_rewards_rejected", "eval_logps_chosen"} <= set(evals)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_load_no_reference(tmp_path, tiny_model_dir, toy_prefs, monkeypatch, loss_type):
    loads = []
    real = dpo_mod.load_causal_lm
    monkeypatch.setattr(dpo_mod, "load_causal_lm",
                        lambda *a, **k: loads.append(k.get("path")) or real(*a, **k))

    def no_reference_pass(*a, **k):
        raise AssertionError("a reference pass ran")

    monkeypatch.setattr(dpo_mod, "reference_logps", no_reference_pass)
    monkeypatch.setattr(dpo_mod, "weights_digest", no_reference_pass)
    run_dpo(cfg_for(tmp_path / "run", tiny_model_dir, toy_prefs, {"loss_type": loss_type}, max_steps=2,
                    eval_steps=2))
    assert loads == [None]  # the policy only
    assert not (tmp_path / "run" / "ref_logps").exists()


def test_kto_caches_reference_log_probs_of_completions_and_mismatched_pairs(tmp_path, tiny_model_dir,
                                                                            toy_unpaired):
    cfg = cfg_for(tmp_path / "run", tiny_model_dir, toy_unpaired, {"loss_type": "kto"}, max_steps=1,
                  logging_steps=1)
    cfg.data.eval_split = None
    run_dpo(cfg)
    (cache,) = (tmp_path / "run" / "ref_logps").glob("*.json")
    cached = json.loads(cache.read_text())
    assert len(cached["completion"]) == len(cached["kl"]) == 64
    first = read_metrics(tmp_path / "run")[0]
    # Policy = reference at step 0: r = 0 and z0 = 0, so every row's loss is 1 - sigmoid(0).
    assert first["loss"] == pytest.approx(0.5, rel=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-7)


def test_kto_with_dropout_in_the_checkpoint_starts_at_the_reference(tmp_path, tiny_model_dir, toy_unpaired):
    """#19.1 for KTO: dropout off, so at step 0 r = 0 and z0 = 0 for every row (loss 1 - sigmoid(0))."""
    import shutil

    model = tmp_path / "dropout"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.1}))
    cfg = cfg_for(tmp_path / "run", model, toy_unpaired, {"loss_type": "kto"}, max_steps=1, logging_steps=1)
    cfg.data.eval_split = None
    run_dpo(cfg)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(0.5, rel=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-7)


def test_kto_live_reference_equals_cached_reference(tmp_path, tiny_model_dir, toy_unpaired, sharp_reference):
    runs = []
    for name, precompute in (("cached", True), ("live", False)):
        dpo = {"loss_type": "kto", "precompute_ref": precompute, "ref_model": str(sharp_reference)}
        cfg = cfg_for(tmp_path / name, tiny_model_dir, toy_unpaired, dpo, max_steps=3, logging_steps=1,
                      eval_steps=3)
        run_dpo(cfg)
        runs.append(read_metrics(tmp_path / name))
    assert not (tmp_path / "live" / "ref_logps").exists()
    assert len(runs[0]) == len(runs[1]) == 4
    for x, y in zip(*runs):
        for k in x:
            if k != "tokens_per_s":
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), k


# --------------------------------------------------------------------------- KTO rows and options


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Say hi", "completion": "hi", "label": True}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Say hi", "completion": "hi", "label": "yes"},
     "row 1: field 'label': expected true \\(desirable\\) or false"),
    ({"prompt": "Say hi", "completion": "hi", "label": 1}, "row 1: field 'label'"),
    ({"prompt": "Say hi", "completion": "", "label": False}, "row 1: field 'completion': empty"),
    ({"prompt": "Say hi", "completion": None, "label": False}, "row 1: field 'completion': missing"),
    ({"prompt": [{"role": "robot", "content": "x"}], "completion": "hi", "label": False},
     "row 1: field 'prompt\\[0\\].role'"),
])
def test_bad_kto_rows_name_line_and_field(tmp_path, bad, message):
    from alignkit.data.prepare import load_examples

    # Columns of mixed types do not load as one Arrow table; a JSON list of rows keeps each row as written.
    data = tmp_path / "d.json"
    data.write_text(json.dumps([GOOD, bad]))
    with pytest.raises(DataError, match=message):
        load_examples(DataConfig(dataset=str(data)), "unpaired", 0)


def test_kto_and_pair_data_mismatch_is_a_clear_error(tmp_path, tiny_model_dir, toy_prefs):
    unpaired = write(tmp_path / "u" / "train_prefs.jsonl", [GOOD, {**GOOD, "label": False}]).parent
    cfg = cfg_for(tmp_path / "run", tiny_model_dir, unpaired, {"loss_type": "sigmoid"})
    cfg.data.eval_split = None
    with pytest.raises(DataError, match="unpaired preference.*dpo.loss_type: kto"):
        run_dpo(cfg)
    text = write(tmp_path / "t" / "train_prefs.jsonl", [{"text": "plain"}]).parent
    cfg = cfg_for(tmp_path / "run", tiny_model_dir, text, {"loss_type": "kto"})
    cfg.data.eval_split = None
    with pytest.raises(DataError, match="KTO .* 'label' column, or on preference pairs; this dataset is"):
        run_dpo(cfg)
    assert not (tmp_path / "run").exists()


def test_kto_reads_preference_pairs_as_two_unpaired_rows(tmp_path, toy_prefs):
    from alignkit.data.prepare import load_examples

    cfg = DataConfig(dataset=str(toy_prefs), split="train_prefs", eval_split="test_prefs", max_examples=5)
    rows, evals = load_examples(cfg, "unpaired", 0)
    pairs, _ = load_examples(DataConfig(dataset=str(toy_prefs), split="train_prefs", max_examples=5),
                             "preference", 0)
    assert len(rows) == 10 and len(evals) == 32
    for pair, (chosen, rejected) in zip(pairs, zip(rows[::2], rows[1::2])):
        assert chosen == {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True,
                          "category": pair["category"]}
        assert rejected == {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False,
                            "category": pair["category"]}


def test_options_of_other_losses_are_refused():
    def check(**kw):
        return validate(DPOConfig(dpo=DPOParams(**kw)))

    check(loss_type="simpo", label_smoothing=0.1, simpo_gamma=1.0)
    check(loss_type="kto", desirable_weight=1.33)
    match = "dpo.dpop_lambda: 1.0 applies to loss_type sigmoid and ipo, not 'simpo'.*no reference"
    with pytest.raises(ConfigError, match=match):
        check(loss_type="simpo", dpop_lambda=1.0)
    with pytest.raises(ConfigError, match="dpo.ref_model"):
        check(loss_type="orpo", ref_model="some/model")
    with pytest.raises(ConfigError, match="dpo.desirable_weight: 2.0 applies to loss_type kto"):
        check(desirable_weight=2.0)
    with pytest.raises(ConfigError, match="dpo.undesirable_weight"):
        check(loss_type="kto", undesirable_weight=0.0)
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        check(loss_type="orpo", label_smoothing=0.1)


@pytest.mark.slow
def test_kto_two_processes_match_one(tmp_path, tiny_model_dir, toy_unpaired, sharp_reference):
    """KTO's reference point is reduced over processes: 2 processes x 4 rows train as 1 process x 4 x 2."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    common = ["dpo", "--model.name-or-path", str(tiny_model_dir), "--data.dataset", str(toy_unpaired),
              "--data.max-examples", "64", "--data.max-eval-examples", "16", "--dpo.loss-type", "kto",
              "--dpo.ref-model", str(sharp_reference), "--train.max-steps", "2", "--train.logging-steps", "1",
              "--train.eval-steps", "2", "--train.save-steps", "0", "--train.precision", "fp32",
              "--train.learning-rate", "1e-3", "--train.batch-size", "4", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "alignkit.cli", *common,
                          "--output-dir", str(tmp_path / "one"), "--train.grad-accum", "2"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "alignkit.cli"]
    two = subprocess.run([*launch, *common, "--output-dir", str(tmp_path / "two"), "--train.grad-accum", "1"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "kl", "rewards_chosen", "eval_loss", "eval_kl", "eval_rewards_chosen"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), k
    assert a[0]["kl"] > 0.1
