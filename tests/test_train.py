"""The training loop and SFT: loss values, normalisation, resume, checkpoints, stopping."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.train.sft import SFTConfig
from alignkit.train import checkpoint as ckpt
from alignkit.train.loop import Callback, TrainingDiverged, read_metrics
from alignkit.train.sft import run_sft, token_nll


def sft_cfg(out, model_dir, data_dir, eval_split=None, **train) -> SFTConfig:
    base = dict(max_steps=6, batch_size=8, learning_rate=3e-3, logging_steps=1, save_steps=None, precision="fp32", warmup_steps=0, scheduler="linear")
    return SFTConfig(
        output_dir=str(out),
        seed=0,
        quiet=True,
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(dataset=str(data_dir), split="train", eval_split=eval_split),
        train=TrainConfig(**(base | train)),
    )


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_token_nll_hand_computed():
    # Vocabulary of 3; two sequences of 3 tokens; logits at t predict label t+1.
    logits = torch.log(torch.tensor([
        [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]],
        [[0.2, 0.2, 0.6], [0.7, 0.2, 0.1], [0.5, 0.5, 0.0 + 1e-9]],
    ]))
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 0]])
    total, count = token_nll(logits, labels)
    expected = -(math.log(0.25) + math.log(0.1)) - math.log(0.7)
    assert count.item() == 3
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_overfitting_a_few_examples_lowers_the_loss(tmp_path, tiny_model_dir, toy_data_dir):
    cfg = sft_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, max_steps=40, logging_steps=5, learning_rate=1e-2)
    cfg.data.max_examples = 8  # one batch, seen 40 times
    run_sft(cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < 0.2 * losses[0], losses
    rec = read_metrics(tmp_path / "run")[0]
    assert {"step", "epoch", "loss", "lr", "tokens_seen", "tokens_per_s", "grad_norm"} <= set(rec)
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_loss_normalisation_ignores_how_the_batch_is_split(tmp_path, tiny_model_dir, toy_data_dir):
    """Global batch of 8 as 1x8, 2x4 and 8x1 micro-batches: same losses, same weights."""
    runs = {}
    for bs, accum in [(8, 1), (4, 2), (1, 8)]:
        out = tmp_path / f"b{bs}"
        run_sft(sft_cfg(out, tiny_model_dir, toy_data_dir, max_steps=3, batch_size=bs, grad_accum=accum))
        runs[bs] = ([m["loss"] for m in read_metrics(out)], weights(out / "final"))
    for bs in (4, 1):
        assert runs[bs][0] == pytest.approx(runs[8][0], rel=1e-5)
        for k, v in runs[8][1].items():
            # Adam turns float rounding in near-zero gradients into ~1e-5 steps; a mean-of-means bug moves far more.
            torch.testing.assert_close(runs[bs][1][k], v, rtol=1e-4, atol=5e-5)


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, state, logs):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, toy_data_dir):
    kw = dict(max_steps=8, save_steps=3, epochs=1, batch_size=16)  # 128 examples: crosses an epoch boundary
    run_sft(sft_cfg(tmp_path / "straight", tiny_model_dir, toy_data_dir, **kw))
    cfg = sft_cfg(tmp_path / "broken", tiny_model_dir, toy_data_dir, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, callbacks=[Interrupt(at=5)])  # dies after step 5; newest checkpoint is step 3
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "broken" / "checkpoints")] == [3]
    # A half-written checkpoint from a crash must be ignored.
    half = tmp_path / "broken" / "checkpoints" / ".tmp-step-6"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FileExistsError, match="--resume"):
        run_sft(cfg)
    cfg.resume = True
    run_sft(cfg)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"] and a["tokens_seen"] == b["tokens_seen"]
    for k, v in weights(tmp_path / "straight" / "final").items():
        torch.testing.assert_close(weights(tmp_path / "broken" / "final")[k], v, rtol=1e-5, atol=1e-7)
    assert not half.exists()


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    import alignkit.train.sft as sft

    real = sft.sft_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] == 3:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*last good checkpoint is .*step-2"):
        run_sft(sft_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, save_steps=2))
    good = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert good.name == "step-2" and all(torch.isfinite(v).all() for v in weights(good).values())
    assert not (tmp_path / "run" / "final").exists()


class FakeMetric(Callback):
    """Drives early stopping with a known sequence of eval values."""

    def __init__(self, values):
        self.values = list(values)

    def on_evaluate(self, state, metrics, model):
        metrics["eval_fake"] = self.values.pop(0)


def test_early_stopping_restores_the_best_checkpoint(tmp_path, tiny_model_dir, toy_data_dir):
    from alignkit.train.sft import run_sft as run

    cfg = sft_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, eval_split="test", max_steps=20, eval_steps=2, save_total_limit=1, early_stopping_patience=2, metric_for_best="eval_fake", greater_is_better=False)
    run(cfg, callbacks=[FakeMetric([3.0, 1.0, 2.0, 4.0, 5.0, 6.0])])
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_loss" in m and "restored_from_step" not in m]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]  # stopped after two evaluations without improvement
    best = tmp_path / "run" / "checkpoints" / "step-4"
    assert best.is_dir()  # kept despite save_total_limit=1
    for k, v in weights(best).items():
        torch.testing.assert_close(weights(tmp_path / "run" / "final")[k], v)


def test_saved_model_reloads_with_plain_transformers_and_stops_at_end_of_turn(tmp_path, tiny_model_dir, toy_data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_sft(sft_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, max_steps=120, batch_size=16, learning_rate=1e-2, logging_steps=20))
    final = tmp_path / "run" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    # Prompts from the training file, the last three of each kind.
    train_rows = [json.loads(line) for line in (toy_data_dir / "train.jsonl").read_text().splitlines()]
    prompts = [r["messages"][0]["content"] for k in ("last", "count") for r in
               [r for r in train_rows if r["category"] == k][-3:]]
    stopped = 0
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
        stopped += out[-1] == im_end and len(out) < 30
    assert stopped == len(prompts)


def test_sft_on_real_tokenizer_and_shared_chats(tmp_path, tiny_qwen_dir):
    from .conftest import need_shared

    data = need_shared("data", "smoltalk_like")
    cfg = sft_cfg(tmp_path / "run", tiny_qwen_dir, data, eval_split="test", max_steps=2, batch_size=2, eval_steps=2)
    cfg.data.max_examples, cfg.data.max_eval_examples = 16, 4
    cfg.data.max_prompt_tokens, cfg.data.max_response_tokens = 256, 128
    run_sft(cfg)
    gen = json.loads((tmp_path / "run" / "final" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]  # <|im_end|> first, then the base model's <|endoftext|>
    assert any("eval_loss" in m for m in read_metrics(tmp_path / "run"))
