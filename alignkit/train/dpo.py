"""Direct preference optimisation (DPO) and its variants.

Read top to bottom: the pure loss functions, the reference log-probabilities (computed once,
cached on disk, then the reference model is released), and the stage itself.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import set_seed

from ..config import DataConfig, ModelConfig, TrainConfig
from ..data.chat import IGNORE_INDEX
from ..data.collate import collate_pairs
from ..data.prepare import load_examples, tokenize_pairs
from ..models import load_causal_lm, load_tokenizer
from ..evaluate.callback import WinRateDuringTraining, win_rate_callbacks
from .logprobs import label_logps, per_sequence
from .loop import LossOutput, RunOptions, distributed_state, to_device, train

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses (pure)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: sum of log p(label_t | prefix) over labelled positions, and their number.

    logits[:, t] predicts labels[:, t + 1].
    The definition on full logits, hand-tested; training computes the same numbers from hidden
    states at labelled positions only (logprobs.label_logps, tested against this).
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def batch_sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the model on a batch, computed at the labelled positions only (logprobs.py)."""
    return per_sequence(*label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))


@dataclass
class DPOParams:
    beta: float = 0.1
    """Strength of the implicit KL constraint (IPO: its tau)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: the DPO loss; ipo: the IPO squared loss on per-token log-ratios."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); sigmoid only."""
    dpop_lambda: float = 0.0
    """DPO-Positive: adds lambda * max(0, log pi_ref(y_w) - log pi(y_w))."""
    kl_lambda: float = 0.0
    """Adds lambda * (r_w^2 + r_l^2) / 2, r = log pi(y) - log pi_ref(y): a KL (k2) penalty on both responses."""
    length_normalize: bool = False
    """Average log-probabilities over response tokens instead of summing them."""
    clamp_margin: float | None = None
    """Clamp beta * (r_w - r_l) to +-this before the sigmoid (e.g. 20)."""
    beta_warmup_steps: int = 0
    """Raise beta linearly from beta/N to beta over the first N optimizer steps."""
    precompute_ref: bool = True
    """Compute reference log-probabilities once before training and free the reference model."""
    ref_model: str | None = None
    """Reference checkpoint; defaults to model.name_or_path."""
    ref_cache_dir: str | None = None
    """Where cached reference log-probabilities live; defaults to <output_dir>/ref_logps."""


def beta_at(params: DPOParams, step: int | None) -> float:
    if not params.beta_warmup_steps or step is None:
        return params.beta
    return params.beta * min(1.0, (step + 1) / params.beta_warmup_steps)


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    params: DPOParams,
    beta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * log-ratio of chosen and rejected.

    Inputs are summed sequence log-probabilities (shape [B]) and response token counts.
    """
    beta = params.beta if beta is None else beta
    if params.length_normalize:
        policy_chosen, ref_chosen = policy_chosen / chosen_tokens, ref_chosen / chosen_tokens
        policy_rejected, ref_rejected = policy_rejected / rejected_tokens, ref_rejected / rejected_tokens
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if params.loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        if params.clamp_margin is not None:
            z = z.clamp(-params.clamp_margin, params.clamp_margin)
        eps = params.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif params.loss_type == "ipo":
        # IPO regresses the per-token log-ratio gap onto 1/(2 tau) (as its authors and TRL do).
        if params.length_normalize:
            gap = chosen_ratio - rejected_ratio
        else:
            gap = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (gap - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {params.loss_type!r}")
    if params.dpop_lambda:
        losses = losses + params.dpop_lambda * torch.relu(ref_chosen - policy_chosen)
    if params.kl_lambda:
        losses = losses + params.kl_lambda * 0.5 * (chosen_ratio**2 + rejected_ratio**2)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_loss_fn(params: DPOParams, ref_model=None):
    """loss_fn(model, batch) for the training loop: one forward pass for chosen and rejected."""

    def loss_fn(model, batch) -> LossOutput:
        logps, tokens = batch_sequence_logps(model, batch)
        policy_chosen, policy_rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = batch_sequence_logps(ref_model, batch)[0].chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, params, beta_at(params, batch.get("step"))
        )
        margin = chosen_rewards - rejected_rewards
        metrics = {
            "rewards_chosen": chosen_rewards.sum(),
            "rewards_rejected": rejected_rewards.sum(),
            "reward_margin": margin.sum(),
            "reward_accuracy": (margin > 0).float().sum(),
            "logps_chosen": policy_chosen.detach().sum(),
            "logps_rejected": policy_rejected.detach().sum(),
        }
        return LossOutput(losses.sum(), len(losses), metrics, tokens=int(batch["attention_mask"].sum()))

    return loss_fn


# --------------------------------------------------------------------------- reference log-probabilities


@torch.no_grad()
def reference_logps(ref_model, pairs, collate, batch_size: int, progress: bool = True) -> tuple[list[float], list[float]]:
    """Sequence log-probabilities of chosen and rejected under the reference, sharded over processes."""
    from accelerate.utils import gather_object

    state = distributed_state()
    ref_model.to(state.device).eval()
    mine = list(range(state.process_index, len(pairs), state.num_processes))
    out: list[tuple[int, float, float]] = []
    for start in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", disable=not (progress and state.is_main_process)):
        idx = mine[start : start + batch_size]
        batch = to_device(collate([pairs[i] for i in idx]), state.device)
        chosen, rejected = batch_sequence_logps(ref_model, batch)[0].chunk(2)
        out += zip(idx, chosen.tolist(), rejected.tolist())
    if state.num_processes > 1:
        out = gather_object(out)
    by_index = {i: (c, r) for i, c, r in out}
    return [by_index[i][0] for i in range(len(pairs))], [by_index[i][1] for i in range(len(pairs))]


def weights_digest(model, source: str) -> str:
    """Identity of a model's weights (hashed once per run: it reads every parameter)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source.encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(ref_digest: str, pairs) -> str:
    """Identity of (reference weights, tokenised data): a change in either invalidates the cache."""
    h = hashlib.blake2b(digest_size=16)
    h.update(ref_digest.encode())
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        h.update(json.dumps(list(pairs[column])).encode())
    return h.hexdigest()


def add_reference_logps(pairs, ref_model, ref_digest: str, source: str, cache_dir: Path, collate, batch_size: int, progress: bool = True):
    """Attach ref_chosen_logps / ref_rejected_logps columns, from the cache when it has them."""
    key = cache_key(ref_digest, pairs)
    path = cache_dir / f"{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        log.info("reference log-probs: cache hit %s", path)
    else:
        chosen, rejected = reference_logps(ref_model, pairs, collate, batch_size, progress)
        cached = {"chosen": chosen, "rejected": rejected, "source": source}
        if distributed_state().is_main_process:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached))
            os.replace(tmp, path)
    return pairs.add_column("ref_chosen_logps", cached["chosen"]).add_column("ref_rejected_logps", cached["rejected"])


# --------------------------------------------------------------------------- the stage


def dpo_data_defaults() -> DataConfig:
    return DataConfig(dataset="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", eval_split="test_prefs")


def dpo_train_defaults() -> TrainConfig:
    return TrainConfig(learning_rate=1e-6, warmup_ratio=0.1, batch_size=4, grad_accum=8, save_steps=200, scheduler="linear")


@dataclass
class DPOConfig:
    output_dir: str = "runs/dpo"
    seed: int = 42
    resume: bool = False
    quiet: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy, normally the SFT model; also the reference unless dpo.ref_model is set."""
    data: DataConfig = field(default_factory=dpo_data_defaults)
    train: TrainConfig = field(default_factory=dpo_train_defaults)
    dpo: DPOParams = field(default_factory=DPOParams)
    win_rate: WinRateDuringTraining = field(default_factory=WinRateDuringTraining)
    """Win rate against a reference at every evaluation (off unless win_rate.reference is set)."""


def run_dpo(cfg: DPOConfig, callbacks=()) -> Path:
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # before any model is built
    chat = load_tokenizer(cfg.model)
    train_rows, eval_rows = load_examples(cfg.data, "preference", cfg.seed, dpo_data_defaults().eval_split)
    train_pairs = tokenize_pairs(train_rows, chat, cfg.data, "tokenise train pairs")
    eval_pairs = tokenize_pairs(eval_rows, chat, cfg.data, "tokenise eval pairs") if eval_rows else None
    collate = partial(collate_pairs, pad_token_id=chat.pad_id)
    ref_source = cfg.dpo.ref_model or cfg.model.name_or_path
    ref_model = load_causal_lm(cfg.model, chat, path=ref_source)
    ref_model.requires_grad_(False)
    model = None
    if cfg.dpo.precompute_ref:
        cache_dir = Path(cfg.dpo.ref_cache_dir) if cfg.dpo.ref_cache_dir else out / "ref_logps"
        digest = weights_digest(ref_model, ref_source)
        train_pairs = add_reference_logps(train_pairs, ref_model, digest, ref_source, cache_dir, collate, cfg.train.batch_size, not cfg.quiet)
        if eval_pairs is not None:
            eval_pairs = add_reference_logps(eval_pairs, ref_model, digest, ref_source, cache_dir, collate, cfg.train.batch_size, not cfg.quiet)
        if ref_source == cfg.model.name_or_path:
            model = ref_model.requires_grad_(True)  # same checkpoint: the policy starts as the reference, no second load
        ref_model = None  # training holds one model from here on
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        ref_model.to(distributed_state().device).eval()
    log.info("DPO: %d training pairs, %d eval pairs", len(train_pairs), len(eval_pairs) if eval_pairs else 0)
    if model is None:
        model = load_causal_lm(cfg.model, chat)
    callbacks = list(callbacks) + win_rate_callbacks(cfg.win_rate, chat, out)
    train(model, chat, train_pairs, eval_pairs, collate, dpo_loss_fn(cfg.dpo, ref_model), cfg.train, RunOptions(out, cfg.seed, cfg.resume, cfg.quiet, config=cfg), callbacks)
    return out
