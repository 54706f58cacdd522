"""Win rate against a reference, measured during training at every evaluation.

Adds `eval_win_rate` to the eval metrics, so `train.metric_for_best: eval_win_rate` with
`greater_is_better: true` and `early_stopping_patience` stops training when the win rate peaks
(one reference experiment found it peaking mid-training while the loss still fell). Used by the SFT,
DPO and RL trainers; the reference side comes from alignkit.responses, as eval's does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.loading import DataError
from ..data.prompts import PromptSource, load_prompts
from ..generation import GenerateConfig, SamplingParams, generate
from ..responses import prompt_key, responses_for
from ..rewards.backends import RewardConfig, build_backend
from ..winrate import outcomes
from .loop import Callback

log = logging.getLogger(__name__)


@dataclass
class WinRateDuringTraining:
    reference: str | None = None
    """Reference responses (.jsonl) or model; unset turns the measurement off."""
    prompts: PromptSource = field(default_factory=lambda: PromptSource(max_prompts=64))
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=256))
    reward: RewardConfig = field(default_factory=RewardConfig)
    batch_size: int = 16
    overwrite: bool = False
    """When <output_dir>/win_rate/reference holds responses generated for a different job (another
    reference model, prompts or sampling): false stops with an error naming what changed; true regenerates."""


class WinRateCallback(Callback):
    def __init__(self, cfg: WinRateDuringTraining, chat, output_dir: str | Path):
        self.cfg, self.chat = cfg, chat
        prompts = [p["messages"] for p in load_prompts(cfg.prompts)]
        # Reference responses once, through the loader/generator eval uses (kept on disk, reused only for
        # the same job: a changed reference model, prompt set or sampling stops or regenerates).
        job = GenerateConfig(output_dir=str(Path(output_dir) / "win_rate"), prompts=cfg.prompts,
                             sampling=replace(cfg.sampling, n=1), batch_size=cfg.batch_size,
                             overwrite=cfg.overwrite)
        reference = {prompt_key(r["messages"]): r["response"]
                     for r in responses_for(cfg.reference, "reference", job)}
        self.prompts = [p for p in prompts if prompt_key(p) in reference]
        if not self.prompts:
            raise DataError("win_rate.reference has no responses for the win_rate.prompts")
        self.backend = build_backend(cfg.reward, cfg.reward.cache_path(Path(output_dir) / "win_rate"))
        self.reference_rewards = self.backend.score(self.prompts, [reference[prompt_key(p)] for p in self.prompts])

    def on_evaluate(self, state, metrics, model) -> None:
        replies = [c[0].text for c in generate(model, self.chat, self.prompts, self.cfg.sampling, self.cfg.batch_size)]
        rewards = self.backend.score(self.prompts, replies)
        metrics["eval_win_rate"] = float(outcomes(rewards, self.reference_rewards).mean())
        metrics["eval_mean_reward"] = float(np.mean(rewards))


def win_rate_callbacks(cfg: WinRateDuringTraining, chat, output_dir: str | Path) -> list:
    """The win-rate callback for a training stage, or none when win_rate.reference is unset."""
    return [WinRateCallback(cfg, chat, output_dir)] if cfg.reference else []
