"""`alignkit self-improve`: iterative (online) DPO, R rounds of sample -> pairs -> DPO -> sample again.

Round 0 is the starting model (normally the SFT model): its answers to the held-out `eval.prompts`
are generated once into round-0/. Then, for k = 1..R, from the latest model m(k-1):

    round-k/pairs   `alignkit pairs` (the `pairs` section; its model is m(k-1)): samples, scores, pairs
    round-k/dpo     `alignkit dpo` (the `dpo` section) from m(k-1) on round-k/pairs/dataset, with m(k-1)
                    as the reference model (each round's reference is the policy it starts from)
    round-k/eval    `alignkit eval`: m(k) = round-k/dpo/final against round 0's answers, judged by
                    eval.reward: win rate with intervals and the sign test

rounds.json gathers each round's pair counts and win rate against round 0 (rewritten after every
round), and the report shows it. This is the online (iterative) form of DPO: each round's pairs
come from the current policy's own samples, not from a fixed dataset.

A killed run resumes: pairs and eval resume through generate's JSONL and the score cache, DPO from
its last checkpoint, and a finished round (round-k/done.json) is not run again. rounds-job.json
records what decides the results (the config, the starting model's weights); a rerun of a different
job in the same folder stops with an error naming what changed, or starts afresh with `overwrite`.
The driver sits above the stage layer (it runs three stages; tests/test_layout.py) and holds no
algorithm of its own beyond the loop below.

Simplified: rounds run one after another in this process; every round samples the same prompts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from . import config as config_lib
from .config import ConfigError, ModelConfig
from .data.prompts import PromptSource
from .evaluate.run import EvalConfig, run_eval
from .files import write_atomic
from .generation import GenerateConfig, SamplingParams, job_changes, model_fingerprint, run_generate
from .loops.pairs import PairsConfig, run_pairs
from .markdown import terminal_safe
from .winrate import tally
from .rewards.backends import RewardConfig, check_reward_config
from .train.dpo import DPOConfig, run_dpo

KEPT = ("win_rate", "ci95", "win_rate_ties_half", "ci95_ties_half", "wins", "losses", "ties", "n", "sign_test_p",
        "mean_reward_a", "mean_reward_b")


@dataclass
class RoundsEval:
    prompts: PromptSource = field(default_factory=PromptSource)
    """Held-out prompts each round's model answers (keep them out of pairs.prompts)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Decoding of the answers compared (greedy by default)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The judge of each round's model against round 0."""
    ties: Literal["zero", "half"] = "zero"
    bootstrap: int = 2000
    batch_size: int = 16


@dataclass
class SelfImproveConfig:
    output_dir: str = "runs/self-improve"
    model: ModelConfig = field(default_factory=ModelConfig)
    """Round 0: the starting policy (normally the SFT model)."""
    rounds: int = 3
    """Rounds of sample -> pairs -> DPO (>= 1)."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """Each round's pairs; pairs.model and pairs.output_dir are set per round (the latest model)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Each round's DPO; dpo.model (the latest model, also the reference), dpo.output_dir and dpo.data.dataset,
    split and eval_split (the round's pairs) are set per round."""
    eval: RoundsEval = field(default_factory=RoundsEval)
    overwrite: bool = False
    """When output_dir holds rounds of a different job: false stops naming what changed; true starts afresh."""
    quiet: bool = False

    def validate(self, prefix: str) -> None:
        if self.rounds < 1:
            raise ConfigError(f"{prefix}rounds: {self.rounds} is not allowed; expected an integer >= 1")
        if self.pairs.mode == "refine":
            raise ConfigError(f"{prefix}pairs.mode: refine reads one refine run; rounds need a mode that samples "
                              "(self, best-worst or rejection)")
        if self.eval.bootstrap < 1 or self.eval.batch_size < 1:
            raise ConfigError(f"{prefix}eval.bootstrap and {prefix}eval.batch_size must be >= 1")
        if self.eval.reward.kind == "hf" and not self.eval.reward.model:
            raise ConfigError(f"{prefix}eval.reward.model is required for {prefix}eval.reward.kind 'hf'")


def round_pairs(cfg: SelfImproveConfig, out: Path, k: int, model: str) -> PairsConfig:
    return replace(cfg.pairs, output_dir=str(out / f"round-{k}" / "pairs"), quiet=cfg.quiet,
                   model=replace(cfg.model, name_or_path=model))


def round_dpo(cfg: SelfImproveConfig, out: Path, k: int, model: str) -> DPOConfig:
    pairs = out / f"round-{k}" / "pairs" / "dataset"
    data = replace(cfg.dpo.data, dataset=str(pairs), split="train", eval_dataset=None,
                   eval_split="test" if cfg.pairs.eval_share > 0 else None)
    return replace(cfg.dpo, output_dir=str(out / f"round-{k}" / "dpo"), model=replace(cfg.model, name_or_path=model),
                   data=data, resume=True, quiet=cfg.quiet)


def round_eval(cfg: SelfImproveConfig, out: Path, k: int, model: str, reference: Path) -> EvalConfig:
    e = cfg.eval
    return EvalConfig(output_dir=str(out / f"round-{k}" / "eval"), model=model, reference=str(reference),
                      ties=e.ties, bootstrap=e.bootstrap, seed=cfg.pairs.seed, batch_size=e.batch_size, prompts=e.prompts,
                      sampling=e.sampling, reward=e.reward, quiet=cfg.quiet, overwrite=cfg.overwrite)


def check_job(cfg: SelfImproveConfig, out: Path) -> None:
    """Refuse (or, with overwrite, clear) rounds in `out` made by a different job."""
    job = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "quiet", "overwrite")},
           "model": model_fingerprint(cfg.model)}
    job = json.loads(json.dumps(job))
    path = out / "rounds-job.json"
    if path.is_file():
        changes = job_changes(json.loads(path.read_text()), job)
        if changes and not cfg.overwrite:
            raise ConfigError(f"{out} holds rounds of a different job: {'; '.join(changes[:5])}. Use another "
                              "output_dir, or set overwrite: true to delete them and start afresh")
        if changes:
            for old in out.glob("round-*"):
                shutil.rmtree(old)
            (out / "rounds.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(job, indent=1))


def check_all(cfg: SelfImproveConfig, out: Path) -> None:
    """Every round's configs, before the first model call (later rounds' paths do not exist yet)."""
    config_lib.validate(cfg)
    check_reward_config(cfg.eval.reward)
    if cfg.pairs.uses_reward():
        check_reward_config(cfg.pairs.reward)
    with config_lib.deferred([out]):
        config_lib.validate(round_pairs(cfg, out, 1, cfg.model.name_or_path))
        config_lib.validate(round_dpo(cfg, out, 1, cfg.model.name_or_path))


def run_self_improve(cfg: SelfImproveConfig) -> Path:
    out = Path(cfg.output_dir)
    check_all(cfg, out)
    check_job(cfg, out)
    config_lib.save(cfg, out / "config.yaml")
    reference = run_generate(GenerateConfig(  # round 0's answers, once
        output_dir=str(out / "round-0"), model=cfg.model, prompts=cfg.eval.prompts, sampling=cfg.eval.sampling,
        batch_size=cfg.eval.batch_size, overwrite=cfg.overwrite, quiet=cfg.quiet))
    model, results = cfg.model.name_or_path, []
    for k in range(1, cfg.rounds + 1):
        done = out / f"round-{k}" / "done.json"
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            card = json.loads((run_pairs(round_pairs(cfg, out, k, model)) / "card.json").read_text())
            if not (out / f"round-{k}" / "dpo" / "final").is_dir():
                run_dpo(round_dpo(cfg, out, k, model))
            new = str(out / f"round-{k}" / "dpo" / "final")
            w = json.loads((run_eval(round_eval(cfg, out, k, new, reference)) / "winrate.json").read_text())
            result = {"round": k, "model": new, "started_from": model, "pairs": card["counts"]["pairs"],
                      "dropped": card["counts"]["dropped"], "dropped_why": card["dropped"], "judge": w["judge"],
                      **{key: w[key] for key in KEPT if key in w}}
            write_atomic(done, json.dumps(result, indent=1))
        results.append(result)
        model = result["model"]
        summary = {"reference": str(reference), "reference_model": cfg.model.name_or_path,
                   "judge": result.get("judge"), "mode": cfg.pairs.mode, "rounds": results}
        write_atomic(out / "rounds.json", json.dumps(summary, indent=1))
        if not cfg.quiet:
            print(terminal_safe(f"round {k}: {result['pairs']} pairs; win rate against round 0 "
                                f"{result['win_rate']:.3f} ({tally(result)}; "
                                f"sign test p={result['sign_test_p']:.3g})"))
    return out
