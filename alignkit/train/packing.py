"""Which examples each optimizer step reads when micro-batches are filled to a token budget
(`train.max_tokens_per_batch`) or grouped by length (`train.group_by_length`).

Both are StepPlans, so data order stays a pure function of (seed, epoch, step) and a resumed run
recomputes where it was. With a token budget, the micro-batches (bins) are made once from the
examples' lengths (`data.packing.token_budget_bins`), each optimizer step reads grad_accum x
processes of them, and the bins' order is a seeded permutation per epoch; steps per epoch are
bins // (grad_accum x processes), the last incomplete step of an epoch is dropped as in StepPlan.
Length grouping keeps StepPlan's batches of batch_size examples, in an order where each run of 50
global batches is sorted by length (HF's LengthGroupedSampler, simply).

Simplifications: the bins do not change between epochs (only their order); a step's number of
examples varies with their lengths (the loss is a per-unit mean over the step, so this weights
every token or pair alike, as padded training does).
"""

from __future__ import annotations

import torch

from ..config import ConfigError, TrainConfig
from ..data.loading import DataError
from ..data.packing import check_budget, example_sizes, length_grouped, token_budget_bins
from .loop import StepPlan

MEGABATCH = 50
"""Global batches per length-sorted run of `train.group_by_length` (HF's megabatch_mult)."""


class LengthGroupedPlan(StepPlan):
    """StepPlan whose per-epoch permutation is length-grouped (`data.packing.length_grouped`)."""

    def __init__(self, lengths: list[int], cfg: TrainConfig, world: int, rank: int, seed: int):
        super().__init__(len(lengths), cfg, world, rank, seed)
        self.lengths = lengths

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            base = StepPlan.permutation(self, epoch)
            self._perm = (epoch, length_grouped(base, self.lengths, MEGABATCH * self.global_batch))
        return self._perm[1]


class TokenBudgetPlan(StepPlan):
    """Micro-batches of at most `train.max_tokens_per_batch` tokens; grad_accum of them per process and step."""

    def __init__(self, sizes: list[tuple[int, int, int]], cfg: TrainConfig, world: int, rank: int, seed: int):
        self.n, self.bs, self.accum, self.world, self.rank, self.seed = len(sizes), cfg.batch_size, cfg.grad_accum, world, rank, seed
        self.packing = cfg.packing
        if min(cfg.grad_accum, cfg.max_steps or cfg.epochs) < 1:
            raise ConfigError(f"train: grad_accum {cfg.grad_accum}, epochs {cfg.epochs}, max_steps {cfg.max_steps} "
                              "give no optimizer step; each must be at least 1")
        budget = cfg.max_tokens_per_batch
        try:
            check_budget(sizes, budget, cfg.packing)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.bins = token_budget_bins(sizes, budget, cfg.packing)
        self.per_step = cfg.grad_accum * world
        self.steps_per_epoch = len(self.bins) // self.per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.n} training examples fill {len(self.bins)} micro-batches of train.max_tokens_per_batch "
                f"{budget} tokens, fewer than one optimizer step's {self.per_step} (grad_accum {cfg.grad_accum} x "
                f"{world} processes)"
            )
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.global_batch = min(len(b) for b in self.bins) * self.per_step
        """The fewest examples a step can hold (what a source that samples from a step may count on)."""
        self._perm = None

    def permutation(self, epoch: int) -> list[int]:
        """The bins' order in this epoch."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm = (epoch, torch.randperm(len(self.bins), generator=g).tolist())
        return self._perm[1]

    def step_bins(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[k * self.per_step : (k + 1) * self.per_step]

    def step_batch(self, step: int) -> list[int]:
        return [i for b in self.step_bins(step) for i in self.bins[b]]

    def micro_batches(self, step: int) -> list[list[int]]:
        mine = self.step_bins(step)[self.rank * self.accum : (self.rank + 1) * self.accum]
        return [self.bins[b] for b in mine]


def make_plan(data, cfg: TrainConfig, world: int, rank: int, seed: int) -> StepPlan:
    """The StepPlan that train.max_tokens_per_batch / train.group_by_length ask for (plain StepPlan otherwise)."""
    if cfg.max_tokens_per_batch:
        return TokenBudgetPlan(example_sizes(data), cfg, world, rank, seed)
    if cfg.group_by_length:
        return LengthGroupedPlan([s[2] for s in example_sizes(data)], cfg, world, rank, seed)
    return StepPlan(len(data), cfg, world, rank, seed)


def check_plan(data, cfg: TrainConfig) -> None:
    """At a stage's start (before any long pass): the batching settings work on these examples."""
    if cfg.max_tokens_per_batch or cfg.group_by_length:
        from .loop import distributed_state

        make_plan(data, cfg, distributed_state().num_processes, 0, 0)
