"""Online RL: RLOO and GRPO against any reward, in the one training loop.

Each optimizer step (read top to bottom):
1. the next prompts (order a pure function of seed and step, as for every stage);
2. k completions per prompt from the current policy (or a vLLM engine holding its weights, see
   below), each sample index at its own temperature if asked (`rl.temperatures`; all in one decoding
   call), each prompt's sampling seeded from (seed, step, its row), so a resumed run samples exactly
   what the uninterrupted one did and a prompt listed twice is sampled twice;
3. rewards from any backend (reward model, remote API, rule verifier), plus shaping terms
   logged one by one (length penalty, penalty or masking for completions cut at max_new_tokens);
4. log-probs of the samples under the policy at sampling time ("old", with its entropy; only where
   something needs them, see `old_pass_needed`) and under the reference, in batched no-grad passes,
   at the completion tokens only (with vLLM: and the sampler/trainer mismatch, with the truncated
   importance weights if asked). Every log-prob
   (old, current, reference) is of the distribution the sample was drawn from: the logits divided
   by that sample's temperature (as TRL; a greedy sample's at temperature 1), so the logged kl is
   the KL between the policy and the reference at the sampling temperatures, and the entropy is
   that of the sampled distribution;
5. advantages within each prompt's group, then the policy loss:
   - RLOO (Ahmadian et al. 2024, "Back to Basics"): the KL to the reference is folded into the
     reward, r - beta * sum_t (log pi - log pi_ref); advantage = r_i - mean of the other k-1;
     REINFORCE loss -A_i * log pi(y_i).
   - GRPO (Shao et al. 2024): advantage = (r_i - mean) / std of the group (no std with
     `scale_rewards: false`, as Dr. GRPO, Liu et al. 2025, argues); PPO-style clipped ratio
     against the old log-probs with `epsilon` (and `epsilon_high`, DAPO's clip-higher, Yu et al.
     2025); `num_iterations` optimizer steps per batch of samples; the per-token k3 estimator
     of KL(pi || pi_ref) in the loss with coefficient beta. `importance_level: sequence` uses one
     length-normalised ratio per sequence (GSPO, Zheng et al. 2025).
   beta = 0 loads no reference model at all.

Loss aggregation (`loss_agg`), each a sum over units divided by the units of the whole step, so
that the loss does not depend on how a step is split into micro-batches or processes:
  token_mean     sum over all tokens / number of tokens (DAPO; GRPO's default here: every token
                 weighs the same, so long answers are not down-weighted)
  sequence_mean  mean over each sequence's tokens, then over sequences (the original GRPO)
  sequence_sum   sum over each sequence's tokens, mean over sequences (the REINFORCE estimator of
                 the RLOO paper; RLOO's default here)
  constant       sum over tokens / (sequences x max_new_tokens) (Dr. GRPO's constant normaliser)

Sampling engines (`rl.engine`): `transformers` decodes with the policy itself; `vllm` runs a vLLM
engine in the same process, colocated with training (`ColocatedVLLM`). It starts from the policy's
checkpoint; before each rollout whose weights changed since the last push (after each update;
once per batch of samples with num_iterations > 1), the policy's parameters are pushed into the
running engine (the worker's in-place reload over the named tensors: no restart, no reload from
disk), counted as vllm_weight_pushes. `rl.vllm.gpu_memory_utilization` (0.3 by default) shares the
GPU with training; `rl.vllm.sleep` also frees the engine's memory between rollouts (level 1 sleep).
The engine returns the sampled tokens' log-probs; against the trainer's log-probs of the same tokens
(the "old" pass), the mismatch is logged per token: vllm_mismatch_kl, the k3 estimate of
KL(sampler || trainer), and vllm_logp_diff, the mean of logp_trainer - logp_sampler. The two engines
differ by kernels and precision (bf16 vLLM against the trainer's fp32 master weights, say), so the
samples are slightly off-policy; `rl.vllm_is_threshold: C` corrects that by truncated importance
sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"):
each token's policy-gradient term is multiplied by min(exp(logp_trainer - logp_sampler), C), a
constant (no gradient flows through it); vllm_is_weight and vllm_is_clipped (the share of tokens
whose weight hit C) are logged. Both log-probs are at the sample's temperature (vLLM's
processed_logprobs; the trainer divides its logits by T), so the mismatch measures the engines, not
the sampling settings (with top-k/top-p, vLLM's are renormalised over the kept tokens and the
trainer's are not). Sampling on vLLM is seeded per
request from (seed, step, temperature group, prompt tokens), so a resumed run samples what the
uninterrupted one did on the same machine and vLLM version (vLLM's batching may still change
floats); vLLM's kernels are not the transformers engine's, so its samples are not bit-identical to
`rl.engine: transformers` with the same seed. Held-out evaluation still decodes with transformers.

Newer options (GRPO unless said): `loss: cispo` (CISPO, MiniMax-M1 2025) clips the importance weight
and detaches it, -sg(min(ratio, 1 + epsilon_high)) * A * log pi, so tokens past the cap keep a gradient;
`advantage: reinforce_pp` (REINFORCE++, Hu et al. 2025) puts the KL in the reward per token, takes each
token's return to the end and normalises the returns over the whole step (all processes), with
`reinforce_pp_baseline` subtracting the group mean first; `dynamic_sampling` (DAPO, Yu et al. 2025,
RLOO too) replaces each prompt whose k shaped rewards tie with a prompt drawn for its place in the step
(a seeded permutation per step and round: split- and resume-independent, nothing to checkpoint), for
at most `dynamic_sampling_rounds` rounds; with vLLM and top_p < 1 or top_k > 0 the trainer's side of the
sampler correction is the truncated, renormalised distribution the sampler drew from (`sampling_logprobs`).

Held-out evaluation (`make_eval_fn`): greedy answers to eval_prompts, scored by the training reward
(eval_reward) and, with `gold_reward` set, by that second judge too (eval_gold_reward), from one
generation pass; the starting policy is then evaluated as well (step 0), so the report can draw the
proxy against the gold from where they start (reward over-optimisation, Gao et al. 2022).

Deliberate simplifications: one policy update pass per step for RLOO; no value model; the
reference is a frozen copy held in memory when beta > 0 (with LoRA, `model.lora`: the policy's own base with
its adapters off, and the vLLM engine gets each update's adapter as a new LoRA request); the vLLM engine runs in one process only
(no tensor parallelism, no multi-process training).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from transformers import set_seed

from ..config import ConfigError, ModelConfig, TrainConfig
from ..config import validate as validate_section
from ..data.chat import IGNORE_INDEX, tokenize_prompt
from ..data.collate import pad
from ..data.packing import pack_rows
from .winrate_callback import WinRateDuringTraining, win_rate_callbacks
from ..data.prompts import PromptSource, load_prompts
from ..generation import (
    ColocatedVLLM, SamplingParams, VLLMOptions, generate, sleep_mode_available, vllm_engine,
)
from ..models import AdaptersOff, disable_dropout, is_adapter_dir, load_causal_lm, load_tokenizer, with_lora
from ..rewards.backends import RewardConfig, build_backend, check_reward_config, last_user_text
from .logprobs import label_logps, label_logps_entropy
from .loop import (LossOutput, RunOptions, SourceFailed, StepPlan, StepSource, TrainingDiverged, distributed_state,
                   to_device, train)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- advantages and KL (pure)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[groups, k] rewards -> r_i minus the mean of the other k-1 rewards of its group."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """[groups, k] rewards -> (r - group mean), divided by the group's standard deviation (unbiased,
    as TRL) plus eps when `scale`."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + eps)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimator of KL(pi || pi_ref) from samples of pi (Schulman's k3): always >= 0, unbiased."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def kl_shaped_rewards(rewards: torch.Tensor, seq_logps: torch.Tensor, seq_ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """RLOO's reward with the KL folded in: r - beta * (log pi(y) - log pi_ref(y)), per sequence."""
    return rewards - beta * (seq_logps - seq_ref_logps)


def length_penalty(lengths: torch.Tensor, kind: str, coef: float, target: int, max_new_tokens: int) -> torch.Tensor:
    """[groups, k] completion lengths (tokens) -> a penalty to subtract from the reward (>= 0 unless 'group').

    linear:    coef * max(0, len - target)
    quadratic: coef * max(0, len - target)^2
    group:     coef * (len - mean len of the group) / max_new_tokens (longer than the group's mean pays)
    """
    lengths = lengths.float()
    if kind == "none" or coef == 0:
        return torch.zeros_like(lengths)
    if kind == "linear":
        return coef * (lengths - target).clamp(min=0)
    if kind == "quadratic":
        return coef * (lengths - target).clamp(min=0) ** 2
    if kind == "group":
        return coef * (lengths - lengths.mean(-1, keepdim=True)) / max_new_tokens
    raise ValueError(f"unknown length penalty {kind!r}")


def policy_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    n_tokens: torch.Tensor,
    algo: str,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_level: str = "token",
    is_weights: torch.Tensor | None = None,
    loss: str = "clip",
    token_advantages: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy losses (flat, as logps) and where the clip was active (GRPO).

    logps: this pass's log-probs of the sampled tokens (with grad); old_logps: at sampling time;
    advantages: per sequence; rows: the sequence of each flat token; n_tokens: tokens per sequence.
    RLOO: -A * log pi (REINFORCE). GRPO: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A).
    is_weights: per-token constants multiplying each term (truncated importance sampling, see
    `truncated_is_weights`), or None. loss "cispo": `cispo_token_losses` with cap 1 + eps_high (GRPO).
    token_advantages: one advantage per flat token (REINFORCE++), used instead of `advantages`.
    """
    adv = advantages[rows] if token_advantages is None else token_advantages
    if algo == "rloo":
        losses = -adv * logps
        return (losses if is_weights is None else losses * is_weights), torch.zeros_like(logps, dtype=torch.bool)
    log_ratio = logps - old_logps
    if importance_level == "sequence":  # GSPO: exp(mean_t log ratio), the same for every token of a sequence
        seq = torch.zeros(len(n_tokens), dtype=log_ratio.dtype, device=log_ratio.device).index_add(0, rows, log_ratio)
        log_ratio = (seq / n_tokens.clamp(min=1))[rows]
    ratio = torch.exp(log_ratio)
    high = epsilon if epsilon_high is None else epsilon_high
    if loss == "cispo":
        losses, capped = cispo_token_losses(ratio, logps, adv, 1 + high)
        return (losses if is_weights is None else losses * is_weights), capped
    clipped = ratio.clamp(1 - epsilon, 1 + high)
    unclipped_loss, clipped_loss = -ratio * adv, -clipped * adv
    losses = torch.maximum(unclipped_loss, clipped_loss)
    return (losses if is_weights is None else losses * is_weights), (clipped_loss > unclipped_loss).detach()


def truncated_is_weights(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor,
                         threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): per sampled token, min(pi_trainer / pi_sampler, C) = min(exp(logp_trainer -
    logp_sampler), C), a constant weight on the token's policy-gradient term; and where the cap C bit."""
    ratio = torch.exp(trainer_logps - sampler_logps)
    return ratio.clamp(max=threshold), ratio > threshold


def sampler_mismatch_kl(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_sampler || pi_trainer) from the sampler's tokens:
    exp(d) - d - 1 with d = logp_trainer - logp_sampler (>= 0, 0 when the two engines agree)."""
    return k3_kl(sampler_logps, trainer_logps)


def aggregate(token_losses: torch.Tensor, rows: torch.Tensor, n_tokens: torch.Tensor, weights: torch.Tensor, how: str,
              max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over units, number of units) of a micro-batch; the loop divides by the step's units.

    weights: per sequence (0 masks a sequence out, e.g. a truncated completion). A masked sequence
    adds nothing to the sum; its tokens leave token_mean's count, but it still counts as a sequence in
    the others (as TRL: constant divides by all sequences x max_new_tokens, sequence_mean by all
    sequences), so the step size does not grow with the share masked.
    """
    w = weights[rows]
    if how == "token_mean":
        return (token_losses * w).sum(), (n_tokens * weights).sum()
    per_seq = torch.zeros(len(n_tokens), dtype=token_losses.dtype, device=token_losses.device).index_add(0, rows, token_losses)
    if how == "sequence_mean":
        per_seq = per_seq / n_tokens.clamp(min=1)
    elif how == "constant":
        per_seq = per_seq / max_new_tokens
    elif how != "sequence_sum":
        raise ValueError(f"unknown loss aggregation {how!r}")
    return (per_seq * weights).sum(), torch.ones_like(weights).sum()


# --------------------------------------------------------------------------- newer algorithms (pure)
# DAPO's dynamic sampling, CISPO, REINFORCE++ and the truncation-aware sampler correction; each a
# small function with its own test (tests/test_rl_algorithms.py).


def cispo_token_losses(ratio: torch.Tensor, logps: torch.Tensor, adv: torch.Tensor,
                       cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, MiniMax 2025, "Scaling test-time compute efficiently with lightning attention"):
    -sg(min(ratio, cap)) * A * log pi per token, and where the cap bit.

    The importance weight is clipped and detached, not the update: a token whose ratio passed the cap
    still gets the REINFORCE gradient -A * cap * grad log pi (PPO's clip would zero it). No lower bound,
    as the paper runs it (and TRL's loss_type "cispo", whose epsilon_high is this cap).
    """
    weight = ratio.clamp(max=cap).detach()
    return -weight * adv * logps, (ratio > cap).detach()


def reinforce_pp_token_returns(rewards: torch.Tensor, kl: torch.Tensor, rows: torch.Tensor,
                               n_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++: a simple and efficient approach for aligning large
    language models"): the KL to the reference is a per-token reward, -beta * kl_t, and the sequence's
    reward R arrives at its last token; each token's return is the sum of the rewards from it on
    (gamma = 1): G_t = R - beta * sum_{s >= t} kl_s.

    rewards: per sequence; kl: per flat token (log pi_old - log pi_ref, the k1 estimate); rows: each
    flat token's sequence (tokens of a sequence contiguous, in order); n_tokens: tokens per sequence.
    """
    kl = kl.to(rewards.dtype)
    if len(kl) == 0:
        return kl
    seq_kl = torch.zeros(len(n_tokens), dtype=rewards.dtype, device=kl.device).index_add(0, rows, kl)
    exclusive = torch.cumsum(kl, 0) - kl  # sum of the kl of all flat tokens before each
    start = (torch.cumsum(n_tokens, 0) - n_tokens).clamp(max=len(kl) - 1)  # each sequence's first flat token
    before = exclusive - exclusive[start][rows]  # sum of kl_s for s < t within the sequence
    return rewards[rows] - beta * (seq_kl[rows] - before)


def whiten(values: torch.Tensor, weights: torch.Tensor, totals: tuple[float, float, float] | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """Global advantage normalisation (REINFORCE++): (x - mean) / std over every weighted token of
    the step, std the population one (floored at sqrt(eps)), as OpenRLHF does.

    totals: (sum w, sum w x, sum w x^2) over the whole step when it is spread over processes (the
    caller all-reduces them); default, those of `values` alone."""
    w, x = weights.to(values.dtype), values
    if totals is None:
        totals = (float(w.sum()), float((w * x).sum()), float((w * x * x).sum()))
    n, s1, s2 = totals
    if n <= 0:
        return torch.zeros_like(values)
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    return (x - mean) / max(var, eps) ** 0.5


def sampling_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor | float = 1.0,
                      top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log q(target) under the distribution a sampler draws from: logits / T, then top-k, then top-p
    (nucleus over the top-k's renormalised probabilities), renormalised over the kept tokens; the
    order and tie rules of vLLM's sampler and transformers' warpers (ties at the k-th value kept; the
    most likely token always kept). A target outside the kept set gets -inf.

    With top_p < 1 or top_k > 0 a sampler's log-probs (vLLM's processed_logprobs) are of this
    distribution, not of softmax(logits / T): comparing them with the trainer's untruncated ones
    (as TRL's vLLM importance ratio does) biases the ratio below 1 on every kept token, by the mass
    the truncation removed. Rows at temperature 0 (greedy) are taken at T = 1, untruncated (what vLLM
    reports for a greedy request). logits [N, V], targets [N], temperature a float or [N].
    """
    logits = logits.float()
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device).expand(logits.shape[0]).clone()
    greedy = t <= 0
    t[greedy] = 1.0
    scores = logits / t[:, None]
    keep = torch.ones_like(scores, dtype=torch.bool)
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        keep &= scores >= kth
    if top_p < 1.0:
        masked = scores.masked_fill(~keep, float("-inf"))
        sorted_scores, order = masked.sort(dim=-1)  # ascending, as both samplers do
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[:, -1] = False  # the most likely token stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        keep &= ~drop
    keep[greedy] = True
    logq = scores.masked_fill(~keep, float("-inf")).log_softmax(-1)
    return logq.gather(-1, targets[:, None]).squeeze(-1)


def informative_groups(total: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """[groups, k] shaped rewards -> whether each group's rewards differ (DAPO's dynamic sampling keeps
    those: a group whose k rewards are all equal has all-zero advantages, no learning signal)."""
    return (total.max(-1).values - total.min(-1).values).abs() > tol


def replacement_prompts(seed: int, generation: int, draw: int, slots: list[int], n_prompts: int) -> list[int]:
    """Dynamic sampling's extra draws: the prompt that replaces global slot s of step `generation` in
    round `draw` (1, 2, ...), a pure function of (seed, generation, draw, s), so the choice does not
    depend on how the step is split over micro-batches or processes, and a resumed run draws the
    same. Each round is one seeded permutation of all prompts; slot s takes its s-th entry."""
    g = torch.Generator().manual_seed(zlib.crc32(json.dumps(["dynamic", seed, generation, draw]).encode()))
    perm = torch.randperm(n_prompts, generator=g).tolist()
    return [perm[s % n_prompts] for s in slots]


# --------------------------------------------------------------------------- config


@dataclass
class LengthPenalty:
    kind: Literal["none", "linear", "quadratic", "group"] = "none"
    """Shaping on the completion's length in tokens (see train/rl.py); logged as reward_length_penalty."""
    coef: float = 0.0
    target: int = 0
    """linear/quadratic: tokens allowed before the penalty starts."""


@dataclass
class RLVLLMOptions(VLLMOptions):
    """The colocated vLLM engine of `rl.engine: vllm` (one process, next to the policy on its device)."""

    gpu_memory_utilization: float = 0.3
    """Share of GPU memory vLLM may take for its copy of the weights and its KV cache; the policy,
    its gradients and optimizer state (and the reference) need the rest."""
    sleep: bool = False
    """Between rollouts, put the engine to sleep (vLLM sleep mode level 1: weights offloaded to CPU
    memory, KV cache freed) and wake it before the next; for a GPU too small for both at once. Where
    the platform has no sleep mode (vLLM on CPU) it is skipped with a logged reason."""


@dataclass
class RLParams:
    algo: Literal["rloo", "grpo"] = "rloo"
    k: int = 4
    """Completions sampled per prompt (>= 2)."""
    temperature: float = 1.0
    temperatures: list[float] = field(default_factory=list)
    """One temperature per sample index (length k), e.g. [0.2, 0.2, 0.7, 0.7, 0.7, 1.2, 1.2, 1.2]; overrides temperature."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    beta: float = 0.05
    """KL coefficient (RLOO: in the reward; GRPO: k3 in the loss). 0 loads no reference model."""
    epsilon: float = 0.2
    """GRPO: lower clip range of the ratio (and upper, unless epsilon_high)."""
    epsilon_high: float | None = None
    """GRPO: upper clip range (DAPO's clip-higher, e.g. 0.28)."""
    num_iterations: int = 1
    """GRPO: optimizer steps on each batch of samples (old log-probs kept from sampling time)."""
    importance_level: Literal["token", "sequence"] = "token"
    """GRPO: per-token ratios, or one length-normalised ratio per sequence (GSPO)."""
    scale_rewards: bool = True
    """GRPO: divide advantages by the group's standard deviation (false: Dr. GRPO)."""
    loss_agg: Literal["auto", "token_mean", "sequence_mean", "sequence_sum", "constant"] = "auto"
    """auto: sequence_sum for RLOO (the paper's estimator), token_mean for GRPO (DAPO), sequence_mean for
    GSPO (importance_level sequence: the paper's mean over sequences of each one's mean)."""
    length_penalty: LengthPenalty = field(default_factory=LengthPenalty)
    truncation_penalty: float = 0.0
    """Subtracted from the reward of a completion cut at max_new_tokens."""
    mask_truncated: bool = False
    """Leave completions cut at max_new_tokens out of the loss (DAPO's overlong filtering)."""
    loss: Literal["clip", "cispo"] = "clip"
    """GRPO's policy loss. clip: PPO's clipped surrogate (epsilon, epsilon_high). cispo: CISPO (MiniMax-M1,
    2025): -sg(min(ratio, 1 + epsilon_high)) * A * log pi, the importance weight clipped and detached, so
    tokens past the cap keep their gradient (epsilon_high e.g. 4: TRL's loss_type cispo, epsilon_high 5)."""
    advantage: Literal["group", "reinforce_pp", "reinforce_pp_baseline"] = "group"
    """GRPO's advantages. group: within each prompt's group (scale_rewards). reinforce_pp: REINFORCE++ (Hu
    et al. 2025): the KL to the reference as a per-token reward -beta * (log pi - log pi_ref), each token's
    return to the end, normalised over all tokens of the step (not in the loss; scale_rewards unused).
    reinforce_pp_baseline: the same after subtracting the group's mean reward (REINFORCE++-baseline)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025): a prompt whose k shaped rewards (after length and truncation
    penalties, before RLOO's KL term) are all equal carries no signal; it is replaced by another prompt,
    drawn for its place in the step, until the step has its batch or dynamic_sampling_rounds run out.
    Logged: dynamic_groups_drawn, dynamic_groups_dropped, dynamic_extra_draws, dynamic_unfilled,
    dynamic_short."""
    dynamic_sampling_rounds: int = 3
    """Rounds of extra draws per step at most (each draws one prompt per place still without signal); places
    still without signal then stay out of the loss (weight 0) and the step's batch is short."""
    ref_model: str | None = None
    """Reference for the KL; defaults to model.name_or_path."""
    generation_batch_size: int = 64
    """Sequences decoded together (a prompt's k samples count k; transformers engine)."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """What samples the completions: the policy itself (transformers), or a vLLM engine in the same
    process that gets the policy's weights pushed after each update (no restart, no reload from disk)."""
    vllm: RLVLLMOptions = field(default_factory=RLVLLMOptions)
    vllm_is_threshold: float | None = None
    """engine vllm: truncated importance sampling (Yao et al. 2025) with this cap C (e.g. 2): each token's
    policy-gradient term is weighted by min(pi_trainer / pi_sampler, C). Unset: no correction (the
    mismatch is still logged, as vllm_mismatch_kl)."""
    disable_dropout: bool = True
    """Turn every dropout of the policy and the reference off (TRL's default): the sampling-time and the
    loss-time log-probs then come from the same function, so the on-policy ratio is 1. false keeps the
    checkpoint's dropout (its config is left as it is either way)."""
    stall_rollouts: int = 5
    """Guard-rail: after this many rollouts in a row in which at least stall_share of the completions
    were cut at max_new_tokens, or of the groups were tied (all k shaped rewards equal: no signal), a
    loud warning naming the fix (0: never)."""
    stall_share: float = 0.9
    """The share of truncated completions or tied groups that counts as a stalled rollout (0 < share <= 1)."""
    stop_on_stall: bool = False
    """Stop at the warning instead of training on (the last completed step is checkpointed; --resume
    continues)."""
    log_samples_steps: int = 10
    """Write a few completions with their rewards to samples.jsonl every N steps (0: never)."""
    samples_per_log: int = 4

    def agg(self) -> str:
        if self.loss_agg != "auto":
            return self.loss_agg
        if self.algo == "rloo":
            return "sequence_sum"
        return "sequence_mean" if self.importance_level == "sequence" else "token_mean"

    def kl_in_loss(self) -> bool:
        """GRPO's k3 term in the loss (REINFORCE++ puts the KL in the reward, RLOO in the sequence reward)."""
        return self.algo == "grpo" and self.beta > 0 and self.advantage == "group"

    def sample_temperatures(self) -> list[float]:
        return list(self.temperatures) if self.temperatures else [self.temperature] * self.k


def rl_train_defaults() -> TrainConfig:
    return TrainConfig(learning_rate=1e-6, batch_size=4, grad_accum=4, warmup_steps=0, scheduler="constant", max_steps=200,
                       save_steps=50, logging_steps=1, metric_for_best="eval_reward", greater_is_better=True)


def rl_prompt_defaults() -> PromptSource:
    return PromptSource(dataset="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")


def no_prompts() -> PromptSource:
    return PromptSource(dataset="", split="test")


@dataclass
class GoldRewardConfig(RewardConfig):
    """A second reward that only judges: the held-out score the training reward stands in for."""

    kind: Literal["none", "hf", "remote", "rule"] = "none"
    """none: no gold reward. Else as reward.kind: hf (a reward model), remote (an API), rule (a verifier)."""
    cache: str = "auto"
    """Score cache: auto (<output_dir>/scores.sqlite: greedy answers to the same held-out prompts recur from
    one evaluation to the next), none/off (no cache), or a SQLite file."""

    def validate(self, prefix: str) -> None:
        """The checks of a `reward` section (ranges, the model folder, remote's settings), when set."""
        if self.kind != "none":
            validate_section(self.as_reward(), prefix)

    def as_reward(self) -> RewardConfig:
        if self.kind == "none":
            raise ConfigError("gold_reward.kind is none: there is no gold reward")
        return RewardConfig(**{f.name: getattr(self, f.name) for f in fields(RewardConfig)})


@dataclass
class RLConfig:
    output_dir: str = "runs/rl"
    seed: int = 42
    resume: bool = False
    quiet: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (normally the SFT or DPO model); also the reference unless rl.ref_model."""
    prompts: PromptSource = field(default_factory=rl_prompt_defaults)
    """Training prompts (messages up to the last user turn, prompt, or instruction column)."""
    eval_prompts: PromptSource = field(default_factory=no_prompts)
    """Held-out prompts: mean reward of greedy completions at every evaluation (dataset unset: none)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward; rule verifiers also receive each prompt row's columns. reward.cache auto: no cache here
    (fresh samples rarely repeat); a file path keeps one."""
    rl: RLParams = field(default_factory=RLParams)
    train: TrainConfig = field(default_factory=rl_train_defaults)
    """batch_size counts prompts per micro-batch (each brings k samples)."""
    win_rate: WinRateDuringTraining = field(default_factory=WinRateDuringTraining)
    gold_reward: GoldRewardConfig = field(default_factory=GoldRewardConfig)
    """A second reward, scored at every evaluation on the same greedy answers to eval_prompts as
    eval_reward, logged as eval_gold_reward (kind none: unset). The training reward is then the proxy:
    the report draws both against steps, so over-optimisation of the proxy shows (Gao et al. 2022)."""

    def validate(self, prefix: str) -> None:
        """On load (config.validate): a gold reward needs held-out prompts."""
        gold_needs_prompts(self)


def check_rl_config(cfg: RLConfig) -> None:
    p = cfg.rl
    if p.k < 2:
        raise ConfigError(f"rl.k must be at least 2 (advantages compare samples of one prompt), got {p.k}")
    if p.temperatures and len(p.temperatures) != p.k:
        raise ConfigError(f"rl.temperatures has {len(p.temperatures)} values; it needs one per sample (rl.k = {p.k})")
    if any(t < 0 for t in p.sample_temperatures()):
        raise ConfigError("rl temperatures must be >= 0")
    zero = [i for i, t in enumerate(p.sample_temperatures()) if t == 0]
    if len(zero) > 1:
        raise ConfigError("at most one sample per prompt can be greedy (temperature 0): greedy samples are identical")
    if p.beta < 0 or p.epsilon <= 0 or (p.epsilon_high is not None and p.epsilon_high <= 0):
        raise ConfigError("rl.beta must be >= 0 and rl.epsilon / rl.epsilon_high > 0")
    if p.num_iterations < 1:
        raise ConfigError("rl.num_iterations must be >= 1")
    if p.algo == "rloo" and (p.num_iterations != 1 or p.importance_level != "token"):
        raise ConfigError("rl.num_iterations and rl.importance_level are GRPO options (RLOO updates once per batch of samples)")
    if p.max_new_tokens < 1:
        raise ConfigError("rl.max_new_tokens must be >= 1")
    if p.stall_rollouts < 0 or not 0 < p.stall_share <= 1:
        raise ConfigError(f"rl.stall_rollouts must be >= 0 (got {p.stall_rollouts}) and rl.stall_share in "
                          f"(0, 1] (got {p.stall_share})")
    if p.vllm_is_threshold is not None:
        if p.engine != "vllm":
            raise ConfigError(f"rl.vllm_is_threshold: {p.vllm_is_threshold} corrects the vLLM sampler's mismatch "
                              "with the trainer; it needs rl.engine: vllm")
        if not p.vllm_is_threshold >= 1:
            raise ConfigError(f"rl.vllm_is_threshold: {p.vllm_is_threshold} is not allowed; expected a number >= 1 (e.g. 2): "
                              "below 1 it would down-weight tokens on which the two engines agree")
    if p.engine == "vllm" and p.vllm.max_model_len is not None and p.vllm.max_model_len <= p.max_new_tokens:
        raise ConfigError(f"rl.vllm.max_model_len: {p.vllm.max_model_len} leaves no room for a prompt before "
                          f"rl.max_new_tokens ({p.max_new_tokens}); raise it or unset it (the model's length)")
    check_rl_algorithms(p)
    if cfg.train.max_tokens_per_batch or cfg.train.group_by_length:
        raise ConfigError("train.max_tokens_per_batch / train.group_by_length apply to sft, dpo and rm; RL's "
                          "train.batch_size counts prompts (set train.packing to pack each micro-batch's samples)")
    if not cfg.eval_prompts.dataset and (cfg.train.eval_steps or cfg.train.early_stopping_patience):
        raise ConfigError("train.eval_steps / train.early_stopping_patience need held-out prompts: set eval_prompts.dataset")
    check_gold_reward(cfg)
    check_rl_metric(cfg)


def gold_needs_prompts(cfg: RLConfig) -> None:
    if cfg.gold_reward.kind != "none" and not cfg.eval_prompts.dataset:
        raise ConfigError(f"gold_reward.kind: {cfg.gold_reward.kind} scores greedy answers to held-out prompts at "
                          "each evaluation; set eval_prompts.dataset (and train.eval_steps to evaluate during "
                          "training)")


def check_gold_reward(cfg: RLConfig) -> None:
    """gold_reward, when set: held-out prompts to score, and what can be checked of a reward without
    loading it (the messages name gold_reward, not reward)."""
    gold = cfg.gold_reward
    if gold.kind == "none":
        return
    gold_needs_prompts(cfg)
    if gold.kind == "hf" and not gold.model:
        raise ConfigError("gold_reward.model is required for gold_reward.kind 'hf' (a reward model folder or Hub id)")
    validate_section(gold.as_reward(), "gold_reward.")
    try:
        check_reward_config(gold.as_reward())
    except ConfigError as e:
        raise ConfigError(f"gold_reward: {str(e).replace('reward.', 'gold_reward.')}") from None


RL_EVAL_METRICS = ("eval_reward", "eval_completion_length", "eval_truncated")


def check_rl_metric(cfg: RLConfig) -> None:
    """train.metric_for_best names a metric the held-out evaluation logs (checked before any work, not at
    the first evaluation)."""
    if not cfg.eval_prompts.dataset:
        return
    produced = set(RL_EVAL_METRICS) | ({"eval_gold_reward"} if cfg.gold_reward.kind != "none" else set())
    if cfg.win_rate.reference:
        produced |= {"eval_win_rate", "eval_mean_reward"}
    if cfg.train.metric_for_best not in produced:
        raise ConfigError(f"train.metric_for_best: {cfg.train.metric_for_best!r} is not a metric the rl stage's "
                          f"evaluation logs; expected one of {', '.join(sorted(produced))}")


def check_rl_algorithms(p: RLParams) -> None:
    """The newer options' combinations (CISPO, REINFORCE++, dynamic sampling)."""
    if p.algo != "grpo" and (p.loss != "clip" or p.advantage != "group"):
        raise ConfigError(f"rl.loss: {p.loss} / rl.advantage: {p.advantage} are GRPO options "
                          "(rl.algo: grpo); RLOO has its own loss and advantages")
    if p.dynamic_sampling_rounds < 0:
        raise ConfigError(f"rl.dynamic_sampling_rounds: {p.dynamic_sampling_rounds} is not allowed; "
                          "expected an integer >= 0")


# --------------------------------------------------------------------------- rollouts


def sampling_seed(seed: int, generation: int, group: int) -> int:
    return zlib.crc32(json.dumps([seed, generation, group]).encode())


def collate_rollout(samples: list[dict], pad_id: int) -> dict:
    """Prompt + completion rows, labels on the completion, and per-sample RL tensors.

    Flat per-token lists (old_logps, ref_logps) are concatenated in row order, which is the
    order in which label_logps returns the labelled tokens.
    """
    seqs = [s["prompt_ids"] + s["completion_ids"] for s in samples]
    batch = {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(x) for x in seqs], 0),
        "labels": pad([[IGNORE_INDEX] * len(s["prompt_ids"]) + s["completion_ids"] for s in samples], IGNORE_INDEX),
        "advantages": torch.tensor([s["advantage"] for s in samples], dtype=torch.float32),
        "weights": torch.tensor([s["weight"] for s in samples], dtype=torch.float32),
        # the temperature each completion was sampled at (1 for a greedy one): log-probs are taken there
        "temperatures": torch.tensor([s.get("temperature", 1.0) for s in samples], dtype=torch.float32),
    }
    for key in ("old_logps", "ref_logps", "is_weights", "token_advantages"):
        if samples[0].get(key) is not None:
            batch[key] = torch.tensor([v for s in samples for v in s[key]], dtype=torch.float32)
    return batch


@torch.no_grad()
def sample_logps(model, samples: list[dict], pad_id: int, batch_size: int, entropy: bool, packing: bool = False):
    """Per-sample lists of completion-token log-probs (and each sample's sum of per-token entropies), each
    at the sample's temperature. packing: each chunk of batch_size samples packed (data.packing.pack_rows)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out_logps, out_entropy = [], []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            b = collate_rollout([s | PLAIN for s in chunk], pad_id)
            b = to_device(pack_rows(b) if packing else b, device)
            args = (model, b["input_ids"], b["attention_mask"], b["labels"], b["temperatures"], b.get("position_ids"))
            if entropy:
                logps, ent, mask = label_logps_entropy(*args)
            else:
                logps, mask = label_logps(*args)
                ent = None
            counts = mask.sum(-1).tolist()
            pieces = logps.float().cpu().split(counts)
            out_logps += [p.tolist() for p in pieces]
            if ent is not None:
                out_entropy += [float(e.sum()) for e in ent.float().cpu().split(counts)]
    finally:
        model.train(was_training)
    return out_logps, out_entropy


PLAIN = {"advantage": 0.0, "weight": 1.0, "old_logps": None, "ref_logps": None, "is_weights": None,
         "token_advantages": None}
"""What a no-grad pass collates a sample with: no RL tensors."""
TRUNCATED_LOGP = -50.0
"""The trainer's log-prob of a sampled token its own top-k/top-p truncation drops (probability 0)."""
SAMPLING_CHUNK_TOKENS = 256
"""Positions per chunk in `sampling_sample_logps` (top-p sorts the vocabulary: 256 x 152k x 12 bytes)."""


@torch.no_grad()
def sampling_sample_logps(model, samples: list[dict], pad_id: int, batch_size: int, temperatures: list[float],
                          top_k: int, top_p: float) -> list[list[float]]:
    """Per-sample lists of the completion tokens' log-probs under the sampling distribution
    (`sampling_logprobs`: temperature, top-k, top-p, renormalised), one temperature per sample."""
    from accelerate.utils import extract_model_from_parallel

    from .logprobs import FULL_LOGITS

    device = next(model.parameters()).device
    inner = extract_model_from_parallel(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    full = head is None or getattr(inner, FULL_LOGITS, False)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            b = to_device(collate_rollout([s | PLAIN for s in chunk], pad_id), device)
            targets = b["labels"][:, 1:]
            mask = targets != IGNORE_INDEX
            temps = torch.tensor(temperatures[start : start + batch_size], device=device)
            temps = temps[mask.nonzero()[:, 0]]
            inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            if full:
                states = model(**inputs).logits[:, :-1][mask]
            else:
                out_ = model(**inputs, output_hidden_states=True, logits_to_keep=1)
                states = out_.hidden_states[-1][:, :-1][mask]
            wanted = targets[mask]
            pieces = []
            for i in range(0, len(wanted), SAMPLING_CHUNK_TOKENS):
                h = states[i : i + SAMPLING_CHUNK_TOKENS]
                pieces.append(sampling_logprobs(h if full else head(h), wanted[i : i + SAMPLING_CHUNK_TOKENS],
                                                temps[i : i + SAMPLING_CHUNK_TOKENS], top_k, top_p))
            flat = torch.cat(pieces) if pieces else torch.zeros(0)
            out += [x.tolist() for x in flat.float().cpu().split(mask.sum(-1).tolist())]
    finally:
        model.train(was_training)
    return out


def sampler_correction(samples: list[dict], old: list[list[float]], threshold: float | None) -> dict[str, tuple[float, float]]:
    """The sampler/trainer mismatch over a rollout's tokens ((sum, count) per metric: token means),
    and with a threshold each sample's truncated importance weights (`is_weights`, for the loss).

    samples carry the sampler's `sampler_logps` (taken out here); old: the trainer's log-probs of the
    same tokens. vllm_mismatch_kl is the k3 estimate of KL(sampler || trainer) per token,
    vllm_logp_diff the mean of logp_trainer - logp_sampler."""
    trainer, sampler = [], []
    for s, o in zip(samples, old):
        got = s.pop("sampler_logps")
        if got is None or len(got) != len(o):
            raise RuntimeError(f"the sampler returned {None if got is None else len(got)} log-probs for {len(o)} sampled tokens")
        trainer.append(torch.tensor(o, dtype=torch.float64))
        sampler.append(torch.tensor(got, dtype=torch.float64))
    t, q = torch.cat(trainer), torch.cat(sampler)
    n = float(len(t))
    metrics = {"vllm_mismatch_kl": (float(sampler_mismatch_kl(t, q).sum()), n),
               "vllm_logp_diff": (float((t - q).sum()), n)}
    if threshold is not None:
        w, capped = truncated_is_weights(t, q, threshold)
        for s, piece in zip(samples, w.split([len(o) for o in old])):
            s["is_weights"] = piece.tolist()
        metrics["vllm_is_weight"] = (float(w.sum()), n)
        metrics["vllm_is_clipped"] = (float(capped.sum()), n)
    return metrics


ROLLOUT_TIMINGS = ("time_sample_s", "time_score_s", "time_logprobs_s", "sampled_tokens_per_s")
"""Metrics of the work of a rollout, logged on the step that made it only (count 0 on the others)."""


class RolloutSource(StepSource):
    """Each step's micro-batches made from the current policy: prompts -> samples -> rewards -> advantages."""

    def __init__(self, cfg: RLConfig, chat, prompts: list[dict], backend, ref_model, world: int, rank: int, out: Path,
                 is_main: bool, engine=None):
        self.cfg, self.p, self.chat, self.prompts, self.backend, self.ref_model = cfg, cfg.rl, chat, prompts, backend, ref_model
        self.engine = engine
        """A `ColocatedVLLM` (rl.engine: vllm) or None (the policy samples)."""
        self.plan = StepPlan(len(prompts), cfg.train, world, rank, cfg.seed)
        mu = self.p.num_iterations
        self.total_steps, self.steps_per_epoch = self.plan.total_steps * mu, self.plan.steps_per_epoch * mu
        if cfg.train.max_steps:
            self.total_steps = cfg.train.max_steps
        self.buffer: dict | None = None
        self.metrics: dict[str, tuple[float, float]] = {}
        self.samples_path = out / "samples.jsonl" if is_main else None
        self._prompt_ids: dict[int, list[int]] = {}
        self.stalled: dict[str, int] = {}
        """Rollouts in a row with nearly every completion truncated / group tied (check_stall)."""

    def prompt_ids(self, i: int) -> list[int]:
        """Prompt i's tokens through the chat template, computed once per run."""
        if i not in self._prompt_ids:
            self._prompt_ids[i] = tokenize_prompt(self.chat.tokenizer, self.prompts[i]["messages"])
        return self._prompt_ids[i]

    # The loop's interface ---------------------------------------------------------------
    def micro_batches(self, step: int, model) -> list[dict]:
        generation = step // self.p.num_iterations
        if self.buffer is None or self.buffer["generation"] != generation:
            if self.engine is not None:
                self.engine.sync(model, version=step)  # `step` optimizer updates so far: a push when they changed the weights
            self.buffer = self.rollout(generation, model)
        self.metrics = {k: tuple(v) for k, v in self.buffer["metrics"].items()}
        if self.buffer.get("used"):  # a step reusing a batch (num_iterations > 1) did no sampling: no timings
            self.metrics.update({k: (0.0, 0.0) for k in ROLLOUT_TIMINGS})
        self.buffer["used"] = True
        if self.engine is not None:
            self.metrics["vllm_weight_pushes"] = (float(self.engine.pushes), 1.0)
        micro = [collate_rollout(mb, self.chat.pad_id) for mb in self.buffer["micro"]]
        return [pack_rows(b) for b in micro] if self.cfg.train.packing else micro

    def step_metrics(self) -> dict[str, tuple[float, float]]:
        return self.metrics

    def state_dict(self) -> dict:
        # Only a rollout that later steps still reuse must survive a restart (GRPO, num_iterations > 1).
        return {"buffer": self.buffer} if self.p.num_iterations > 1 and self.buffer else {}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state.get("buffer")

    def keep_until(self, step: int) -> None:
        """samples.jsonl reads as one run: lines of steps after the checkpoint are dropped on resume."""
        if self.samples_path is not None and self.samples_path.exists():
            lines = self.samples_path.read_text().split("\n")
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            self.samples_path.write_text("".join(line + "\n" for line in kept))

    # One rollout ------------------------------------------------------------------------
    def rollout(self, generation: int, model) -> dict:
        p, chat = self.p, self.chat
        groups = self.plan.micro_batches(generation)  # prompt indices per micro-batch, this process
        flat = [i for g in groups for i in g]
        messages = [self.prompts[i]["messages"] for i in flat]
        t0 = time.perf_counter()
        try:
            completions = self.sample(model, messages, generation, salts=flat)  # [prompt][k]
        finally:
            if self.engine is not None:
                self.engine.rest()
        t1 = time.perf_counter()
        texts = [c.text for cs in completions for c in cs]
        columns = [self.prompts[i].get("columns") or {} for i in flat for _ in range(p.k)]
        try:
            scores = self.backend.score([m for m in messages for _ in range(p.k)], texts, columns=columns)
        except Exception as e:  # an API down after its retries, a server gone: stop at a clean step
            raise SourceFailed(f"the reward backend failed ({type(e).__name__}: {e})") from e
        if len(scores) != len(texts):
            raise ConfigError(f"reward ({self.cfg.reward.kind}): the backend returned {len(scores)} values for "
                              f"{len(texts)} completions ({len(flat)} prompts x rl.k {p.k}); a reward must return "
                              "one number per completion, in order. Stopped before any update")
        rewards = torch.tensor(scores, dtype=torch.float64)
        if not torch.isfinite(rewards).all():
            bad = int((~torch.isfinite(rewards)).sum())
            raise TrainingDiverged(f"the reward backend returned {bad} non-finite reward(s) at generation {generation + 1}; "
                                   "stopped before updating the weights")
        dynamic = None
        if p.dynamic_sampling:  # groups without signal replaced by fresh prompts
            dynamic = self.dynamic_refill(model, flat, completions, rewards, generation)
            flat, completions, rewards = dynamic["flat"], dynamic["completions"], dynamic["rewards"]
            texts = [c.text for cs in completions for c in cs]
        t2 = time.perf_counter()
        samples = []
        temps = [t if t > 0 else 1.0 for t in p.sample_temperatures()]  # a greedy sample's log-probs: at T = 1
        for i, cs in zip(flat, completions):
            prompt_ids = self.prompt_ids(i)
            for j, c in enumerate(cs):
                ids = list(c.token_ids) + ([c.stop_id] if c.stop_id is not None else [])
                samples.append({"prompt_ids": prompt_ids, "completion_ids": ids, "truncated": c.stop_id is None,
                                "prompt": i, "index": j, "sampler_logps": c.logprobs, "temperature": temps[j]})
        bs = max(1, self.cfg.train.batch_size * p.k)
        old, entropy = None, None
        if old_pass_needed(p):
            old, entropy = sample_logps(model, samples, chat.pad_id, bs, entropy=True, packing=self.cfg.train.packing)
        ref = (sample_logps(self.ref_model, samples, chat.pad_id, bs, entropy=False, packing=self.cfg.train.packing)[0]
               if self.ref_model is not None else None)
        t3 = time.perf_counter()

        shape = (len(flat), p.k)
        rewards = rewards.view(shape)
        lengths = torch.tensor([len(s["completion_ids"]) for s in samples], dtype=torch.float64).view(shape)
        truncated = torch.tensor([s["truncated"] for s in samples], dtype=torch.float64).view(shape)
        shaping = p.length_penalty
        len_pen = length_penalty(lengths, shaping.kind, shaping.coef, shaping.target, p.max_new_tokens).double()
        trunc_pen = p.truncation_penalty * truncated
        total = rewards - len_pen - trunc_pen
        kl_seq = None
        if ref is not None and old is not None:  # else the loss pass logs kl (GRPO, one iteration)
            seq_old = torch.tensor([sum(x) for x in old], dtype=torch.float64).view(shape)
            seq_ref = torch.tensor([sum(x) for x in ref], dtype=torch.float64).view(shape)
            kl_seq = seq_old - seq_ref
        if p.algo == "rloo":
            if kl_seq is not None and p.beta > 0:
                total = kl_shaped_rewards(total, seq_old, seq_ref, p.beta)
            adv = rloo_advantages(total)
        else:
            adv = grpo_advantages(total, p.scale_rewards)
        weights = (1 - truncated) if p.mask_truncated else torch.ones_like(truncated)
        if dynamic is not None:  # places left without signal stay out of the loss
            weights = weights * dynamic["keep"].double().unsqueeze(-1)
        token_adv = None
        if p.advantage != "group":
            token_adv, adv = self.reinforce_pp_advantages(total, samples, old, ref, weights)
        if not torch.isfinite(adv).all():
            raise TrainingDiverged(f"non-finite advantages at generation {generation + 1}; stopped before updating the weights")
        nothing = [None] * len(samples)
        for s, a, w, o, r in zip(samples, adv.flatten().tolist(), weights.flatten().tolist(), old or nothing,
                                 ref or nothing):
            s.update(advantage=a, weight=w, old_logps=o if (p.algo == "grpo") else None,
                     ref_logps=r if p.kl_in_loss() else None)
        for s, a in zip(samples, token_adv or []):
            s["token_advantages"] = a
        mismatch = {}
        if self.engine is not None:
            trainer, outside = self.sampler_view_logps(model, samples, old)
            mismatch = sampler_correction(samples, trainer, p.vllm_is_threshold) | outside

        n = float(len(samples))
        tokens = float(lengths.sum())
        # Tied on what the advantages are computed from (the shaped total), so 1.0 means no signal at all.
        equal_groups = float((total.max(-1).values - total.min(-1).values).abs().le(1e-12).sum())
        metrics = {
            "reward": (float(rewards.sum()), n),
            "reward_std": (float(rewards.std(-1).sum()), float(len(flat))),  # per group, ddof 1 as the advantages
            "reward_total": (float(total.sum()), n),
            "reward_length_penalty": (float(-len_pen.sum()), n),
            "reward_truncation_penalty": (float(-trunc_pen.sum()), n),
            "advantage": (float(adv.sum()), n),
            "advantage_abs": (float(adv.abs().sum()), n),
            "completion_length": (tokens, n),  # sampled tokens, the stop token included
            "completion_length_max": (float(lengths.max()), 1.0),
            "truncated": (float(truncated.sum()), n),
            "groups_all_equal": (equal_groups, float(len(flat))),
            "time_sample_s": (t1 - t0, 1.0),
            "time_score_s": (t2 - t1, 1.0),
            "time_logprobs_s": (t3 - t2, 1.0),
            "sampled_tokens_per_s": (tokens, max(t1 - t0, 1e-9)),
        }
        if entropy is not None:  # per token, of the distribution sampled (at its T); else from the loss pass
            metrics["entropy"] = (sum(entropy), tokens)
        if kl_seq is not None:
            metrics["kl"] = (float(kl_seq.sum()), n)  # sum over a completion's tokens of log pi - log pi_ref, mean over samples
        metrics.update(mismatch)
        metrics.update(dynamic["metrics"] if dynamic is not None else {})
        self.check_stall(generation, metrics, next(model.parameters()).device)
        self.write_samples(generation, samples, texts, rewards.flatten().tolist(), total.flatten().tolist())
        micro = []
        start = 0
        for g in groups:
            micro.append(samples[start : start + len(g) * p.k])
            start += len(g) * p.k
        return {"generation": generation, "micro": micro, "metrics": {k: list(v) for k, v in metrics.items()}}

    # Newer algorithms' parts of a rollout --------------------------------------------------
    def dynamic_refill(self, model, flat: list[int], completions, rewards: torch.Tensor,
                       generation: int) -> dict:
        """DAPO's dynamic sampling over this process's places in the step: each place whose group has no
        signal gets a freshly drawn prompt (`replacement_prompts`, by its global place), sampled and scored,
        for up to rl.dynamic_sampling_rounds rounds. Returns the kept prompts, completions and rewards,
        `keep` (whether each place has signal) and the metrics ((sum, count): counts for the whole step)."""
        p, plan = self.p, self.plan
        flat, completions, rewards = list(flat), list(completions), rewards.clone()
        offset = plan.rank * plan.bs * plan.accum  # this process's first place in the step's global batch
        good = informative_groups(self.decision_rewards(completions, rewards)).tolist()
        drawn, dropped, rounds = len(flat), good.count(False), 0
        try:
            for draw in range(1, p.dynamic_sampling_rounds + 1):
                missing = [j for j, ok in enumerate(good) if not ok]
                if not missing:
                    break
                rounds = draw
                places = [offset + j for j in missing]
                picks = replacement_prompts(self.cfg.seed, generation, draw, places, len(self.prompts))
                messages = [self.prompts[i]["messages"] for i in picks]
                new = self.sample(model, messages, [generation, "dynamic", draw], salts=picks)
                scores = self.score_groups(picks, new, generation)
                ok = informative_groups(self.decision_rewards(new, scores)).tolist()
                drawn, dropped = drawn + len(picks), dropped + ok.count(False)
                for j, i, cs, r, o in zip(missing, picks, new, scores.view(len(picks), -1), ok):
                    if o:
                        flat[j], completions[j], good[j] = i, cs, True
                        rewards[j * p.k : (j + 1) * p.k] = r
        finally:
            if self.engine is not None and rounds:
                self.engine.rest()
        unfilled = good.count(False)
        share = 1.0 / plan.world  # per-process counts summed over processes: the step's counts
        metrics = {"dynamic_groups_drawn": (float(drawn), share),
                   "dynamic_groups_dropped": (float(dropped), share),
                   "dynamic_extra_draws": (float(drawn - len(flat)), share),
                   "dynamic_unfilled": (float(unfilled), share),
                   # several processes: the share of them whose part came out short
                   "dynamic_short": (float(unfilled > 0), 1.0)}
        return {"flat": flat, "completions": completions, "rewards": rewards, "keep": torch.tensor(good),
                "metrics": metrics}

    def decision_rewards(self, completions, rewards: torch.Tensor) -> torch.Tensor:
        """[groups, k] rewards after the length and truncation shaping (what the advantages use, RLOO's
        KL term aside): the rewards dynamic sampling compares within a group."""
        p = self.p
        shape = (len(completions), p.k)
        flat = [c for cs in completions for c in cs]
        lengths = torch.tensor([len(c.token_ids) + (c.stop_id is not None) for c in flat]).double()
        truncated = torch.tensor([c.stop_id is None for c in flat], dtype=torch.float64).view(shape)
        lp = p.length_penalty
        pen = length_penalty(lengths.view(shape), lp.kind, lp.coef, lp.target, p.max_new_tokens).double()
        return rewards.view(shape) - pen - p.truncation_penalty * truncated

    def score_groups(self, flat: list[int], completions, generation) -> torch.Tensor:
        """The reward backend on k completions per prompt (flat, float64), failures as in `rollout`."""
        k = self.p.k
        messages = [self.prompts[i]["messages"] for i in flat for _ in range(k)]
        columns = [self.prompts[i].get("columns") or {} for i in flat for _ in range(k)]
        try:
            scores = self.backend.score(messages, [c.text for cs in completions for c in cs], columns=columns)
        except Exception as e:
            raise SourceFailed(f"the reward backend failed ({type(e).__name__}: {e})") from e
        rewards = torch.tensor(scores, dtype=torch.float64)
        if rewards.shape != (len(flat) * k,) or not torch.isfinite(rewards).all():
            raise TrainingDiverged(f"the reward backend returned {len(scores)} reward(s) for {len(flat) * k} "
                                   f"completions, or non-finite ones, at generation {generation + 1}; "
                                   "stopped before updating the weights")
        return rewards

    def reinforce_pp_advantages(self, total: torch.Tensor, samples: list[dict], old, ref,
                                weights: torch.Tensor):
        """REINFORCE++ per-token advantages (lists per sample) and their per-sample means ([groups, k])."""
        p = self.p
        r = total - total.mean(-1, keepdim=True) if p.advantage == "reinforce_pp_baseline" else total
        n_tokens = torch.tensor([len(s["completion_ids"]) for s in samples])
        rows = torch.repeat_interleave(torch.arange(len(samples)), n_tokens)
        if ref is not None and p.beta > 0:
            kl = torch.tensor([a - b for o, f in zip(old, ref) for a, b in zip(o, f)], dtype=torch.float64)
        else:
            kl = torch.zeros(len(rows), dtype=torch.float64)
        returns = reinforce_pp_token_returns(r.flatten(), kl, rows, n_tokens, p.beta)
        w = weights.flatten()[rows]
        sums = [w.sum(), (w * returns).sum(), (w * returns * returns).sum()]
        totals = torch.tensor([float(x) for x in sums], dtype=torch.float64)
        if self.plan.world > 1:  # normalised over the whole step, all processes
            totals = totals.to(distributed_state().device)
            torch.distributed.all_reduce(totals)
        adv = whiten(returns, w, tuple(totals.cpu().tolist()))
        per_seq = torch.zeros(len(samples), dtype=adv.dtype).index_add(0, rows, adv) / n_tokens.clamp(min=1)
        return [a.tolist() for a in adv.split(n_tokens.tolist())], per_seq.view(total.shape)

    def sampler_view_logps(self, model, samples: list[dict], old: list[list[float]]):
        """The trainer's log-probs of the sampled tokens under the distribution the sampler drew from (each
        sample's temperature, rl.top_k, rl.top_p; `sampling_logprobs`), for the sampler correction: vLLM's
        processed log-probs are of that distribution. Without truncation that is `old` (at each sample's
        temperature). A token the sampler kept but the trainer's truncation drops (at the nucleus's edge,
        where the engines' floats differ) has probability 0 for the trainer: it gets TRUNCATED_LOGP (an
        importance weight of 0, a finite mismatch) and is counted, as vllm_outside_truncation (share)."""
        p = self.p
        if p.top_p >= 1.0 and p.top_k <= 0:
            return old, {}
        temps = [p.sample_temperatures()[s["index"]] for s in samples]  # 0 greedy: as vLLM reports it
        bs = max(1, self.cfg.train.batch_size * p.k)
        got = sampling_sample_logps(model, samples, self.chat.pad_id, bs, temps, p.top_k, p.top_p)
        outside = sum(x == float("-inf") for xs in got for x in xs)
        got = [[max(x, TRUNCATED_LOGP) for x in xs] for xs in got]
        return got, {"vllm_outside_truncation": (float(outside), float(sum(len(xs) for xs in got)))}

    one_sampling_call = True
    """All k samples of every prompt in one decoding call, each row at its temperature (False: one call
    per distinct temperature, as before; kept for bench/rl_step.py's before/after)."""

    def sample(self, model, messages: list[list[dict]], generation: int, salts: list | None = None):
        """k completions per prompt, each sample index at its temperature, in one decoding call.
        salts: each prompt's row in the prompt list, in its seeds (two copies of a prompt differ)."""
        p = self.p
        temps = p.sample_temperatures()
        if self.one_sampling_call:
            params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=max(temps), top_p=p.top_p,
                                    top_k=p.top_k, n=p.k, seed=sampling_seed(self.cfg.seed, generation, 0))
            per_row = None if len(set(temps)) == 1 else temps
            if self.engine is not None:
                return self.engine.generate(self.chat, messages, params, salts=salts, temperatures=per_row)
            return generate(model, self.chat, messages, params, p.generation_batch_size, salts=salts,
                            temperatures=per_row)
        out = [[None] * p.k for _ in messages]
        for group, t in enumerate(sorted(set(temps))):
            idx = [j for j, x in enumerate(temps) if x == t]
            params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=t, top_p=p.top_p, top_k=p.top_k, n=len(idx),
                                    seed=sampling_seed(self.cfg.seed, generation, group))
            if self.engine is not None:
                results = self.engine.generate(self.chat, messages, params, salts=salts)
            else:
                results = generate(model, self.chat, messages, params, p.generation_batch_size, salts=salts)
            for i, cs in enumerate(results):
                for j, c in zip(idx, cs):
                    out[i][j] = c
        return out

    def check_stall(self, generation: int, metrics: dict, device) -> None:
        """Guard-rail: nearly every completion truncated, or nearly every group tied, for rl.stall_rollouts
        rollouts in a row: a loud warning with the fix (and with rl.stop_on_stall, a stop at the last step).
        Shares are over all processes, so every process decides alike."""
        p = self.p
        if not p.stall_rollouts:
            return
        sums = torch.tensor([metrics["truncated"][0], metrics["truncated"][1], metrics["groups_all_equal"][0],
                             metrics["groups_all_equal"][1]], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.plan.world > 1:
            sums = sums.to(device)
            torch.distributed.all_reduce(sums)
        trunc, n, tied, groups = sums.cpu().tolist()
        masked = " and mask_truncated leaves them out of the loss" if p.mask_truncated else ""
        fixes = {
            "truncated": (trunc / max(n, 1), f"of the completions were cut at rl.max_new_tokens ({p.max_new_tokens}): "
                          f"their rewards judge unfinished replies{masked}. Raise rl.max_new_tokens, or start from a "
                          "model that ends its replies with the end-of-turn token (SFT), or add rl.truncation_penalty"),
            "tied": (tied / max(groups, 1), f"of the groups had all {p.k} shaped rewards equal: their advantages are 0 "
                     "and nothing is learnt from them. Check that the reward can tell the samples apart "
                     "(samples.jsonl), make the prompts easier or raise rl.k or the temperature"
                     + (", or raise rl.dynamic_sampling_rounds" if p.dynamic_sampling
                        else ", or set rl.dynamic_sampling: true")),
        }
        for name, (share, why) in fixes.items():
            self.stalled[name] = self.stalled.get(name, 0) + 1 if share >= p.stall_share else 0
            if self.stalled[name] and self.stalled[name] % p.stall_rollouts == 0:  # again after each further streak
                message = (f"{share:.0%} {why} (the last {self.stalled[name]} rollouts in a row, up to generation "
                           f"{generation + 1})")
                if p.stop_on_stall:
                    raise SourceFailed(f"rl.stop_on_stall: {message}")
                log.warning("!!! RL IS NOT LEARNING: %s. Set rl.stop_on_stall: true to stop here instead.", message)

    def write_samples(self, generation: int, samples, texts, rewards, totals) -> None:
        every = self.p.log_samples_steps
        if self.samples_path is None or not every or generation % every:
            return
        with self.samples_path.open("a") as f:
            for s, text, r, t in list(zip(samples, texts, rewards, totals))[: self.p.samples_per_log]:
                prompt = last_user_text(self.prompts[s["prompt"]]["messages"])
                f.write(json.dumps({"step": generation * self.p.num_iterations + 1, "prompt": prompt,
                                    "sample": s["index"], "completion": text, "reward": r, "shaped_reward": t,
                                    "advantage": s["advantage"], "truncated": s["truncated"]}) + "\n")


# --------------------------------------------------------------------------- the loss


ALWAYS_OLD_PASS = False
"""Run the no-grad policy pass even where nothing needs it (the behaviour before; bench/rl_step.py)."""


def old_pass_needed(p: RLParams) -> bool:
    """Whether a rollout needs the policy's no-grad log-probs at sampling time: the old log-probs of GRPO's
    later iterations on a batch, the sampler/trainer comparison of vLLM, RLOO's KL in the reward. Else
    (GRPO with one iteration, RLOO with beta 0) the loss pass is at the sampling weights: its log-probs
    are the old ones (ratio 1), and it logs the entropy (and GRPO's kl)."""
    return (ALWAYS_OLD_PASS or p.engine == "vllm" or (p.algo == "grpo" and p.num_iterations > 1)
            or (p.algo == "rloo" and p.beta > 0)
            or (p.advantage != "group" and p.beta > 0))  # REINFORCE++: the KL in the reward, per token


def rl_loss_fn(p: RLParams):
    how = p.agg()

    def loss_fn(model, batch) -> LossOutput:
        stats_here = not old_pass_needed(p)
        args = (model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("temperatures"),
                batch.get("position_ids"))
        if stats_here:
            logps, entropy, mask = label_logps_entropy(*args)
        else:
            logps, mask = label_logps(*args)
        rows = mask.nonzero()[:, 0]
        n_tokens = mask.sum(-1)
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old
        token_losses, clipped = policy_token_losses(logps, old, batch["advantages"], rows, n_tokens, p.algo, p.epsilon,
                                                    p.epsilon_high, p.importance_level, batch.get("is_weights"),
                                                    p.loss, batch.get("token_advantages"))
        metrics = {}
        if stats_here:  # what the skipped no-grad pass would have logged, from this pass at the same weights
            count = torch.tensor(float(len(entropy)), device=entropy.device)
            metrics["entropy"] = torch.stack([entropy.sum(), count]).double()
            if batch.get("ref_logps") is not None:
                kl_sum = (logps.detach() - batch["ref_logps"]).sum()
                seqs = torch.tensor(float(len(n_tokens)), device=kl_sum.device)
                metrics["kl"] = torch.stack([kl_sum, seqs]).double()
        if p.kl_in_loss():
            kl = k3_kl(logps, batch["ref_logps"])
            token_losses = token_losses + p.beta * kl
            metrics["kl_k3"] = torch.stack([(kl.detach() * batch["weights"][rows]).sum(), batch["weights"][rows].sum()]).double()
        loss_sum, count = aggregate(token_losses, rows, n_tokens, batch["weights"], how, p.max_new_tokens)
        w = batch["weights"][rows]
        metrics["clip_fraction"] = torch.stack([(clipped.float() * w).sum(), w.sum()]).double()
        return LossOutput(loss_sum, float(count), metrics, tokens=int(batch["attention_mask"].sum()))

    return loss_fn


# --------------------------------------------------------------------------- evaluation on held-out prompts


def make_eval_fn(cfg: RLConfig, chat, backend, gold=None, rows: list[dict] | None = None):
    """Greedy answers to eval_prompts, scored by the training reward (eval_reward) and, with a `gold`
    backend, by the gold reward too (eval_gold_reward): one generation pass, two scores per answer.
    rows: the eval prompts when the caller loaded (and checked) them already."""
    if not cfg.eval_prompts.dataset:
        return None
    if rows is None:
        rows = load_eval_prompts(cfg, backend, gold)
    params = SamplingParams(max_new_tokens=cfg.rl.max_new_tokens, temperature=0.0)

    def eval_fn(model) -> dict:
        state = distributed_state()
        mine = rows[state.process_index :: state.num_processes]
        prompts = [r["messages"] for r in mine]
        outs = [c[0] for c in generate(model, chat, prompts, params, cfg.rl.generation_batch_size)] if mine else []
        texts, columns = [o.text for o in outs], [r["columns"] for r in mine]
        rewards = backend.score(prompts, texts, columns=columns) if mine else []
        golds = gold.score(prompts, texts, columns=columns) if mine and gold is not None else []
        # lengths count every sampled token, the stop token included, as completion_length and max_new_tokens do
        lengths = sum(len(o.token_ids) + (o.stop_id is not None) for o in outs)
        cut = sum(o.finish_reason == "length" for o in outs)
        sums = torch.tensor([sum(rewards), len(rewards), lengths, cut, sum(golds)], dtype=torch.float64)
        if state.num_processes > 1:
            sums = sums.to(state.device)
            torch.distributed.all_reduce(sums)
        s = sums.cpu().tolist()
        metrics = {"eval_reward": s[0] / s[1], "eval_completion_length": s[2] / s[1], "eval_truncated": s[3] / s[1]}
        if gold is not None:
            metrics["eval_gold_reward"] = s[4] / s[1]
        return metrics

    return eval_fn


def load_eval_prompts(cfg: RLConfig, backend, gold=None) -> list[dict]:
    """The held-out prompts, checked against both rewards' verifiers (naming row and column)."""
    rows = load_prompts(cfg.eval_prompts)
    if not rows:
        raise ConfigError(f"eval_prompts: no prompts in {cfg.eval_prompts.dataset}")
    check_prompt_rows(backend, rows, "eval_prompts")
    if gold is not None:
        check_prompt_rows(gold, rows, "eval_prompts (gold_reward)")
    return rows


def gold_backend(cfg: RLConfig, out: Path):
    """The gold reward's backend (None when gold_reward.kind is none), behind its score cache."""
    if cfg.gold_reward.kind == "none":
        return None
    gold = cfg.gold_reward.as_reward()
    return build_backend(gold, gold.cache_path(out))


# --------------------------------------------------------------------------- the stage


def check_prompt_rows(backend, rows: list[dict], what: str) -> None:
    """Before any work: every prompt row has the columns the reward's verifier needs (naming row and column)."""
    check = getattr(getattr(backend, "backend", backend), "check_rows", None)
    if check is not None:
        check([r["messages"] for r in rows], [r.get("columns") or {} for r in rows],
              where=lambda i: f"{what}: {rows[i]['where']}")


def run_rl(cfg: RLConfig, callbacks=()) -> Path:
    """Train cfg.model with RLOO or GRPO on cfg.prompts against cfg.reward; return the run directory."""
    check_rl_config(cfg)
    out = Path(cfg.output_dir)
    state = distributed_state()
    set_seed(cfg.seed)  # before any model is built
    chat = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.prompts)
    if not prompts:
        raise ConfigError(f"prompts: no prompts in {cfg.prompts.dataset}")
    backend = build_backend(cfg.reward, cfg.reward.cache_path(out) if cfg.reward.cache not in ("auto", "") else None)
    check_prompt_rows(backend, prompts, "prompts")
    gold = gold_backend(cfg, out)  # before the policy loads: a bad gold reward stops the run here
    eval_rows = load_eval_prompts(cfg, backend, gold) if cfg.eval_prompts.dataset else None
    model = with_lora(load_causal_lm(cfg.model, chat), cfg.model)  # LoRA adapters when model.lora.r is set
    ref_model = None
    if cfg.rl.beta > 0 and cfg.model.lora.r is not None and cfg.rl.ref_model is None:
        ref_model = AdaptersOff(model)  # LoRA: the reference is the policy's base, adapters off (no second model)
    elif cfg.rl.beta > 0:
        ref_model = load_causal_lm(cfg.model, chat, path=cfg.rl.ref_model)
        ref_model.requires_grad_(False).to(state.device).eval()
    if cfg.rl.disable_dropout:
        off = sum(disable_dropout(m) for m in (model, ref_model) if m is not None and not isinstance(m, AdaptersOff))
        if off:
            log.info("rl.disable_dropout: %d dropout setting(s) turned off in the policy and reference", off)
    log.info("RL (%s): %d prompts, k=%d samples each, beta=%g, loss aggregation %s", cfg.rl.algo, len(prompts),
             cfg.rl.k, cfg.rl.beta, cfg.rl.agg())

    callbacks = list(callbacks) + win_rate_callbacks(cfg.win_rate, chat, out)
    with colocated_engine(cfg, chat, state) as engine:

        def source_fn(world: int, rank: int) -> RolloutSource:
            return RolloutSource(cfg, chat, prompts, backend, ref_model, world, rank, out, state.is_main_process, engine)

        # with a gold reward, also the starting policy's scores (step 0): where proxy and gold start
        run = RunOptions(out, cfg.seed, cfg.resume, cfg.quiet, config=cfg, eval_at_start=gold is not None)
        train(model, chat, None, None, None, rl_loss_fn(cfg.rl), cfg.train, run,
              callbacks, source_fn=source_fn, eval_fn=make_eval_fn(cfg, chat, backend, gold, eval_rows))
        if engine is not None:
            log.info("vLLM: %d weight push(es) into the running engine", engine.pushes)
    return out


@contextmanager
def colocated_engine(cfg: RLConfig, chat, state):
    """rl.engine vllm: a `ColocatedVLLM` for the policy's starting checkpoint, in this process (one per process under
    torchrun/accelerate launch, each sampling its own share of the prompts); else None."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("rl under FSDP is not supported (the policy samples and evaluates replies whose lengths differ "
                          "across processes, and FSDP needs every process in lockstep); use DDP (torchrun or "
                          "recipes/accelerate/ddp.yaml): with rl.engine vllm each process then gets its own engine")
    if cfg.rl.engine != "vllm":
        yield None
        return
    if state.num_processes > 1 and cfg.rl.vllm.tensor_parallel_size > 1:
        raise ConfigError("rl.vllm.tensor_parallel_size > 1 is not supported with several processes: each process runs "
                          "its own colocated engine on its own device")
    if chat.added_tokens:
        raise ConfigError(f"rl.engine: vllm: the tokenizer gained {chat.added_tokens} for its chat template, which "
                          "vLLM would not load; save the model with `alignkit init-model` (or after SFT) and train "
                          "from that checkpoint")
    options = cfg.rl.vllm
    sleep = options.sleep
    if sleep:
        sleep, why = sleep_mode_available()
        if not sleep:
            log.warning("rl.vllm.sleep: skipped, %s; the engine keeps its memory between rollouts", why)
    # processed_logprobs: the sampler's log-probs of the distribution it drew from (temperature, top-k,
    # top-p), which the trainer's side reproduces: its log-probs at each sample's temperature, and
    # `sampler_view_logps` under truncation
    lora = cfg.model.lora.r
    if lora is not None and is_adapter_dir(cfg.model.name_or_path):
        raise ConfigError(f"model.name_or_path: {cfg.model.name_or_path} is an adapter folder; with model.lora and rl.engine: "
                          "vllm the engine holds the base and gets the new adapter as LoRA requests: write a merged model "
                          "with `alignkit merge` and train from that")
    # Several processes (torchrun/accelerate launch): each gets its own engine for its share of the prompts
    # (vLLM's external_launcher backend, as TRL's colocate mode), and pushes its own policy copy into it.
    # LoRA: the engine keeps the base; each update's adapter goes in as a new LoRA request (ColocatedVLLM.sync)
    with vllm_engine(cfg.model, cfg.train.precision, options, cfg.seed, in_process=True, sleep_mode=sleep,
                     logprobs_mode="processed_logprobs", lora_rank=lora,
                     external_launcher=state.num_processes > 1) as llm:
        yield ColocatedVLLM(llm, sleep=sleep, adapter_dir=Path(cfg.output_dir) / "vllm_adapters" if lora else None)
