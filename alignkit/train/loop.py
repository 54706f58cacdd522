"""The one training loop every method uses.

A method supplies `collate(examples) -> batch` and `loss_fn(model, batch) -> LossOutput`, where
the loss is a *sum* over units (tokens for SFT, pairs for DPO) and `count` says how many units
it covered. The loop divides by the number of units in the whole optimizer step, summed over
micro-batches and processes, so the loss and its gradient do not depend on how a global batch
is split into accumulation steps or processes.

Data order is a pure function of (seed, epoch) and the step number (also with micro-batches filled
to a token budget or grouped by length: TokenBudgetPlan, LengthGroupedPlan), which is what makes resume
exact: a resumed run recomputes where it was instead of replaying a data loader. A checkpoint also
holds the open logging window, so the log lines after a resume match an uninterrupted run's.

Where each step's batches come from is a `StepSource`: a fixed list of examples (SFT, DPO, reward
models: `ExampleSource`) or a method that makes them at each step from the current model (online
RL: prompts -> samples -> rewards -> advantages, `train/rl.py`). A source's own state (e.g. a
rollout that several optimizer steps reuse) is saved with each checkpoint, so resume stays exact.

The run's config.yaml is written only once the run may start (not when it is refused for existing
checkpoints); on resume, settings that change what the run computes must match the saved ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import config as config_lib
from ..config import ConfigError, TrainConfig
from ..data.packing import check_budget, example_sizes, length_grouped, pack_rows, packed_collate, token_budget_bins
from . import checkpoint as ckpt
from . import tracking

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Sum of the per-unit losses of this micro-batch (differentiable)."""
    count: torch.Tensor | int
    """Number of units (target tokens, pairs, ...) the sum covers."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra quantities to report as means (detached): a scalar is a sum over this output's units;
    a tensor [sum, count] is averaged over its own count (e.g. a per-token rate in a per-sequence loss)."""
    tokens: int = 0
    """Input tokens processed, for throughput."""


@dataclass
class RunOptions:
    output_dir: Path
    seed: int = 42
    resume: bool = False
    quiet: bool = False
    config: object | None = None
    """The stage's whole config: written to output_dir/config.yaml once the run may start, and
    compared with the saved one on resume."""
    eval_at_start: bool = False
    """Also evaluate the starting weights, logged at step 0 (not a candidate for the best checkpoint):
    where the eval curves start (RL with a gold reward)."""


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stop: bool = False
    """Set by a callback to end training after this step."""


class Callback:
    """Hooks into the loop; override what you need."""

    def on_step_end(self, state: LoopState, logs: dict) -> None: ...

    def on_evaluate(self, state: LoopState, metrics: dict, model) -> None:
        """May add entries to `metrics` (e.g. a win rate) before early stopping looks at them."""


def distributed_state():
    """The process group (one process, torchrun, or accelerate launch); gloo on CPU-only machines."""
    from accelerate import PartialState

    check_launch(os.environ)
    # Without a GPU, a multi-process launch must be told to use CPU (gloo) explicitly.
    return PartialState(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())


MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


def check_launch(env) -> None:
    """Stop when `accelerate launch --num_processes N` started one process instead of N.

    Without --multi_gpu (or a config saying so) and without several GPUs, accelerate uses its
    single-process launcher: it sets ACCELERATE_USE_CPU and, for N > 1, MASTER_ADDR, but starts
    one process and no WORLD_SIZE, so the run would silently train alone.
    """
    single_launcher = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env  # MASTER_ADDR: N > 1 was asked for
    if single_launcher and "WORLD_SIZE" not in env and not any(v in env for v in MPI_SIZE_VARS):
        raise ConfigError(
            "accelerate launch was asked for several processes but started one (its single-process "
            "launcher, which it uses without --multi_gpu on a machine without several GPUs). Start the "
            "processes with `torchrun --nproc_per_node N -m alignkit.cli ...` or `accelerate launch "
            "--multi_gpu --num_processes N -m alignkit.cli ...` (on CPU both run N gloo processes); "
            "for one process, drop --num_processes (and unset MASTER_ADDR)."
        )


def check_parallelism(accelerator, env) -> None:
    """Stop when accelerate was configured for a kind of parallelism this loop does not run correctly.

    - DeepSpeed: its engine owns gradient accumulation, scaling and clipping and steps the optimizer
      inside `backward`, while this loop divides the summed loss by the units of the whole step after
      all micro-batches (the unit-normalised loss) and steps itself. FSDP2 shards the same things.
    - FSDP asked for (ACCELERATE_USE_FSDP) but not applied: accelerate applies FSDP only across several
      processes on GPUs (on CPU its state stays MULTI_CPU), so the run would silently be plain DDP.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "accelerate is configured for DeepSpeed, which alignkit's training loop does not support (DeepSpeed steps "
            "the optimizer inside backward and scales gradients itself; the loop normalises the loss by the units of "
            "the whole step). Use FSDP2 for sharding: accelerate launch --config_file recipes/accelerate/fsdp2.yaml "
            "(see docs/scaling-out.md)")
    if str(env.get("ACCELERATE_USE_FSDP", "")).lower() == "true" and kind != DistributedType.FSDP:
        raise ConfigError(
            f"accelerate was configured for FSDP but did not apply it (distributed type {kind}): accelerate shards "
            "with FSDP only across several processes on GPUs. On CPU, or with one process, launch without the FSDP "
            "config (e.g. recipes/accelerate/ddp.yaml or torchrun)")


LOWER_IS_BETTER = ("loss", "perplexity")


def higher_is_better(cfg: TrainConfig) -> bool:
    """train.greater_is_better, or when unset inferred from the metric's name as transformers'
    Trainer does: names ending in loss (or perplexity) are better lower, everything else higher."""
    if cfg.greater_is_better is not None:
        return cfg.greater_is_better
    return not cfg.metric_for_best.endswith(LOWER_IS_BETTER)


# Settings that may change on --resume: how long to train, how often to log, evaluate and save,
# and ones that do not change the numbers (where data is cached, tokenisation processes).
RESUMABLE_CHANGES = {
    "output_dir", "train.max_steps", "train.epochs", "train.logging_steps",
    "train.eval_steps", "train.save_steps", "train.save_total_limit", "train.early_stopping_patience",
    "train.gradient_checkpointing", "data.num_proc", "dpo.ref_cache_dir", "dpo.precompute_ref",
    "train.report_to", "rl.log_samples_steps", "rl.samples_per_log", "rl.generation_batch_size", "reward.concurrency",
    "reward.timeout_s", "reward.max_retries", "reward.batch_size",
}


def flat_settings(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> dotted keys, with train.greater_is_better resolved as the loop uses it."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    if not prefix and out.get("train.greater_is_better", False) is None:
        out["train.greater_is_better"] = not str(out.get("train.metric_for_best", "")).endswith(LOWER_IS_BETTER)
    return out


def check_resumed_config(saved_path: Path, config) -> None:
    """On resume: refuse changed settings that alter what the run computes; log the harmless ones."""
    if not saved_path.is_file():
        log.warning("resume: %s is missing; cannot check that the settings match the checkpoint's run", saved_path)
        return
    old = flat_settings(yaml.safe_load(saved_path.read_text()) or {})
    new = flat_settings(yaml.safe_load(yaml.safe_dump(config_lib.to_dict(config), sort_keys=False)) or {})
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and k not in ("resume", "quiet"))
    harmless = [k for k in changed if k in RESUMABLE_CHANGES]
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        raise ConfigError(
            f"--resume: settings differ from the run in {saved_path.parent} ("
            + "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in blocking)
            + "). Resume with the saved settings, or start a new run in another output_dir. "
            f"Allowed to change on resume: {', '.join(sorted(RESUMABLE_CHANGES))}."
        )
    if harmless:
        changes = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in harmless)
        log.info("resume: changed settings (allowed): %s", changes)


def new_window(saved: dict | None = None) -> dict:
    """The sums behind the next log line; `saved` reopens one kept in a checkpoint (its clock restarts)."""
    window = {"loss_sum": 0.0, "count": 0.0, "tokens": 0, "metrics": {}, "source": {}}
    window.update({k: v for k, v in (saved or {}).items() if k in window})
    window["time"] = time.perf_counter()
    return window


def precision_for(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "no" if setting == "fp32" else setting


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-D parameters), as is standard.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )


class StepSource:
    """Where each optimizer step's micro-batches come from (see the module docstring)."""

    total_steps: int
    steps_per_epoch: int

    def micro_batches(self, step: int, model) -> list[dict]:
        """This process's collated micro-batches for optimizer step `step` (0-based)."""
        raise NotImplementedError

    def step_metrics(self) -> dict[str, tuple[float, float]]:
        """(sum, count) per metric of the step just built, on this process; the loop reduces and logs them."""
        return {}

    def state_dict(self) -> dict:
        """JSON-serialisable state that a checkpoint must keep for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def keep_until(self, step: int) -> None:
        """On the main process at start: drop what the source logged after `step` (a resumed or restarted run)."""


class StepPlan:
    """Which examples each process reads at each optimizer step."""

    def __init__(self, n_examples: int, cfg: TrainConfig, world: int, rank: int, seed: int):
        self.n, self.bs, self.accum = n_examples, cfg.batch_size, cfg.grad_accum
        self.world, self.rank, self.seed = world, rank, seed
        self.global_batch = cfg.batch_size * cfg.grad_accum * world
        self.packing = cfg.packing  # each micro-batch collated as one packed row (data/packing.py)
        if min(cfg.batch_size, cfg.grad_accum, cfg.max_steps or cfg.epochs) < 1:  # no optimizer step: never a silent no-op
            raise ConfigError(f"train: batch_size {cfg.batch_size}, grad_accum {cfg.grad_accum}, epochs {cfg.epochs}, "
                              f"max_steps {cfg.max_steps} give no optimizer step; each must be at least 1")
        self.steps_per_epoch = n_examples // self.global_batch
        if self.steps_per_epoch == 0:
            from ..data.loading import DataError

            raise DataError(
                f"{n_examples} training examples are fewer than one global batch of {self.global_batch} "
                f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {world} processes)"
            )
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self._perm: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._perm[1]

    def step_batch(self, step: int) -> list[int]:
        """The examples of optimizer step `step` over all processes, in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(self, step: int) -> list[list[int]]:
        batch = self.step_batch(step)
        per_rank = self.bs * self.accum
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [mine[j * self.bs : (j + 1) * self.bs] for j in range(self.accum)]


class ExampleSource(StepSource):
    """A fixed list of examples, read in the order of a StepPlan and collated per micro-batch."""

    def __init__(self, data, collate: Callable, plan: "StepPlan"):
        self.data, self.collate, self.plan = data, collate, plan
        self.total_steps, self.steps_per_epoch = plan.total_steps, plan.steps_per_epoch

    def micro_batches(self, step: int, model) -> list[dict]:
        batches = [self.collate([self.data[i] for i in idx]) for idx in self.plan.micro_batches(step)]
        return [pack_rows(b) for b in batches] if getattr(self.plan, "packing", False) else batches


# --------------------------------------------------------------------------- token-budget and length-grouped plans
# Which examples each step reads under train.max_tokens_per_batch (micro-batches filled to a token budget:
# bins made once from the examples' lengths by data.packing.token_budget_bins, grad_accum x processes of them
# per step, their order a seeded permutation per epoch) or train.group_by_length (StepPlan's batches in an
# order where each run of MEGABATCH global batches is sorted by length). Both keep data order a pure
# function of (seed, epoch, step), so resume stays exact. The bins do not change between epochs (only
# their order); a step's number of examples varies with their lengths (the loss is a per-unit mean over the
# step, so every token or pair weighs alike, as in padded training).

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
        self.n, self.bs, self.accum = len(sizes), cfg.batch_size, cfg.grad_accum
        self.world, self.rank, self.seed = world, rank, seed
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
            from ..data.loading import DataError

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
        make_plan(data, cfg, distributed_state().num_processes, 0, 0)


def train(
    model,
    chat,
    train_data: list[dict],
    eval_data: list[dict] | None,
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable[[object, dict], LossOutput],
    cfg: TrainConfig,
    run: RunOptions,
    callbacks: list[Callback] = (),
    save_fn: Callable | None = None,
    source_fn: Callable[[int, int], StepSource] | None = None,
    eval_fn: Callable[[object], dict] | None = None,
) -> Path:
    """Train `model` and write the run directory; return the `final/` model directory.

    By default the steps read `train_data` through `collate`; `source_fn(world, rank)` supplies
    them instead (train_data is then unused). `eval_fn(model) -> metrics` replaces the loss-based
    evaluation on `eval_data` (e.g. RL's mean reward on held-out prompts).
    """
    from ..models import save_model

    save_fn = save_fn or save_model
    out = Path(run.output_dir)
    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    state0 = distributed_state()
    cpu_processes = state0.device.type == "cpu" and state0.num_processes > 1
    accelerator = Accelerator(mixed_precision=precision_for(cfg.precision), cpu=cpu_processes,
                              **tracking.accelerator_kwargs(cfg.report_to, out))
    check_parallelism(accelerator, os.environ)
    is_main = accelerator.is_main_process
    torch.manual_seed(run.seed)

    if source_fn is not None:
        plan = source_fn(accelerator.num_processes, accelerator.process_index)
    else:
        order = make_plan(train_data, cfg, accelerator.num_processes, accelerator.process_index, run.seed)
        plan = ExampleSource(train_data, collate, order)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * plan.total_steps)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=plan.total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    state = LoopState()
    resume_from = ckpt.latest_checkpoint(ckpt_root) if run.resume else None
    if not run.resume and ckpt.list_checkpoints(ckpt_root):
        raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, or choose "
                              "a new output_dir")
    if run.resume and resume_from is None:
        log.warning("resume: no complete checkpoint in %s; starting from scratch", ckpt_root)
    saved: dict = {}
    if resume_from is not None:
        if run.config is not None:
            check_resumed_config(out / "config.yaml", run.config)
        ckpt.load_weights_into(accelerator, model, resume_from)
        optimizer_file = resume_from / "optimizer.pt"
        ckpt.load_optimizer_state(accelerator, model, optimizer, ckpt.safe_load(optimizer_file), optimizer_file)
        scheduler.load_state_dict(ckpt.safe_load(resume_from / "scheduler.pt"))
        saved = ckpt.read_state(resume_from)
        state = LoopState(**{k: v for k, v in saved.items() if k in LoopState.__dataclass_fields__})
        ckpt.set_rng_state(ckpt.load_rng_state(resume_from / f"rng_state_{accelerator.process_index}.pt"))
        source_state = resume_from / f"source_state_{accelerator.process_index}.json"
        if source_state.is_file():
            plan.load_state_dict(json.loads(source_state.read_text()))
        log.info("resumed from %s (step %d of %d)", resume_from, state.step, plan.total_steps)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clear_stale(ckpt_root)
        keep_metrics_until(metrics_path, state.step)
        plan.keep_until(state.step)
        if run.config is not None:
            config_lib.save(run.config, out / "config.yaml")
    tracking.start(accelerator, cfg.report_to, run.config, out)  # train.report_to (off when empty)
    accelerator.wait_for_everyone()

    def log_line(record: dict) -> None:
        if not is_main:
            return
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log(accelerator, cfg.report_to, record)
        if run.quiet:
            log.info(" ".join(f"{k}={fmt(v)}" for k, v in record.items()))
        else:
            tqdm.write(" ".join(f"{k}={fmt(v)}" for k, v in record.items()))

    def save_checkpoint() -> None:
        tmp = ckpt.tmp_dir(ckpt_root, state.step)
        if is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        torch.save(ckpt.rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        source_state = plan.state_dict()
        if source_state:
            (tmp / f"source_state_{accelerator.process_index}.json").write_text(json.dumps(source_state))
        accelerator.wait_for_everyone()
        weights = ckpt.gathered_weights(accelerator, model)  # FSDP: gathered from every process's shard
        optimizer_state = ckpt.gathered_optimizer_state(accelerator, model, optimizer)
        if is_main:
            with ckpt.saving_full_weights(unwrapped, weights):
                save_fn(unwrapped, chat, tmp)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            saved_state = vars(state) | {"stop": False, "log_window": {k: v for k, v in window.items() if k != "time"}}
            (tmp / ckpt.STATE_FILE).write_text(json.dumps(saved_state, indent=1))
            ckpt.publish(tmp, ckpt_root / f"step-{state.step}")
            ckpt.prune(ckpt_root, cfg.save_total_limit, {state.best_step} if state.best_step else set())
        accelerator.wait_for_everyone()

    def measure() -> dict:
        if eval_fn is not None:
            metrics = eval_fn(unwrapped)
        else:
            eval_collate = packed_collate(collate) if cfg.packing else collate
            metrics = eval_losses(unwrapped, eval_data, eval_collate, loss_fn, cfg.batch_size, accelerator)
        for cb in callbacks:
            cb.on_evaluate(state, metrics, unwrapped)
        return metrics

    def evaluate() -> dict:
        metrics = measure()
        if cfg.metric_for_best not in metrics:
            raise KeyError(f"train.metric_for_best '{cfg.metric_for_best}' is not among the eval metrics {sorted(metrics)}")
        value = metrics[cfg.metric_for_best]
        better = state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        else:
            state.evals_without_improvement += 1
        log_line({"step": state.step, "epoch": round(state.step / plan.steps_per_epoch, 4), **metrics})
        return metrics

    has_eval = eval_data is not None or eval_fn is not None
    track_best = has_eval and cfg.early_stopping_patience is not None
    greater = higher_is_better(cfg)
    if track_best:
        how = "set by train.greater_is_better" if cfg.greater_is_better is not None else "inferred from its name"
        log.info("best checkpoint by %s: %s is better (%s)", cfg.metric_for_best, "higher" if greater else "lower", how)
    bar = tqdm(total=plan.total_steps, initial=state.step, disable=run.quiet or not is_main, desc="train", dynamic_ncols=True)
    if has_eval and run.eval_at_start and state.step == 0:
        if is_main:
            keep_metrics_until(metrics_path, -1)  # a step-0 line of an earlier start of this run
        log_line({"step": 0, "epoch": 0.0, **measure()})
    window = new_window(saved.get("log_window"))
    grad_norm = None
    while state.step < plan.total_steps and not state.stop:
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss_sum, count, tokens
        metric_sums: dict[str, torch.Tensor] = {}
        try:
            with accelerator.autocast():
                micro = plan.micro_batches(state.step, unwrapped)
        except SourceFailed as e:  # e.g. a reward API down after its retries: keep the last completed step
            where = "no step was completed yet"
            if state.step > 0:
                save_checkpoint()
                where = (f"the last completed step ({state.step}) is saved in {ckpt_root / f'step-{state.step}'}; "
                         "fix the cause and rerun with --resume")
            raise StepFailed(f"step {state.step + 1} could not be prepared: {e}; {where}") from e
        for name, value in reduce_source_metrics(plan.step_metrics(), accelerator).items():
            window["source"].setdefault(name, []).append(value)
        for j, raw in enumerate(micro):
            batch = to_device(raw, accelerator.device)
            batch["step"] = state.step  # for schedules inside a loss (e.g. DPO's beta warmup)
            # Gradients sync across processes only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                res = loss_fn(model, batch)
                accelerator.backward(res.loss_sum)
            sums += torch.tensor([res.loss_sum.item(), float(res.count), res.tokens], dtype=torch.float64, device=sums.device)
            for k, v in res.metrics.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.detach().double()
        totals = accelerator.reduce(sums, "sum")
        metric_totals = {k: accelerator.reduce(v.to(accelerator.device), "sum") for k, v in sorted(metric_sums.items())}
        loss_sum, count, tokens = totals.tolist()
        lr = scheduler.get_last_lr()[0]
        if count == 0:
            log.warning("step %d has no target units (all masked); skipping its update", state.step + 1)
        else:
            loss = loss_sum / count
            if not math.isfinite(loss):
                raise diverged("loss", loss, state.step + 1, ckpt_root)
            # Gradients hold d(sum)/dθ averaged over processes; make them d(sum / count)/dθ.
            scale = accelerator.num_processes / count
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            if cfg.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))
            if not math.isfinite(grad_norm):
                raise diverged("gradient norm", grad_norm, state.step + 1, ckpt_root)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += int(tokens)
        window["loss_sum"] += loss_sum
        window["count"] += count
        window["tokens"] += tokens
        for k, v in metric_totals.items():
            window["metrics"][k] = add_metric(window["metrics"].get(k), v)
        bar.update(1)
        logs: dict = {}
        if state.step % cfg.logging_steps == 0 or state.step == plan.total_steps:
            elapsed = time.perf_counter() - window["time"]
            n = max(window["count"], 1.0)
            logs = {
                "step": state.step,
                "epoch": round(state.step / plan.steps_per_epoch, 4),
                "loss": window["loss_sum"] / n,
                **{k: metric_mean(v, n) for k, v in window["metrics"].items()},
                **{k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in window["source"].items()},
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_seen": state.tokens_seen,
                "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
            }
            log_line(logs)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            window = new_window()
        evaluated = False
        if has_eval and cfg.eval_steps and state.step % cfg.eval_steps == 0:
            evaluate()
            evaluated = True
            if track_best and state.evals_without_improvement >= cfg.early_stopping_patience:
                log.info("early stopping at step %d: no improvement in %s for %d evaluations", state.step,
                         cfg.metric_for_best, cfg.early_stopping_patience)
                state.stop = True
        if (cfg.save_steps and state.step % cfg.save_steps == 0) or (evaluated and track_best):
            save_checkpoint()
        for cb in callbacks:
            cb.on_step_end(state, logs)
    bar.close()

    if has_eval and not (cfg.eval_steps and state.step % cfg.eval_steps == 0):
        evaluate()  # always end with an evaluation of the final weights
    if track_best and state.best_step is not None and state.best_step != state.step:
        best = ckpt_root / f"step-{state.best_step}"
        log.info("restoring the best checkpoint (step %d, %s=%.4f)", state.best_step, cfg.metric_for_best, state.best_metric)
        ckpt.load_weights_into(accelerator, model, best)
        # The last eval logged was of the weights at state.step, which final/ will not hold: log the restored
        # ones' (marked restored_from_step), so that the last eval in metrics.jsonl describes final/.
        log_line({"step": state.step, "epoch": round(state.step / plan.steps_per_epoch, 4),
                  "restored_from_step": state.best_step, **measure()})
    final = out / "final"
    weights = ckpt.gathered_weights(accelerator, model)
    if is_main:
        tmp = out / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        with ckpt.saving_full_weights(unwrapped, weights):
            save_fn(unwrapped, chat, tmp)
        ckpt.publish(tmp, final)
    accelerator.wait_for_everyone()
    tracking.end(accelerator, cfg.report_to)
    return final


@torch.no_grad()
def eval_losses(model, data, collate, loss_fn, batch_size: int, accelerator) -> dict:
    """Unit-weighted means over the whole eval set (sharded over processes)."""
    was_training = model.training
    model.eval()
    shard = list(range(accelerator.process_index, len(data), accelerator.num_processes))
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    metric_sums: dict[str, torch.Tensor] = {}
    # Under FSDP every forward pass gathers weights from all processes: all run the same number of
    # batches (a process whose share ran out repeats its first batch and discards the result).
    longest = math.ceil(len(data) / accelerator.num_processes)
    n_batches = math.ceil((longest if ckpt.is_sharded(accelerator) else len(shard)) / batch_size)
    for start in range(0, n_batches * batch_size, batch_size):
        padding = start >= len(shard)
        rows = (shard or [0])[:batch_size] if padding else shard[start : start + batch_size]
        batch = to_device(collate([data[i] for i in rows]), accelerator.device)
        with accelerator.autocast():
            res = loss_fn(model, batch)
        if padding:
            continue
        sums += torch.tensor([res.loss_sum.item(), float(res.count)], dtype=torch.float64, device=sums.device)
        for k, v in res.metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.double()
    totals = accelerator.reduce(sums, "sum").tolist()
    n = max(totals[1], 1.0)
    metrics = {"eval_loss": totals[0] / n}
    for k, v in sorted(metric_sums.items()):
        metrics[f"eval_{k}"] = metric_mean(accelerator.reduce(v.to(accelerator.device), "sum"), n)
    model.train(was_training)
    return metrics


class SourceFailed(RuntimeError):
    """Raised by a StepSource whose step cannot be made for an outside reason (e.g. the reward backend failed)."""


class StepFailed(RuntimeError):
    """A step's batches could not be made (SourceFailed); the last completed step is checkpointed."""


def add_metric(acc: float | list | None, value: torch.Tensor) -> float | list[float]:
    """Accumulate a reduced LossOutput metric as JSON-able numbers: a float, or [sum, count]."""
    value = value.double().cpu()
    if value.ndim == 1 and value.numel() == 2:
        acc = acc or [0.0, 0.0]
        return [acc[0] + float(value[0]), acc[1] + float(value[1])]
    return (acc or 0.0) + float(value)


def metric_mean(total, units: float) -> float:
    """A LossOutput metric's mean: a scalar sum is per loss unit; a (sum, count) pair has its own count."""
    if isinstance(total, torch.Tensor):
        total = total.double().cpu().tolist()
    if isinstance(total, list):
        return total[0] / total[1] if total[1] > 0 else float("nan")
    return float(total) / units


def reduce_source_metrics(metrics: dict[str, tuple[float, float]], accelerator) -> dict[str, float]:
    """A source's per-process (sum, count) pairs -> one value per metric over all processes.

    Names ending in `_max` are maxima (their count is ignored); the rest are sum / count.
    """
    if not metrics:
        return {}
    names = sorted(metrics)
    t = torch.tensor([[float(metrics[k][0]), float(metrics[k][1])] for k in names], dtype=torch.float64,
                     device=accelerator.device)
    maxima = accelerator.reduce(t[:, 0].clone(), "max") if accelerator.num_processes > 1 else t[:, 0]
    totals = accelerator.reduce(t, "sum")
    out = {}
    for i, k in enumerate(names):
        if k.endswith("_max"):
            out[k] = float(maxima[i])
        elif totals[i, 1] > 0:
            out[k] = float(totals[i, 0] / totals[i, 1])
    return out


def diverged(what: str, value: float, step: int, ckpt_root: Path) -> TrainingDiverged:
    last = ckpt.latest_checkpoint(ckpt_root)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return TrainingDiverged(
        f"the {what} became {value} at step {step}; stopped before updating the weights ({where}). "
        "Lower the learning rate, enable gradient clipping, or check the data."
    )


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint, so the log reads as one clean run."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
