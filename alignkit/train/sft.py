"""Supervised fine-tuning: the masked negative log-likelihood of the assistant tokens.

Optionally with a length penalty on sampled responses (`sft.length_penalty: λ`, off at 0): on every
N-th optimizer step (`sft.length_penalty_every`; steps N, 2N, ...) the first
`sft.length_penalty_samples` chat rows of that step's own global batch get one response each,
sampled from the current policy (seeded from the run's seed and the step, so a resumed run samples
what the uninterrupted one did). Each pays p_i = λ·max(0, len(sample_i) − len(reference_i))², in
tokens, the end-of-turn token counted on both sides; the reference is the row's own (first trained)
reply. The sampled length is not differentiable, so the term is score-function (REINFORCE) with a
leave-one-out baseline b_i = mean of the other samples' penalties (unbiased, as RLOO): the step's
loss is

    SFT loss (token mean over the step) + mean_i (p_i − b_i) · log π(y_i),

log π(y_i) summed over the sample's tokens, whose gradient is the REINFORCE estimate of ∇ E[p].
It lives in the one loop as a data source plus a loss: `LengthPenaltySource` appends the sampled
responses as extra micro-batches, each sample carrying its coefficient (p_i − b_i)·T/n, where T is
the step's SFT target tokens over all processes and n the samples, and `sft_penalty_loss` adds
coefficient · log π(y_i) at zero units, so the loop's division by T gives the formula above at any
micro-batch split or number of processes.

Simplifications: one sample per prompt (two rows with the same prompt in one step get the same
sample); multi-turn rows are penalised on their first trained reply only; plain-text rows are never
sampled. Logged per penalty step: `length_penalty` (mean p), `sampled_length`, `reference_length`
(mean tokens), and, on every step, `sft_loss` (the NLL alone, as `loss` then includes the term).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import set_seed

from ..config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ..data.chat import IGNORE_INDEX, render, tokenize_prompt
from ..data.collate import collate_lm
from ..data.prepare import load_examples, tokenize_conversations
from ..data.schema import DataError, first_turn
from .winrate_callback import WinRateDuringTraining, win_rate_callbacks
from ..generation import SamplingParams, generate
from ..models import load_causal_lm, load_tokenizer, with_lora
from .logprobs import label_logps, per_sequence
from .loop import ExampleSource, LossOutput, RunOptions, StepPlan, check_plan, make_plan, train
from .rl import collate_rollout, rloo_advantages, sampling_seed

log = logging.getLogger(__name__)


@dataclass
class SFTParams:
    length_penalty: float = 0.0
    """λ of the penalty λ·max(0, len(sample) − len(reference reply))² in tokens on sampled responses (0: off)."""
    length_penalty_every: int = 1
    """Sample for the penalty on every N-th optimizer step (steps N, 2N, ...)."""
    length_penalty_samples: int = 8
    """Prompts sampled per penalty step (one response each): the first chat rows of the step's global batch.
    At least 2 (leave-one-out baseline) and at most the global batch."""
    length_penalty_temperature: float = 1.0
    """Sampling temperature of the penalty's responses (> 0: the estimator needs samples of the policy)."""
    length_penalty_max_new_tokens: int = 256
    """Longest sampled response; one cut there counts this many tokens."""


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
    sft: SFTParams = field(default_factory=SFTParams)
    """The length penalty on sampled responses (off unless sft.length_penalty > 0)."""


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
    logps, mask = label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                              position_ids=batch.get("position_ids"))
    return LossOutput(-logps.sum(), int(mask.sum()), tokens=int(batch["attention_mask"].sum()))


# --------------------------------------------------------------------------- the length penalty (pure)


def reply_length_penalty(sampled: torch.Tensor, reference: torch.Tensor, coef: float) -> torch.Tensor:
    """λ·max(0, sampled − reference)² per sample (lengths in tokens)."""
    return coef * (sampled.double() - reference.double()).clamp(min=0) ** 2


def penalty_coefficients(penalties: torch.Tensor, step_units: float) -> torch.Tensor:
    """Per-sample weight on log π(y_i) in a loss that the loop divides by `step_units`:
    (p_i − b_i) · step_units / n, b_i the mean penalty of the other n − 1 samples (leave-one-out)."""
    centred = rloo_advantages(penalties.double().view(1, -1)).view(-1)  # p_i − mean of the other penalties
    return centred * step_units / len(penalties)


def reference_reply_length(labels: list[int], prompt_tokens: int) -> int:
    """Tokens of an example's first trained reply (its end-of-turn token included)."""
    n = 0
    for t in labels[prompt_tokens:]:
        if t == IGNORE_INDEX:
            break
        n += 1
    return n


def sft_penalty_loss(model, batch: dict) -> LossOutput:
    """SFT micro-batches as `sft_loss` (with the NLL also as metric `sft_loss`); a micro-batch of sampled
    responses (it carries `penalty_coef`) adds Σ_i coef_i · log π(y_i) at zero units."""
    if "penalty_coef" not in batch:
        out = sft_loss(model, batch)
        nll = out.loss_sum.detach().double().cpu()
        out.metrics["sft_loss"] = torch.stack([nll, torch.tensor(float(out.count), dtype=torch.float64)])
        return out
    logps, mask = label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                              position_ids=batch.get("position_ids"))
    seq_logps, _ = per_sequence(logps, mask)
    return LossOutput((batch["penalty_coef"] * seq_logps).sum(), 0, tokens=int(batch["attention_mask"].sum()))


# --------------------------------------------------------------------------- the length penalty's source


def prompt_key(ids) -> str:
    return json.dumps(list(ids))


def penalty_prompts(rows: list[dict], chat, data: DataConfig) -> dict[str, tuple[list[dict], list[int]]]:
    """Each chat row's prompt (the conversation before its first trained reply) as (messages, prompt ids),
    keyed by its prompt ids and by its rendered text (how an example's prompt tokens are matched back)."""
    out: dict[str, tuple[list[dict], list[int]]] = {}
    seen = set()
    for row in rows:
        if row.get("messages") is None:
            continue
        messages = first_turn(row["messages"]) if data.first_turn_only else row["messages"]
        replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        context = row.get("context_replies") or 0
        if len(replies) <= context:
            continue
        prompt = messages[: replies[context]]
        key = json.dumps(prompt, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        ids = tokenize_prompt(chat.tokenizer, prompt)
        out.setdefault(prompt_key(ids), (prompt, ids))
        out.setdefault(render(chat.tokenizer, prompt, add_generation_prompt=True), (prompt, ids))
    return out


class LengthPenaltySource(ExampleSource):
    """SFT's micro-batches, plus on every N-th step the sampled responses of the length penalty."""

    def __init__(self, data, plan: StepPlan, params: SFTParams, chat, prompts: dict, seed: int, world: int, rank: int):
        super().__init__(data, partial(collate_lm, pad_token_id=chat.pad_id), plan)
        self.p, self.chat, self.prompts, self.seed, self.world, self.rank = params, chat, prompts, seed, world, rank
        self.batch_size = plan.bs
        if params.length_penalty_samples > plan.global_batch:
            raise ConfigError(
                f"sft.length_penalty_samples: {params.length_penalty_samples} is more than the global batch of "
                f"{plan.global_batch} rows (train.batch_size x train.grad_accum x {world} processes) it samples from"
            )
        self.metrics: dict[str, tuple[float, float]] = {}

    def micro_batches(self, step: int, model) -> list[dict]:
        micro = super().micro_batches(step, model)
        self.metrics = {}
        if (step + 1) % self.p.length_penalty_every:
            return micro
        chat_rows = [i for i in self.plan.step_batch(step) if self.data[i]["prompt_tokens"] > 0]
        chosen = chat_rows[: self.p.length_penalty_samples]
        rows = [self.data[i] for i in chosen[self.rank :: self.world]]
        prompts = [self.prompt_of(r) for r in rows]
        params = SamplingParams(max_new_tokens=self.p.length_penalty_max_new_tokens,
                                temperature=self.p.length_penalty_temperature, seed=sampling_seed(self.seed, step, 0))
        outs = generate(model, self.chat, [m for m, _ in prompts], params, max(1, len(prompts))) if prompts else []
        completions = [c[0] for c in outs]
        samples = [{"prompt_ids": ids, "completion_ids": list(c.token_ids) + ([c.stop_id] if c.stop_id is not None else [])}
                   for (_, ids), c in zip(prompts, completions)]
        sampled = torch.tensor([len(s["completion_ids"]) for s in samples], dtype=torch.float64)
        reference = torch.tensor([reference_reply_length(r["labels"], r["prompt_tokens"]) for r in rows],
                                 dtype=torch.float64)
        penalties = reply_length_penalty(sampled, reference, self.p.length_penalty)
        n = float(len(samples))
        self.metrics = {"length_penalty": (float(penalties.sum()), n), "sampled_length": (float(sampled.sum()), n),
                        "reference_length": (float(reference.sum()), n)}
        sft_units = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        everyone, offset, sft_units = self.gather(penalties.tolist(), sft_units)
        if len(everyone) < 2 or not samples:  # no baseline with fewer than two samples over all processes
            return micro
        coefs = penalty_coefficients(torch.tensor(everyone, dtype=torch.float64), sft_units)
        coefs = coefs[offset : offset + len(samples)]
        for s, c in zip(samples, coefs.tolist()):
            s.update(advantage=c, weight=1.0)
        for start in range(0, len(samples), self.batch_size):
            batch = collate_rollout(samples[start : start + self.batch_size], self.chat.pad_id)
            batch["penalty_coef"] = batch.pop("advantages")
            del batch["weights"]
            micro.append(batch)
        return micro

    def prompt_of(self, row: dict) -> tuple[list[dict], list[int]]:
        ids = row["input_ids"][: row["prompt_tokens"]]
        found = self.prompts.get(prompt_key(ids)) or self.prompts.get(self.chat.tokenizer.decode(ids))
        if found is None:
            raise DataError("length penalty: cannot find the messages of a training example's prompt "
                            f"{self.chat.tokenizer.decode(ids)[:200]!r} among the chat rows")
        return found

    def gather(self, penalties: list[float], sft_units: int) -> tuple[list[float], int, int]:
        """All processes' penalties (rank order), where this process's start, and the step's SFT units."""
        if self.world == 1:
            return penalties, 0, sft_units
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, (penalties, sft_units))
        everyone = [p for ps, _ in parts for p in ps]
        return everyone, sum(len(ps) for ps, _ in parts[: self.rank]), sum(u for _, u in parts)

    def step_metrics(self) -> dict[str, tuple[float, float]]:
        return self.metrics


def run_sft(cfg: SFTConfig, callbacks=()) -> Path:
    """Fine-tune cfg.model on cfg.data; return the run directory."""
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # before any model is built
    chat = load_tokenizer(cfg.model)
    train_rows, eval_rows = load_examples(cfg.data, "text", cfg.seed)  # chats, or plain text
    train_data = tokenize_conversations(train_rows, chat, cfg.data, "tokenise train")
    check_plan(train_data, cfg.train)  # train.max_tokens_per_batch fits the data
    eval_data = tokenize_conversations(eval_rows, chat, cfg.data, "tokenise eval") if eval_rows else None
    log.info("SFT: %d training examples, %d eval examples", len(train_data), len(eval_data) if eval_data else 0)
    model = with_lora(load_causal_lm(cfg.model, chat), cfg.model)  # LoRA adapters when model.lora.r is set
    callbacks = list(callbacks) + win_rate_callbacks(cfg.win_rate, chat, out)
    source_fn, loss_fn = None, sft_loss
    if cfg.sft.length_penalty > 0:
        prompts = penalty_prompts(train_rows, chat, cfg.data)
        if not prompts:
            raise DataError("sft.length_penalty needs chat rows (a prompt and a reply); the training data are plain text")
        log.info("SFT length penalty: λ %g every %d step(s) on %d sampled responses", cfg.sft.length_penalty,
                 cfg.sft.length_penalty_every, cfg.sft.length_penalty_samples)

        def source_fn(world: int, rank: int) -> LengthPenaltySource:
            plan = make_plan(train_data, cfg.train, world, rank, cfg.seed)
            return LengthPenaltySource(train_data, plan, cfg.sft, chat, prompts, cfg.seed, world, rank)

        loss_fn = sft_penalty_loss
    train(
        model,
        chat,
        train_data,
        eval_data,
        collate=partial(collate_lm, pad_token_id=chat.pad_id),
        loss_fn=loss_fn,
        cfg=cfg.train,
        run=RunOptions(out, cfg.seed, cfg.resume, cfg.quiet, config=cfg),
        callbacks=callbacks,
        source_fn=source_fn,
    )
    return out
