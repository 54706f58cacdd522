"""Issue 19's defects in RL's learning signal, each with a test that failed before its fix
(dropout, normalisers, seeds of repeated prompts, padding of truncated samples, tied groups,
temperature of the log-probs, metrics, GSPO's aggregation, stop ids across engines)."""

import json
import math
import shutil

import pytest
import torch

from alignkit.train import rl
from alignkit.train.loop import read_metrics

from .test_rl import rl_cfg


def model_with(src, dst, **config):
    """A copy of a checkpoint with some config.json values changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --------------------------------------------------------------------------- 19.1 dropout


def test_dropout_is_off_so_the_first_ratio_of_a_batch_is_one(tmp_path, trained_toy_model, toy_data_dir):
    """With attention_dropout 0.1 the first optimizer step on a batch of samples (no update yet since
    sampling) has ratio 1: no clipping. rl.disable_dropout false keeps dropout (and the clipping)."""
    model = model_with(trained_toy_model, tmp_path / "dropout", attention_dropout=0.5)
    signal = rl.LengthPenalty("linear", 0.1)  # the toy reward may tie; lengths differ
    kw = dict(rl=dict(algo="grpo", num_iterations=2, epsilon=0.02, length_penalty=signal), train=dict(max_steps=1))
    rl.run_rl(rl_cfg(tmp_path / "off", model, toy_data_dir, **kw))
    assert read_metrics(tmp_path / "off")[0]["clip_fraction"] == 0
    kw["rl"]["disable_dropout"] = False
    rl.run_rl(rl_cfg(tmp_path / "on", model, toy_data_dir, **kw))
    assert read_metrics(tmp_path / "on")[0]["clip_fraction"] > 0.05
