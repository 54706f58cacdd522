"""A Bradley-Terry reward model: a scalar head trained so that r(x, y_w) > r(x, y_l).

Works on a causal LM checkpoint (prompt and response through its chat template, scored at the
last token) or on an encoder such as MiniLM (prompt and response as one text, scored from the
pooled output). The result is an ordinary `AutoModelForSequenceClassification` directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from .. import config as config_lib
from ..config import DataConfig, ModelConfig, TrainConfig
from ..data.collate import collate_pairs
from ..data.prepare import load_examples
from ..models import check_source
from ..rewards.inputs import flatten_prompt, is_causal_lm, load_reward_tokenizer, reward_input_ids  # noqa: F401 (re-exported)
from .loop import LossOutput, RunOptions, distributed_state, train

log = logging.getLogger(__name__)


def bradley_terry_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def rm_loss(model, batch) -> LossOutput:
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
    chosen, rejected = rewards.chunk(2)
    losses = bradley_terry_losses(chosen, rejected)
    margin = (chosen - rejected).detach()
    metrics = {
        "accuracy": (margin > 0).float().sum(),
        "reward_margin": margin.sum(),
        "rewards_chosen": chosen.detach().sum(),
        "rewards_rejected": rejected.detach().sum(),
    }
    return LossOutput(losses.sum(), len(losses), metrics, tokens=int(batch["attention_mask"].sum()))


def length_baseline(pairs: list[dict]) -> float:
    """Agreement of "the longer response wins" with the labels (ties count half)."""
    score = sum(1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"]) else 0.0 for p in pairs)
    return score / len(pairs)


def tokenize_pairs_for_rm(rows: list[dict], tokenizer, causal: bool, max_length: int) -> datasets.Dataset:
    def one(row):
        out = {"prompt_ids": []}
        for side in ("chosen", "rejected"):
            out[f"{side}_ids"] = reward_input_ids(tokenizer, causal, row["prompt"], row[side], max_length)
        return out

    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    return ds.map(one, remove_columns=["prompt", "chosen", "rejected"], desc="tokenise pairs")


def rm_data_defaults() -> DataConfig:
    return DataConfig(dataset="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", eval_split="test_prefs")


def rm_train_defaults() -> TrainConfig:
    return TrainConfig(learning_rate=1e-5, batch_size=8, grad_accum=4, warmup_ratio=0.03, scheduler="linear", save_steps=200)


@dataclass
class RMConfig:
    output_dir: str = "runs/rm"
    seed: int = 42
    resume: bool = False
    quiet: bool = False
    max_length: int = 1024
    """Tokens per scored sequence (prompt + response); longer ones are cut (causal: from the left)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=rm_data_defaults)
    train: TrainConfig = field(default_factory=rm_train_defaults)


def run_rm(cfg: RMConfig, callbacks=()) -> Path:
    out = Path(cfg.output_dir)
    source = check_source(cfg.model.name_or_path, "model")
    train_rows, eval_rows = load_examples(cfg.data, "preference", cfg.seed)
    chat, causal = load_reward_tokenizer(cfg.model)
    tokenizer = chat.tokenizer
    train_pairs = tokenize_pairs_for_rm(train_rows, tokenizer, causal, cfg.max_length)
    eval_pairs = tokenize_pairs_for_rm(eval_rows, tokenizer, causal, cfg.max_length) if eval_rows else None
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code, dtype=torch.float32
    )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id  # causal scorers find the last real token by it
    if distributed_state().is_main_process:
        config_lib.save(cfg, out / "config.yaml")
    log.info("reward model: %d training pairs, %d eval pairs", len(train_pairs), len(eval_pairs) if eval_pairs else 0)

    def save(model, _chat, path):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    train(
        model, chat, train_pairs, eval_pairs, partial(collate_pairs, pad_token_id=tokenizer.pad_token_id), rm_loss,
        cfg.train, RunOptions(out, cfg.seed, cfg.resume, cfg.quiet), list(callbacks), save_fn=save,
    )
    if eval_rows and distributed_state().is_main_process:
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
        summary = {"eval_accuracy": evals[-1]["eval_accuracy"], "length_baseline": length_baseline(eval_rows), "eval_pairs": len(eval_rows)}
        (out / "rm_eval.json").write_text(json.dumps(summary, indent=1))
        log.info("reward model: held-out accuracy %.3f; 'longer response wins' baseline %.3f (%d pairs)", summary["eval_accuracy"], summary["length_baseline"], len(eval_rows))
    return out
