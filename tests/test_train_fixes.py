"""Fixes to the loop, checkpoints and command line from issues #12 and #13, each tested end to end."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from alignkit.train import checkpoint as ckpt
from alignkit.train.loop import read_metrics
from alignkit.train.sft import SFTConfig, run_sft

from .test_train import FakeMetric, Interrupt, sft_cfg


def interrupted_run(out, model_dir, data_dir, at, **train) -> SFTConfig:
    """A run killed after step `at`; returns its config (resume not yet set)."""
    cfg = sft_cfg(out, model_dir, data_dir, **train)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, callbacks=[Interrupt(at=at)])
    return cfg


def leave_a_mark(path):
    """Runs if (and only if) a checkpoint file is unpickled with arbitrary objects allowed."""
    Path(path).write_text("code from the checkpoint ran")


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (leave_a_mark, (self.marker,))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path, tiny_model_dir, toy_data_dir):
    """#13.1: an object hidden in optimizer.pt does not run on resume; resume stops with a clear error."""
    cfg = interrupted_run(tmp_path / "run", tiny_model_dir, toy_data_dir, at=3, max_steps=4, save_steps=2)
    step = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "pwned"
    opt = torch.load(step / "optimizer.pt", weights_only=True)
    opt["extra"] = Payload(marker)
    torch.save(opt, step / "optimizer.pt")
    cfg.resume = True
    with pytest.raises(ValueError, match=r"optimizer\.pt holds objects other than tensors.*leave_a_mark.*not loaded") as err:
        run_sft(cfg)
    assert not marker.exists()
    assert type(err.value).__name__ == "CheckpointError"  # one clear line from the command line
    # The RNG state is now plain values: loadable with no allowlist at all.
    rng = torch.load(step / "rng_state_0.pt", weights_only=True)
    assert rng["format"] == ckpt.RNG_FORMAT and isinstance(rng["numpy"]["key"], torch.Tensor)


def test_rng_state_of_older_checkpoints_still_loads(tmp_path):
    """#13.1: RNG files written before the format change (numpy arrays inside) load through numpy's allowlist only."""
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, tmp_path / "old.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_rng_state(tmp_path / "old.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with pytest.raises(ckpt.CheckpointError, match="numpy"):
        ckpt.safe_load(tmp_path / "old.pt")  # other files get no numpy allowance


def test_resumed_log_equals_an_uninterrupted_one_when_a_window_spans_the_checkpoint(tmp_path, tiny_model_dir, toy_data_dir):
    """#12.17: the logging window (sums, counts, tokens) is saved in the checkpoint and reopened on resume."""
    kw = dict(max_steps=8, save_steps=3, logging_steps=2, batch_size=16)  # step 3's sums sit in an open window
    run_sft(sft_cfg(tmp_path / "straight", tiny_model_dir, toy_data_dir, **kw))
    cfg = interrupted_run(tmp_path / "broken", tiny_model_dir, toy_data_dir, at=5, **kw)
    cfg.resume = True
    run_sft(cfg)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in resumed] == [2, 4, 6, 8]
    for a, b in zip(straight, resumed):
        a.pop("tokens_per_s"), b.pop("tokens_per_s")
        assert a == b


def test_a_refused_rerun_keeps_the_config_and_resume_checks_it(tmp_path, tiny_model_dir, toy_data_dir, caplog):
    """#12.24: config.yaml is written only once a run may start; --resume refuses changes that matter."""
    out = tmp_path / "run"
    run_sft(sft_cfg(out, tiny_model_dir, toy_data_dir, max_steps=2, save_steps=2))
    saved = (out / "config.yaml").read_text()
    other = sft_cfg(out, tiny_model_dir, toy_data_dir, max_steps=2, save_steps=2, learning_rate=1e-3)
    with pytest.raises(FileExistsError, match="--resume"):
        run_sft(other)
    assert (out / "config.yaml").read_text() == saved
    other.resume = True
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.003 -> 0.001.*Allowed to change on resume: .*train.max_steps"):
        run_sft(other)
    assert (out / "config.yaml").read_text() == saved
    longer = sft_cfg(out, tiny_model_dir, toy_data_dir, max_steps=3, save_steps=2, logging_steps=2)
    longer.resume = True
    with caplog.at_level(logging.INFO, logger="alignkit.train.loop"):
        run_sft(longer)
    assert "changed settings (allowed): train.logging_steps: 1 -> 2; train.max_steps: 2 -> 3" in caplog.text
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 3
    assert read_metrics(out)[-1]["step"] == 3


def test_greater_is_better_is_inferred_from_the_metric_name(tmp_path, tiny_model_dir, toy_data_dir, caplog):
    """#12 (also worth deciding): an accuracy-like metric keeps its highest value, not its lowest."""
    from alignkit.train.loop import higher_is_better

    assert not higher_is_better(TrainConfig(metric_for_best="eval_loss"))
    assert higher_is_better(TrainConfig(metric_for_best="eval_win_rate"))
    assert not higher_is_better(TrainConfig(metric_for_best="eval_win_rate", greater_is_better=False))
    cfg = sft_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, eval_split="test", max_steps=20, eval_steps=2,
                  early_stopping_patience=2, metric_for_best="eval_fake_accuracy")
    with caplog.at_level(logging.INFO, logger="alignkit.train.loop"):
        run_sft(cfg, callbacks=[Accuracy([0.2, 0.6, 0.4, 0.3, 0.1])])
    assert "best checkpoint by eval_fake_accuracy: higher is better (inferred from its name)" in caplog.text
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_loss" in m and "restored_from_step" not in m]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]
    best = tmp_path / "run" / "checkpoints" / "step-4"
    from safetensors.torch import load_file

    for k, v in load_file(str(best / "model.safetensors")).items():
        torch.testing.assert_close(load_file(str(tmp_path / "run" / "final" / "model.safetensors"))[k], v)


class Accuracy(FakeMetric):
    def on_evaluate(self, state, metrics, model):
        metrics["eval_fake_accuracy"] = self.values.pop(0)


def test_init_model_trailing_overrides_add_to_the_recipes(tmp_path):
    """#12.19: trailing key=value arguments extend the recipe's overrides; the later value of a key wins."""
    from alignkit.cli import parse
    from alignkit.models import parse_overrides

    recipe = tmp_path / "init.yaml"
    recipe.write_text("overrides:\n  - num_hidden_layers=2\n  - hidden_size=32\n")
    cfg = parse("init-model", ["--config", str(recipe), "hidden_size=64", "intermediate_size=128"])
    assert parse_overrides(cfg.overrides) == {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
    cfg = parse("init-model", ["--config", str(recipe), "--overrides", "vocab_size=10", "hidden_size=64"])
    assert parse_overrides(cfg.overrides) == {"vocab_size": 10, "hidden_size": 64}  # --overrides replaces, as every option does


def test_quiet_silences_the_reference_pass(tmp_path, tiny_model_dir, capsys):
    """#12.25: --quiet turns off the DPO reference log-prob progress bar."""
    from alignkit.demo.world import write_preference_data
    from alignkit.train.dpo import DPOConfig, run_dpo

    data = write_preference_data(tmp_path / "prefs", n_train=16, n_test=4)
    run_dpo(DPOConfig(output_dir=str(tmp_path / "run"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)),
                      data=DataConfig(dataset=str(data), split="train_prefs", eval_split="test_prefs"),
                      train=TrainConfig(max_steps=1, batch_size=8, grad_accum=1, save_steps=None, precision="fp32")))
    assert "reference log-probs" not in capsys.readouterr().err


def test_text_metrics_offers_only_the_data_options_it_honours(capsys):
    """#12.25: text-metrics --help lists no token limits or eval split it would ignore; setting one is an error."""
    from alignkit.cli import main, parse

    assert main(["text-metrics", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--data.first-turn-only" in out and "--data.max-examples" in out
    for ignored in ("--data.max-prompt-tokens", "--data.max-response-tokens", "--data.min-response-chars", "--data.eval-split", "--data.eval-ratio"):
        assert ignored not in out
    with pytest.raises(ConfigError, match="unknown option '--data.max-prompt-tokens'"):
        parse("text-metrics", ["--data.max-prompt-tokens", "64"])


# What `accelerate launch --num_processes 2 script` (accelerate 1.15, no GPU, no --multi_gpu) sets: one process, no WORLD_SIZE.
SINGLE_LAUNCHER_ENV = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_multi_process_launch_that_started_one_process_stops():
    """#12.25: accelerate's single-process launcher asked for 2 processes is refused with what to run instead."""
    from alignkit.train.loop import check_launch

    with pytest.raises(ConfigError, match=r"started one.*torchrun --nproc_per_node N.*--multi_gpu"):
        check_launch(SINGLE_LAUNCHER_ENV)
    check_launch(SINGLE_LAUNCHER_ENV | {"WORLD_SIZE": "2", "RANK": "0"})  # torchrun / --multi_gpu: fine
    check_launch({k: v for k, v in SINGLE_LAUNCHER_ENV.items() if not k.startswith("MASTER")})  # one process asked: fine
    check_launch({})


@pytest.mark.slow  # accelerate's launcher and alignkit's imports: about 10 s on two cores
def test_accelerate_launch_of_two_cpu_processes_is_refused(tmp_path):
    """#12.25: the real `accelerate launch --num_processes 2` on this machine ends with the message, not a lone run."""
    if torch.cuda.is_available():
        pytest.skip("with GPUs accelerate starts the processes itself")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "LOCAL_RANK")} | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alignkit.cli", "sft", "--output-dir", str(tmp_path / "run"),
           "--model.name-or-path", str(tmp_path / "no-model")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "torchrun --nproc_per_node N" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
