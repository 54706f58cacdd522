"""#8 SFT with a length penalty: the penalty, its baseline, the REINFORCE surrogate, the source in the
one loop (exact resume), validation, and a CI-sized run in which the penalty shortens samples."""

import json

import pytest
import torch

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, build, validate
from alignkit.data.chat import IGNORE_INDEX
from alignkit.generation import SamplingParams, generate
from alignkit.models import load_causal_lm, load_tokenizer
from alignkit.train import checkpoint as ckpt
from alignkit.train.loop import read_metrics
from alignkit.train.sft import (
    SFTConfig,
    SFTParams,
    penalty_coefficients,
    reference_reply_length,
    reply_length_penalty,
    run_sft,
)

from .test_train import Interrupt


def test_penalty_hand_computed():
    """#8: p_i = λ·max(0, len(sample_i) − len(reference_i))², in tokens."""
    sampled = torch.tensor([3.0, 7.0, 10.0, 4.0])
    reference = torch.tensor([5.0, 5.0, 6.0, 4.0])
    # shorter: 0; 2 over: 0.5·4 = 2; 4 over: 0.5·16 = 8; equal: 0
    assert reply_length_penalty(sampled, reference, 0.5).tolist() == [0.0, 2.0, 8.0, 0.0]
    assert reply_length_penalty(sampled, reference, 0.0).tolist() == [0.0] * 4


def test_leave_one_out_baseline_and_step_scaling_hand_computed():
    """#8: coefficient_i = (p_i − mean of the other penalties) · step units / n."""
    p = torch.tensor([0.0, 2.0, 8.0, 0.0])
    # baselines: (2+8+0)/3 = 10/3, (0+8+0)/3 = 8/3, (0+2+0)/3 = 2/3, 10/3
    centred = [0 - 10 / 3, 2 - 8 / 3, 8 - 2 / 3, 0 - 10 / 3]
    got = penalty_coefficients(p, step_units=40.0)
    assert got.tolist() == pytest.approx([c * 40 / 4 for c in centred])
    assert float(got.sum()) == pytest.approx(0.0, abs=1e-9)  # leave-one-out centring sums to zero
    assert penalty_coefficients(torch.tensor([3.0, 3.0, 3.0]), 10.0).tolist() == [0.0, 0.0, 0.0]  # equal penalties: no signal


def test_surrogate_gradient_equals_the_reinforce_formula():
    """#8: the gradient of Σ coef_i log π(y_i) / T is mean_i (p_i − b_i) ∇log π(y_i), the REINFORCE
    estimate of ∇E[p] with a leave-one-out baseline; on a softmax policy ∇_θ log π(y) = onehot(y) − π."""
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0], requires_grad=True)  # a policy over 4 "responses"
    ys = [0, 2, 2, 3]
    lengths = torch.tensor([2.0, 9.0, 9.0, 4.0])  # response y has these many tokens
    reference = torch.full((4,), 4.0)
    p = reply_length_penalty(lengths, reference, 0.1)  # [0, 2.5, 2.5, 0]
    step_units = 17.0
    coef = penalty_coefficients(p, step_units)
    logp = torch.log_softmax(theta, -1)
    surrogate = (coef * logp[ys]).sum() / step_units  # what the loop computes: loss_sum / units
    (grad,) = torch.autograd.grad(surrogate, theta)
    pi = torch.softmax(theta, -1).detach()
    b = [(sum(p.tolist()) - p[i].item()) / 3 for i in range(4)]  # [5/3, 5/6, 5/6, 5/3]
    expected = sum((p[i].item() - b[i]) * (torch.eye(4)[y] - pi) for i, y in enumerate(ys)) / 4
    torch.testing.assert_close(grad, expected)
    # Descending it lowers the probability of the long response (index 2) and raises the short ones.
    assert grad[2] > 0 and grad[0] < 0 and grad[3] < 0


def test_reference_reply_length_counts_the_first_trained_reply():
    """#8: the reference is the example's own first reply, end-of-turn included; later turns are not counted."""
    labels = [IGNORE_INDEX] * 3 + [11, 12, 2] + [IGNORE_INDEX] * 2 + [13, 2]
    assert reference_reply_length(labels, 3) == 3
    assert reference_reply_length([IGNORE_INDEX, 5, 6], 1) == 2


def test_validation_names_the_key_and_the_rejected_combination():
    """#8: λ >= 0, every >= 1, samples >= 1 (>= 2 with the penalty on: leave-one-out), temperature > 0."""
    assert validate(build(SFTConfig, {"sft.length_penalty": 0.01, "sft.length_penalty_samples": 4})).sft.length_penalty == 0.01
    for key, value, match in [
        ("sft.length_penalty", -0.1, "sft.length_penalty: -0.1 is not allowed"),
        ("sft.length_penalty_every", 0, "sft.length_penalty_every: 0 is not allowed"),
        ("sft.length_penalty_samples", 0, "sft.length_penalty_samples: 0 is not allowed"),
        ("sft.length_penalty_temperature", 0.0, "sft.length_penalty_temperature: 0.0 is not allowed"),
        ("sft.length_penalty_max_new_tokens", 0, "sft.length_penalty_max_new_tokens: 0 is not allowed"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate(build(SFTConfig, {key: value}))
    with pytest.raises(ConfigError, match="length_penalty_samples: 1 with sft.length_penalty 0.5.*at least 2"):
        validate(build(SFTConfig, {"sft.length_penalty": 0.5, "sft.length_penalty_samples": 1}))
    validate(build(SFTConfig, {"sft.length_penalty_samples": 1}))  # penalty off: any count is harmless


def penalty_cfg(out, model_dir, data_dir, penalty: SFTParams, **train) -> SFTConfig:
    base = dict(max_steps=6, batch_size=8, learning_rate=3e-3, logging_steps=1, save_steps=None, precision="fp32", warmup_steps=0,
                scheduler="linear")
    return SFTConfig(output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(model_dir)),
                     data=DataConfig(dataset=str(data_dir), split="train"), train=TrainConfig(**(base | train)), sft=penalty)


def test_samples_beyond_the_global_batch_are_refused(tmp_path, tiny_model_dir, toy_data_dir):
    """#8: the prompts come from the step's own rows, so there cannot be more than the global batch."""
    cfg = penalty_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, SFTParams(length_penalty=0.1, length_penalty_samples=9))
    with pytest.raises(ConfigError, match="length_penalty_samples: 9 is more than the global batch of 8"):
        run_sft(cfg)


def test_penalty_steps_log_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, toy_data_dir):
    """#8: the penalty is sampled on steps N, 2N, ...; it is logged; a kill/resume ends as an uninterrupted run."""
    pen = SFTParams(length_penalty=0.05, length_penalty_every=2, length_penalty_samples=4, length_penalty_max_new_tokens=8)
    kw = dict(max_steps=6, save_steps=3)
    run_sft(penalty_cfg(tmp_path / "straight", tiny_model_dir, toy_data_dir, pen, **kw))
    cfg = penalty_cfg(tmp_path / "broken", tiny_model_dir, toy_data_dir, pen, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, callbacks=[Interrupt(at=5)])  # dies after step 5 (a penalty step is 4); newest checkpoint is step 3
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "broken" / "checkpoints")] == [3]
    cfg.resume = True
    run_sft(cfg)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    penalised = [m["step"] for m in straight if "length_penalty" in m]
    assert penalised == [2, 4, 6]
    for m in straight:
        if "length_penalty" in m:
            assert 1 <= m["sampled_length"] <= 8 and m["reference_length"] > 1 and m["length_penalty"] >= 0
            assert m["loss"] != pytest.approx(m["sft_loss"], rel=1e-9)  # the surrogate is in the loss
        else:
            assert m["loss"] == pytest.approx(m["sft_loss"], rel=1e-9)
    for a, b in zip(straight, resumed):
        assert set(a) == set(b)
        for k in ("loss", "sft_loss", "length_penalty", "sampled_length", "reference_length", "grad_norm"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)


def signoff_data(src, dst, share: float = 0.5):
    """The toy chats with a chatty sign-off on every other reply (so on `share` of the rows)."""
    dst.mkdir()
    rows = [json.loads(line) for line in (src / "train.jsonl").read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if i % round(1 / share) == 0:
            r["messages"][1]["content"] += " Hope this helps! Have a great day!"
    (dst / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def greedy_length(model_dir, prompts) -> float:
    chat = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = load_causal_lm(ModelConfig(name_or_path=str(model_dir)), chat)
    outs = generate(model, chat, prompts, SamplingParams(max_new_tokens=48), batch_size=64)
    return sum(len(c[0].token_ids) for c in outs) / len(outs)


def test_penalty_shortens_responses(tmp_path, trained_toy_model, toy_data_dir):
    """#8 (CI-sized): from a terse toy SFT model, 16 SFT steps on chats half of which end in a long sign-off,
    without and with the length penalty (λ 0.01, 8 samples every step; same seed). Required: the mean
    greedy reply length on 64 training prompts is at most 3/4 of the run without (measured 17.1 -> 8.3
    tokens), and the penalty run logs its samples on every step."""
    data = signoff_data(toy_data_dir, tmp_path / "data")
    prompts = [json.loads(line)["messages"][:1] for line in (data / "train.jsonl").read_text().splitlines()][:64]
    lengths = {}
    for lam in (0.0, 0.01):
        pen = SFTParams(length_penalty=lam, length_penalty_every=1, length_penalty_samples=8, length_penalty_max_new_tokens=48)
        out = tmp_path / f"lambda-{lam}"
        run_sft(penalty_cfg(out, trained_toy_model, data, pen, max_steps=16, learning_rate=3e-3, scheduler="constant"))
        lengths[lam] = greedy_length(out / "final", prompts)
    assert lengths[0.01] <= 0.75 * lengths[0.0], lengths
    assert [m["step"] for m in read_metrics(tmp_path / "lambda-0.01") if "sampled_length" in m] == list(range(1, 17))


@pytest.mark.slow  # two torchrun processes: about 30 s on an idle 2-core machine
def test_penalty_two_processes_match_one(tmp_path, tiny_model_dir, toy_data_dir):
    """#8: with the penalty on, 1 process x 2 micro-batches and 2 processes x 1 give the same losses and
    penalty metrics (the baseline and the step's units are gathered over processes)."""
    import subprocess
    import sys

    from tests.test_distributed import free_port

    common = ["--model.name-or-path", str(tiny_model_dir), "--data.dataset", str(toy_data_dir), "--train.max-steps", "2",
              "--train.logging-steps", "1", "--train.save-steps", "0", "--train.precision", "fp32", "--train.learning-rate", "3e-3",
              "--sft.length-penalty", "0.05", "--sft.length-penalty-samples", "6", "--sft.length-penalty-max-new-tokens", "8",
              "--train.batch-size", "4", "--quiet"]
    cli = [sys.executable, "-m", "alignkit.cli", "sft"]
    one = subprocess.run(cli + common + ["--output-dir", str(tmp_path / "one"), "--train.grad-accum", "2"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "alignkit.cli", "sft"]
    two = subprocess.run(launch + common + ["--output-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("loss", "sft_loss", "length_penalty", "sampled_length", "reference_length", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
