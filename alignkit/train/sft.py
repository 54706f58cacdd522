"""Supervised fine-tuning: the masked negative log-likelihood of the assistant tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import set_seed

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data.chat import IGNORE_INDEX
from ..data.collate import collate_lm
from ..data.prepare import load_examples, tokenize_conversations
from ..evaluate.callback import WinRateDuringTraining, win_rate_callbacks
from ..models import load_causal_lm, load_tokenizer
from .logprobs import label_logps
from .loop import LossOutput, RunOptions, train

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    output_dir: str = "runs/sft"
    seed: int = 42
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""
    quiet: bool = False
    """No progress bar; log lines only."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    win_rate: WinRateDuringTraining = field(default_factory=WinRateDuringTraining)
    """Win rate against a reference at every evaluation (off unless win_rate.reference is set)."""


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of -log p(label) over the positions whose label is not IGNORE_INDEX, and their count.

    logits[:, t] predicts labels[:, t + 1]; the shift happens here.
    The definition on full logits, hand-tested; training computes the same numbers from hidden
    states at labelled positions only (logprobs.label_logps, tested against this).
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def sft_loss(model, batch: dict) -> LossOutput:
    # token_nll(model(...).logits, labels), computed at the labelled positions only (logprobs.py).
    logps, mask = label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return LossOutput(-logps.sum(), int(mask.sum()), tokens=int(batch["attention_mask"].sum()))


def run_sft(cfg: SFTConfig, callbacks=()) -> Path:
    """Fine-tune cfg.model on cfg.data; return the run directory."""
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # before any model is built
    chat = load_tokenizer(cfg.model)
    train_rows, eval_rows = load_examples(cfg.data, "text", cfg.seed)  # chats, or plain text
    train_data = tokenize_conversations(train_rows, chat, cfg.data, "tokenise train")
    eval_data = tokenize_conversations(eval_rows, chat, cfg.data, "tokenise eval") if eval_rows else None
    log.info("SFT: %d training examples, %d eval examples", len(train_data), len(eval_data) if eval_data else 0)
    model = load_causal_lm(cfg.model, chat)
    callbacks = list(callbacks) + win_rate_callbacks(cfg.win_rate, chat, out)
    train(
        model,
        chat,
        train_data,
        eval_data,
        collate=partial(collate_lm, pad_token_id=chat.pad_id),
        loss_fn=sft_loss,
        cfg=cfg.train,
        run=RunOptions(out, cfg.seed, cfg.resume, cfg.quiet, config=cfg),
        callbacks=callbacks,
    )
    return out
