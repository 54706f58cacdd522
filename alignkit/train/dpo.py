"""Direct preference optimisation (DPO) and its variants, reference-free SimPO and ORPO, and KTO.

Read top to bottom: the pure loss functions, the reference log-probabilities (computed once,
cached on disk, then the reference model is released), KTO's per-step KL reference point, and the
stage itself. SimPO and ORPO load no reference model and run no reference pass. KTO trains on
unpaired rows (prompt, completion, desirable or not) through the same loop: its data source adds,
at each optimizer step, the KL reference point of the whole step.

Simplifications: KTO's KL reference point is estimated from mismatched (prompt, completion) pairs
fixed once per dataset (each row's prompt with another row's completion, a seeded derangement), so
the reference log-probabilities of those pairs can be cached too, and it is the mean over the whole
optimizer step (all micro-batches and processes), so it does not depend on grad_accum; TRL pairs
rows within each micro-batch and averages there. At evaluation it is the mean over the whole eval set.
ORPO's NLL term is the mean over the chosen reply's tokens of each pair (TRL's also covers the
prompt tokens, averaged over the batch's tokens).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
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
from ..data.collate import collate_pairs, collate_unpaired
from ..data.loading import DataError
from ..data.prepare import load_examples, tokenize_pairs, tokenize_unpaired
from ..models import AdaptersOff, disable_dropout, load_causal_lm, load_tokenizer, with_lora
from .winrate_callback import WinRateDuringTraining, win_rate_callbacks
from .logprobs import label_logps, per_sequence
from .loop import (ExampleSource, LossOutput, RunOptions, StepPlan, check_plan, distributed_state, make_plan,
                   to_device, train)

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
    return per_sequence(*label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     position_ids=batch.get("position_ids")))


REFERENCE_FREE = ("simpo", "orpo")
"""Losses that need no reference model: none is loaded and no reference pass runs."""
UNPAIRED = ("kto",)
"""Losses trained on unpaired rows (prompt, completion, label) instead of preference pairs."""


@dataclass
class DPOParams:
    beta: float = 0.1
    """Strength of the implicit KL constraint (IPO: its tau; SimPO: the reward scale, which its paper
    tunes per model in 2 to 10; ORPO: the weight lambda of the odds-ratio term, TRL's default 0.1;
    KTO: its beta)."""
    loss_type: Literal["sigmoid", "ipo", "simpo", "orpo", "kto"] = "sigmoid"
    """sigmoid: the DPO loss; ipo: the IPO squared loss on per-token log-ratios; simpo: SimPO's
    length-normalised margin with target margin simpo_gamma (no reference model); orpo: SFT loss on
    chosen plus beta x ORPO's odds-ratio loss (no reference model); kto: KTO on unpaired rows
    ('prompt', 'completion', boolean 'label')."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); sigmoid and simpo only."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (its paper tunes gamma / beta per model, below 1); simpo only."""
    desirable_weight: float = 1.0
    """KTO: weight of the desirable rows' losses (raise it when they are the fewer)."""
    undesirable_weight: float = 1.0
    """KTO: weight of the undesirable rows' losses. KTO's paper keeps (desirable_weight x desirable rows) /
    (undesirable_weight x undesirable rows) in [1, 4/3]; the run logs a warning outside it."""
    disable_dropout: bool = True
    """Set every dropout probability of the policy and the reference to 0 (TRL's default), so the policy
    at step 0 gives the reference's log-probabilities; false keeps the checkpoint's dropout."""
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


def simpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma).

    Reference-free: the implicit reward is beta times the log-probability averaged over the response's
    tokens. Returns per-pair losses and the rewards of chosen and rejected. label_smoothing as in DPO.
    """
    chosen = policy_chosen / chosen_tokens
    rejected = policy_rejected / rejected_tokens
    z = beta * (chosen - rejected) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024): NLL of the chosen reply plus lam * -log sigmoid(log odds ratio).

    With p = exp(mean log pi(y)) per response (the token-averaged likelihood, as the paper and TRL),
    odds(y) = p / (1 - p) and the log odds ratio is log odds(y_w) - log odds(y_l). The NLL is the mean
    over the chosen reply's tokens. Returns per-pair losses, the rewards lam * mean log pi(y) of chosen
    and rejected (TRL's), and the log odds ratios.
    """
    chosen = policy_chosen.float() / chosen_tokens
    rejected = policy_rejected.float() / rejected_tokens
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    losses = -chosen - lam * F.logsigmoid(log_odds)
    return losses, lam * chosen.detach(), lam * rejected.detach(), log_odds.detach()


def kto_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7): per-row losses and implicit rewards beta * r.

    r = log pi(y|x) - log pi_ref(y|x) (summed over the completion); z0 = `kl`, the reference point
    (a detached, non-negative KL estimate, `kto_reference_point`). Desirable rows lose
    w_d * (1 - sigmoid(beta (r - z0))), undesirable ones w_u * (1 - sigmoid(beta (z0 - r))).
    """
    ratio = policy_logps - ref_logps
    kl = torch.as_tensor(kl, dtype=ratio.dtype, device=ratio.device).detach()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach()


def kto_reference_point(kl_sum: float, kl_count: float) -> float:
    """KTO's z0 from the summed log-ratios log pi(y'|x) - log pi_ref(y'|x) of `kl_count` mismatched
    pairs: their mean, floored at 0 (a KL divergence is not negative), as TRL does."""
    return max(0.0, kl_sum / kl_count) if kl_count else 0.0


def dpo_loss_fn(params: DPOParams, ref_model=None):
    """loss_fn(model, batch) for the training loop: one forward pass for chosen and rejected."""
    if params.loss_type in UNPAIRED:
        return kto_loss_fn(params, ref_model)

    def loss_fn(model, batch) -> LossOutput:
        logps, tokens = batch_sequence_logps(model, batch)
        policy_chosen, policy_rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        beta = beta_at(params, batch.get("step"))
        metrics = {}
        policy = (policy_chosen, policy_rejected, chosen_tokens, rejected_tokens)
        if params.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_losses(
                *policy, beta, params.simpo_gamma, params.label_smoothing
            )
        elif params.loss_type == "orpo":
            losses, chosen_rewards, rejected_rewards, log_odds = orpo_losses(*policy, beta)
            nll = -(policy_chosen / chosen_tokens).detach()
            metrics = {"log_odds_ratio": log_odds.sum(), "nll_chosen": nll.sum()}
        else:
            if "ref_chosen_logps" in batch:
                ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                with torch.no_grad():
                    ref_chosen, ref_rejected = batch_sequence_logps(ref_model, batch)[0].chunk(2)
            losses, chosen_rewards, rejected_rewards = dpo_losses(
                policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                params, beta,
            )
        margin = chosen_rewards - rejected_rewards
        metrics = {
            "rewards_chosen": chosen_rewards.sum(),
            "rewards_rejected": rejected_rewards.sum(),
            "reward_margin": margin.sum(),
            "reward_accuracy": (margin > 0).float().sum(),
            "logps_chosen": policy_chosen.detach().sum(),
            "logps_rejected": policy_rejected.detach().sum(),
            **metrics,
        }
        return LossOutput(losses.sum(), len(losses), metrics, tokens=int(batch["attention_mask"].sum()))

    return loss_fn


def kl_view(batch: dict) -> dict:
    """The mismatched (prompt, completion) rows of a KTO batch, as a batch of their own."""
    return {key: batch[f"kl_{key}"] for key in ("input_ids", "attention_mask", "labels")}


@torch.no_grad()
def kl_log_ratios(model, ref_model, batch: dict) -> torch.Tensor:
    """log pi(y'|x) - log pi_ref(y'|x) of the batch's mismatched pairs (reference from the cache if there)."""
    policy = batch_sequence_logps(model, kl_view(batch))[0]
    if "ref_kl_logps" in batch:
        ref = batch["ref_kl_logps"]
    else:
        ref = batch_sequence_logps(ref_model, kl_view(batch))[0]
    return policy - ref


def kto_loss_fn(params: DPOParams, ref_model=None, eval_point: "KTOEvalPoint | None" = None):
    """loss_fn(model, batch) for KTO. In training the batch carries the step's KL reference point
    (`kto_kl`, from KTOSource); at evaluation `eval_point` gives the eval set's (without one: the batch's)."""

    def loss_fn(model, batch) -> LossOutput:
        logps, _ = batch_sequence_logps(model, batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            with torch.no_grad():
                ref = batch_sequence_logps(ref_model, batch)[0]
        if "kto_kl" in batch:
            kl = batch["kto_kl"]
        elif eval_point is not None:
            kl = torch.tensor(eval_point(model))
        else:
            ratios = kl_log_ratios(model, ref_model, batch)
            kl = torch.tensor(kto_reference_point(float(ratios.sum()), len(ratios)))
        desirable = batch["label"]
        beta = beta_at(params, batch.get("step"))
        weights = (params.desirable_weight, params.undesirable_weight)
        losses, rewards = kto_losses(logps, ref, desirable, kl, beta, *weights)
        d = desirable.to(rewards.dtype)
        u = 1 - d
        metrics = {  # per label: [sum, count], averaged over the rows of that label
            "rewards_chosen": torch.stack([(rewards * d).sum(), d.sum()]),
            "rewards_rejected": torch.stack([(rewards * u).sum(), u.sum()]),
            "logps_chosen": torch.stack([(logps.detach() * d).sum(), d.sum()]),
            "logps_rejected": torch.stack([(logps.detach() * u).sum(), u.sum()]),
            "kl": torch.as_tensor(kl, dtype=torch.float64) * len(losses),
        }
        return LossOutput(losses.sum(), len(losses), metrics, tokens=int(batch["attention_mask"].sum()))

    return loss_fn


def reference_point(model, ref_model, batches: list[dict]) -> float:
    """KTO's z0 over the mismatched pairs of `batches` on every process (a collective when distributed)."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        ratios = kl_log_ratios(model, ref_model, to_device(b, device)).double()
        total[0] += ratios.sum()
        total[1] += len(ratios)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    return kto_reference_point(*total.tolist())


class KTOEvalPoint:
    """KTO's z0 at evaluation: over the whole eval set (sharded over processes), once per evaluation,
    so eval metrics do not depend on the eval batch size or the number of processes."""

    def __init__(self, data, collate, batch_size: int, ref_model=None):
        self.data, self.collate, self.batch_size, self.ref_model = data, collate, batch_size, ref_model
        self.step: int | None = None
        """The optimizer step the weights are at (set by KTOSource)."""
        self._at: tuple | None = None

    def __call__(self, model) -> float:
        if self._at is None or self._at[0] != self.step:
            state = distributed_state()
            mine = list(range(state.process_index, len(self.data), state.num_processes))
            bs = self.batch_size
            batches = [self.collate([self.data[i] for i in mine[s : s + bs]])
                       for s in range(0, len(mine), bs)]
            self._at = (self.step, reference_point(model, self.ref_model, batches))
        return self._at[1]


class KTOSource(ExampleSource):
    """KTO's examples in the loop's order, each micro-batch carrying the step's KL reference point.

    z0 is estimated once per optimizer step, before its loss passes, from the mismatched pairs of every
    micro-batch on every process (a no-grad pass of the current policy), so it is the same at any
    grad_accum or number of processes.
    """

    def __init__(self, data, collate, plan: StepPlan, ref_model=None, eval_point: KTOEvalPoint | None = None):
        super().__init__(data, collate, plan)
        self.ref_model, self.eval_point = ref_model, eval_point

    def micro_batches(self, step: int, model) -> list[dict]:
        batches = super().micro_batches(step, model)
        kl = torch.tensor(reference_point(model, self.ref_model, batches), dtype=torch.float32)
        for b in batches:
            b["kto_kl"] = kl
        if self.eval_point is not None:
            self.eval_point.step = step + 1  # an evaluation after this step sees its updated weights
        return batches


def check_kto_balance(labels: list[bool], params: DPOParams) -> None:
    """Log the label counts; warn where the weighted ratio is outside the KTO paper's [1, 4/3] (as TRL)."""
    n_d = sum(labels)
    n_u = len(labels) - n_d
    log.info("KTO: %d desirable and %d undesirable training rows", n_d, n_u)
    if not n_d or not n_u:
        missing = "desirable" if not n_d else "undesirable"
        log.warning("KTO: no %s training rows; the loss then only pushes one way", missing)
        return
    ratio = params.desirable_weight * n_d / (params.undesirable_weight * n_u)
    if not 1 <= ratio <= 4 / 3:
        low, high = n_u * params.undesirable_weight / n_d, 4 / 3 * n_u * params.undesirable_weight / n_d
        log.warning("KTO: desirable_weight x %d / (undesirable_weight x %d) = %.2f is outside the paper's "
                    "[1, 4/3]; a dpo.desirable_weight in [%.2f, %.2f] brings it inside",
                    n_d, n_u, ratio, low, high)


def mismatched_partners(n: int, seed: int) -> list[int]:
    """For each of n rows another row (n >= 2): consecutive rows of a seeded shuffle, as a cycle."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for j, i in enumerate(order):
        partner[i] = order[(j + 1) % n]
    return partner


def add_kl_completions(rows, seed: int, what: str):
    """Each KTO row gets kl_completion_ids: another row's completion, for the KL reference point."""
    if len(rows) < 2:
        raise DataError(f"KTO needs at least 2 {what} rows (its KL estimate pairs each prompt with another "
                        f"row's completion); got {len(rows)}")
    completions = rows["completion_ids"]
    partner = mismatched_partners(len(rows), seed)
    return rows.add_column("kl_completion_ids", [completions[partner[i]] for i in range(len(rows))])


# --------------------------------------------------------------------------- reference log-probabilities


def pair_scores(ref_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probabilities of a pair batch's chosen and rejected."""
    return batch_sequence_logps(ref_model, batch)[0].chunk(2)


def unpaired_scores(ref_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probabilities of a KTO batch's completions and of its mismatched pairs."""
    return batch_sequence_logps(ref_model, batch)[0], batch_sequence_logps(ref_model, kl_view(batch))[0]


PAIRS = (("prompt_ids", "chosen_ids", "rejected_ids"), ("chosen", "rejected"),
         ("ref_chosen_logps", "ref_rejected_logps"), pair_scores)
UNPAIRED_ROWS = (("prompt_ids", "completion_ids", "kl_completion_ids"), ("completion", "kl"),
                 ("ref_logps", "ref_kl_logps"), unpaired_scores)
"""(columns that key the cache, the cache file's fields, the columns added, the scoring function)."""


@torch.no_grad()
def reference_logps(
    ref_model, pairs, collate, batch_size: int, progress: bool = True, score=pair_scores
) -> tuple[list[float], list[float]]:
    """Sequence log-probabilities of chosen and rejected (or of what `score` returns) under the
    reference, sharded over processes."""
    from accelerate.utils import gather_object

    state = distributed_state()
    ref_model.to(state.device).eval()
    mine = list(range(state.process_index, len(pairs), state.num_processes))
    out: list[tuple[int, float, float]] = []
    for start in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", disable=not (progress and state.is_main_process)):
        idx = mine[start : start + batch_size]
        batch = to_device(collate([pairs[i] for i in idx]), state.device)
        chosen, rejected = score(ref_model, batch)
        out += zip(idx, chosen.tolist(), rejected.tolist())
    if state.num_processes > 1:
        out = gather_object(out)
    by_index = {i: (c, r) for i, c, r in out}
    return [by_index[i][0] for i in range(len(pairs))], [by_index[i][1] for i in range(len(pairs))]


BASE_WITH_ADAPTERS_OFF = "lora-base-with-adapters-off:"
"""Prefix of the reference's identity in the cache key when it is the LoRA policy's base, adapters off."""


def weights_digest(model, source: str) -> str:
    """Identity of a model's weights (hashed once per run: it reads every parameter)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(source.encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(ref_digest: str, pairs, columns=PAIRS[0]) -> str:
    """Identity of (reference weights, tokenised data): a change in either invalidates the cache."""
    h = hashlib.blake2b(digest_size=16)
    h.update(ref_digest.encode())
    for column in columns:
        h.update(json.dumps(list(pairs[column])).encode())
    return h.hexdigest()


def add_reference_logps(
    pairs, ref_model, ref_digest: str, source: str, cache_dir: Path, collate, batch_size: int,
    progress: bool = True, kind=PAIRS,
):
    """Attach ref_chosen_logps / ref_rejected_logps columns (KTO rows: ref_logps / ref_kl_logps, kind
    UNPAIRED_ROWS), from the cache when it has them."""
    key_columns, (first, second), (first_col, second_col), score = kind
    key = cache_key(ref_digest, pairs, key_columns)
    path = cache_dir / f"{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        log.info("reference log-probs: cache hit %s", path)
    else:
        chosen, rejected = reference_logps(ref_model, pairs, collate, batch_size, progress, score)
        cached = {first: chosen, second: rejected, "source": source}
        if distributed_state().is_main_process:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached))
            os.replace(tmp, path)
    return pairs.add_column(first_col, cached[first]).add_column(second_col, cached[second])


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
    params = cfg.dpo
    kto = params.loss_type in UNPAIRED
    chat = load_tokenizer(cfg.model)
    shape = "unpaired" if kto else "preference"
    train_rows, eval_rows = load_examples(cfg.data, shape, cfg.seed, dpo_data_defaults().eval_split)
    if kto:
        train_data = tokenize_unpaired(train_rows, chat, cfg.data, "tokenise train rows")
        train_data = add_kl_completions(train_data, cfg.seed, "training")
        eval_data = None
        if eval_rows:
            eval_data = tokenize_unpaired(eval_rows, chat, cfg.data, "tokenise eval rows")
            eval_data = add_kl_completions(eval_data, cfg.seed, "eval")
        collate, kind = partial(collate_unpaired, pad_token_id=chat.pad_id), UNPAIRED_ROWS
    else:
        train_data = tokenize_pairs(train_rows, chat, cfg.data, "tokenise train pairs")
        eval_data = tokenize_pairs(eval_rows, chat, cfg.data, "tokenise eval pairs") if eval_rows else None
        collate, kind = partial(collate_pairs, pad_token_id=chat.pad_id), PAIRS
    check_plan(train_data, cfg.train)  # train.max_tokens_per_batch fits the data, before the reference pass
    if kto:
        check_kto_balance(train_data["label"], params)
    model = ref_model = None
    # LoRA with no dpo.ref_model: the reference is the policy's own base with its adapters off (no second model).
    base_ref = cfg.model.lora.r is not None and params.ref_model is None
    if params.loss_type not in REFERENCE_FREE:
        ref_source = params.ref_model or cfg.model.name_or_path
        ref_model = load_causal_lm(cfg.model, chat, path=ref_source)
        ref_model.requires_grad_(False)
        if params.disable_dropout:
            disable_dropout(ref_model)
    if ref_model is not None and params.precompute_ref:
        cache_dir = Path(params.ref_cache_dir) if params.ref_cache_dir else out / "ref_logps"
        # The key names what the reference is: a full model, or that exact base with LoRA adapters off.
        digest = weights_digest(ref_model, BASE_WITH_ADAPTERS_OFF + ref_source if base_ref else ref_source)
        add = partial(add_reference_logps, ref_model=ref_model, ref_digest=digest, source=ref_source,
                      cache_dir=cache_dir, collate=collate, batch_size=cfg.train.batch_size,
                      progress=not cfg.quiet, kind=kind)
        train_data = add(train_data)
        if eval_data is not None:
            eval_data = add(eval_data)
        if ref_source == cfg.model.name_or_path:
            model = ref_model.requires_grad_(True)  # same checkpoint: the policy starts as the reference, no second load
        ref_model = None  # training holds one model from here on
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif ref_model is not None and base_ref:
        model, ref_model = ref_model.requires_grad_(True), None  # the adapters-off view below replaces it
    elif ref_model is not None:
        ref_model.to(distributed_state().device).eval()
    what = "rows" if kto else "pairs"
    n_eval = len(eval_data) if eval_data else 0
    log.info("DPO (%s): %d training %s, %d eval %s", params.loss_type, len(train_data), what, n_eval, what)
    if model is None:
        model = load_causal_lm(cfg.model, chat)
    model = with_lora(model, cfg.model)
    if base_ref and params.loss_type not in REFERENCE_FREE and not params.precompute_ref:
        ref_model = AdaptersOff(model)
    if params.disable_dropout:
        disable_dropout(model)
    source_fn, loss_fn = None, dpo_loss_fn(params, ref_model)
    if kto:
        world = distributed_state().num_processes
        if eval_data is not None and len(eval_data) < world:
            raise DataError(f"KTO: {len(eval_data)} eval rows for {world} processes; each process needs one")
        eval_point = None
        if eval_data is not None:
            eval_point = KTOEvalPoint(eval_data, collate, cfg.train.batch_size, ref_model)
        loss_fn = kto_loss_fn(params, ref_model, eval_point)

        def source_fn(world: int, rank: int) -> KTOSource:
            plan = make_plan(train_data, cfg.train, world, rank, cfg.seed)
            return KTOSource(train_data, collate, plan, ref_model, eval_point)

    callbacks = list(callbacks) + win_rate_callbacks(cfg.win_rate, chat, out)
    train(model, chat, train_data, eval_data, collate, loss_fn, cfg.train,
          RunOptions(out, cfg.seed, cfg.resume, cfg.quiet, config=cfg), callbacks, source_fn=source_fn)
    return out
