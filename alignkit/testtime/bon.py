"""`alignkit bon`: best-of-N reranking, for one setting or a sweep of temperatures x N.

For each temperature one sampling pass draws max(bon.n_values) samples per prompt through
`alignkit generate` (into samples/t<T>/: resumable, fingerprinted in job.json, either engine).
Sample j of a prompt is seeded from (seed, prompt tokens, j) on both engines (vLLM seeds a
request's j-th sample with seed + j), so the first N samples of a pass are the samples a run with N
alone draws: best-of-N for each smaller N comes from that prefix and a sweep costs the largest N
once, not the sum. Each distinct (prompt, response) is scored once by the reward backend (cached in
scores.sqlite, as in eval); the highest score is kept, a tie going to the lowest sample index.

Writes candidates.jsonl (every sample with its temperature, index and score), best/t<T>-n<N>.jsonl
per setting (the chosen answers in generate's schema, so `alignkit eval` takes one as `model:`) and,
for a single setting, the same as responses.jsonl. With bon.reference, each setting is compared
with the reference by the eval stage's statistics: sweep.json, sweep.md, and a table next to the
judge's ceiling N/(N+1). The plot is drawn from sweep.json by the report module. A reference model
that samples (sampling.temperature > 0) has its own seed stream (eval's `side_sampling`), so the
same model at the same temperature is an independent sample, never candidate 0 again. An earlier
run's results are removed before scoring, so a failed run leaves none beside its new config.yaml.

Simplified: one process scores and compares (generation may still use either engine); a rule
verifier that requires a prompt row's columns is refused, as eval does not pass them (countdown
reads its numbers from the prompt's wording when they are absent).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from .. import config as config_lib
from ..config import ConfigError, ModelConfig, must_exist
from ..evaluate.run import (EvalConfig, md_cell, pair_up, per_prompt_means, prompt_key, remove_stale_results,
                            responses_for, reward_failures, score_groups, terminal_safe)
from ..winrate import summarize
from ..data.prompts import PromptSource, read_jsonl
from ..generation import GenerateConfig, SamplingParams, VLLMOptions, run_generate
from ..rewards.backends import RewardConfig, RuleReward, build_backend, check_reward_config

log = logging.getLogger(__name__)

CEILING_NOTE = (
    "Judge ceiling: with a perfect judge, best-of-N against one sample of the same policy wins at most "
    "N/(N+1) of the non-tied comparisons; a measured share well below it means the judge or the policy's "
    "diversity, not N, is the limit. The bound assumes scores without ties and a reference that is one sample "
    "of the same policy: with a 0/1 verifier, or against greedy answers or another model, the share can pass it."
)
CANDIDATE_KEYS = ("id", "sample", "prompt", "response", "n_tokens", "finish_reason", "category")


@dataclass
class BonParams:
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    """Sampling temperatures, one sampling pass each (distinct, >= 0; 0 is greedy and allows only N = 1)."""
    n_values: list[int] = field(default_factory=lambda: [4])
    """Best-of-N settings, ascending and distinct; each pass draws the largest, a smaller N takes the
    first N samples."""
    reference: str | None = None
    """Model (its answers decoded with `sampling`, greedy by default) or responses .jsonl that every
    setting is compared with (sweep.json); required when there is more than one setting."""

    def validate(self, prefix: str) -> None:
        n_values, temps = list(self.n_values), list(self.temperatures)
        if not n_values or any(n < 1 for n in n_values):
            raise ConfigError(f"{prefix}n_values: {n_values!r} is not allowed; expected integers >= 1")
        if n_values != sorted(set(n_values)):
            raise ConfigError(f"{prefix}n_values: {n_values!r} is not allowed; expected ascending, distinct "
                              f"values (e.g. {sorted(set(n_values))})")
        if not temps or any(not math.isfinite(t) or t < 0 for t in temps):
            raise ConfigError(f"{prefix}temperatures: {temps!r} is not allowed; expected finite numbers >= 0")
        if len(set(temps)) < len(temps):
            raise ConfigError(f"{prefix}temperatures: {temps!r} is not allowed; expected distinct values")
        if 0 in temps and max(n_values) > 1:
            raise ConfigError(
                f"{prefix}temperatures: 0 is greedy decoding, whose {max(n_values)} samples would be "
                f"identical; drop 0, or set {prefix}n_values: [1] (for greedy answers as the baseline, set "
                f"{prefix}reference to the model: its answers use sampling.temperature, 0 by default)")
        must_exist(prefix + "reference", self.reference, "responses file or model folder")


@dataclass
class BonConfig:
    output_dir: str = "runs/bon"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptSource = field(default_factory=PromptSource)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Decoding of every answer (max_new_tokens, top_p, seed...). Candidates take bon.temperatures and
    max(bon.n_values) in place of sampling.temperature and sampling.n; a reference model's answers
    use it as is."""
    bon: BonParams = field(default_factory=BonParams)
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The judge that picks the best sample and decides each comparison."""
    engine: Literal["transformers", "vllm"] = "transformers"
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    batch_size: int = 16
    """Sequences per generation batch (transformers engine)."""
    bootstrap: int = 2000
    """Resamples of the bootstrap intervals."""
    seed: int = 0
    """Seed of the bootstrap (sampling.seed seeds the samples)."""
    overwrite: bool = False
    """When a samples/ or reference/ folder holds a different job's responses: false stops with an error
    naming what changed; true regenerates them. The same job resumes."""
    quiet: bool = False

    def validate(self, prefix: str) -> None:
        if self.sampling.n != 1:
            raise ConfigError(f"{prefix}sampling.n: {self.sampling.n} is not allowed here; set the samples per "
                              f"prompt with {prefix}bon.n_values")
        if self.sampling.num_beams != 1:
            raise ConfigError(f"{prefix}sampling.num_beams: {self.sampling.num_beams} is not allowed here; "
                              "best-of-N samples (num_beams 1)")
        settings = len(self.bon.temperatures) * len(self.bon.n_values)
        if settings > 1 and not self.bon.reference:
            raise ConfigError(f"{prefix}bon.reference is required for a sweep ({len(self.bon.temperatures)} "
                              f"temperatures x {len(self.bon.n_values)} values of N): each setting is compared "
                              "with it")
        if self.reward.kind == "hf" and not self.reward.model:
            raise ConfigError(f"{prefix}reward.model is required for {prefix}reward.kind 'hf' "
                              "(a reward model folder or Hub id)")
        if self.bootstrap < 1 or self.batch_size < 1:
            raise ConfigError(f"{prefix}bootstrap and {prefix}batch_size must be >= 1")


def check_bon_reward(cfg: RewardConfig) -> None:
    """Eval's reward checks that need no model or API call, and no verifier that requires row columns."""
    check_reward_config(cfg)
    if cfg.kind == "rule":
        needs = RuleReward(cfg.rule, cfg.allow_python_verifier, cfg.tolerance).required
        if needs:
            raise ConfigError(f"reward.rule: {cfg.rule!r} needs the prompt row's column(s) {', '.join(needs)}, "
                              "which bon (like eval) does not pass to the verifier")


def temperature_tag(t: float) -> str:
    return f"t{t:g}"


def setting_name(t: float, n: int) -> str:
    return f"{temperature_tag(t)}-n{n}"


def sample_pass(cfg: BonConfig, out: Path, temperature: float, n: int) -> list[dict]:
    """n samples per prompt at one temperature (generate's resume and job check), by (id, sample)."""
    gen = GenerateConfig(
        output_dir=str(out / "samples" / temperature_tag(temperature)), model=cfg.model, prompts=cfg.prompts,
        sampling=replace(cfg.sampling, temperature=temperature, n=n), engine=cfg.engine, vllm=cfg.vllm,
        batch_size=cfg.batch_size, overwrite=cfg.overwrite, quiet=cfg.quiet)
    rows = sorted(read_jsonl(run_generate(gen)), key=lambda r: (r["id"], r["sample"]))
    return [{"temperature": temperature, **{k: r[k] for k in CANDIDATE_KEYS}} for r in rows]


def best_index(scores: list[float]) -> int:
    """Index of the highest score; on a tie, the lowest index (the earliest sample)."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def choose(samples: list[dict], n: int) -> dict:
    """The best of a prompt's first n samples (in sample order)."""
    return samples[best_index([s["score"] for s in samples[:n]])]


def best_of(candidates: list[dict], temperature: float, n: int) -> list[dict]:
    """The chosen sample of each prompt among its first n at one temperature, in prompt order."""
    by_prompt: dict[int, list[dict]] = {}
    for c in candidates:
        if c["temperature"] == temperature:
            by_prompt.setdefault(c["id"], []).append(c)
    return [choose(samples, n) for samples in by_prompt.values()]


def chosen_row(c: dict, n: int, cfg: BonConfig, judge: str) -> dict:
    """A chosen answer in generate's schema (one per prompt), plus where it came from and its score."""
    params = asdict(replace(cfg.sampling, temperature=c["temperature"], n=n))
    return {"id": c["id"], "sample": 0, "prompt": c["prompt"], "response": c["response"],
            "n_tokens": c["n_tokens"], "finish_reason": c["finish_reason"], "category": c["category"],
            "model": cfg.model.name_or_path, "params": params, "best_of": n, "chosen_sample": c["sample"],
            "score": c["score"], "judge": judge}


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def as_eval_rows(rows: list[dict]) -> list[dict]:
    return [{"messages": r["prompt"], "response": r["response"], "category": r.get("category")} for r in rows]


def sweep_row(t: float, n: int, chosen: list[dict], reference: list[dict], scores: dict,
              cfg: BonConfig) -> dict:
    """One setting against the reference, with eval's pairing and statistics (win_rate: ties count 0)."""
    pairs = pair_up(as_eval_rows(chosen), reference)
    rewards_a, len_a = per_prompt_means([a for a, _ in pairs], scores)
    rewards_b, len_b = per_prompt_means([b for _, b in pairs], scores)
    s = summarize(rewards_a, rewards_b, len_a, len_b, 0.0, cfg.bootstrap, cfg.seed)
    decided = s["wins"] + s["losses"]
    kept = ("win_rate", "ci95", "win_rate_ties_half", "ci95_ties_half", "wins", "losses", "ties", "sign_test_p")
    return {"temperature": t, "n": n, **{k: s[k] for k in kept},
            "non_tied_win_share": s["wins"] / decided if decided else None, "ceiling": n / (n + 1),
            "mean_reward": s["mean_reward_a"]}


def render_sweep(sweep: dict, model: str) -> str:
    def ci(lo_hi) -> str:
        return f"{lo_hi[0]:.3f} to {lo_hi[1]:.3f}"

    rows = sweep["rows"]
    n_prompts = rows[0]["wins"] + rows[0]["losses"] + rows[0]["ties"] if rows else 0
    lines = [
        f"# Best-of-N: {md_cell(model)} against {md_cell(sweep['reference'])}",
        "",
        f"Judge: {md_cell(sweep['judge'])}; {n_prompts} prompts; win rate with ties as 0 (and as 0.5), 95% "
        "bootstrap intervals over prompts; sign test on wins against losses.",
        "",
        "| temperature | N | win rate (95% CI) | ties as 0.5 (95% CI) | wins / losses / ties | sign test p "
        "| non-tied win share | judge ceiling N/(N+1) | mean reward |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        share = "-" if r["non_tied_win_share"] is None else f"{r['non_tied_win_share']:.3f}"
        cells = [f"{r['temperature']:g}", str(r["n"]), f"{r['win_rate']:.3f} ({ci(r['ci95'])})",
                 f"{r['win_rate_ties_half']:.3f} ({ci(r['ci95_ties_half'])})",
                 f"{r['wins']} / {r['losses']} / {r['ties']}", f"{r['sign_test_p']:.3g}", share,
                 f"{r['ceiling']:.3f}", f"{r['mean_reward']:.3f}"]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return "\n".join(lines + ["", md_cell(CEILING_NOTE)]) + "\n"


def run_bon(cfg: BonConfig) -> Path:
    """Samples per temperature, scores, the best per setting and (with a reference) the sweep."""
    config_lib.validate(cfg)  # a config built in code gets the recipe's checks
    check_bon_reward(cfg.reward)  # before any generation work
    out = Path(cfg.output_dir)
    temps, n_values = list(cfg.bon.temperatures), list(cfg.bon.n_values)
    eval_cfg = EvalConfig(output_dir=str(out), prompts=cfg.prompts, sampling=cfg.sampling, engine=cfg.engine,
                          vllm=cfg.vllm, batch_size=cfg.batch_size, overwrite=cfg.overwrite, quiet=cfg.quiet)
    # A reference file is read (and checked) before the sampling; a reference model answers into reference/.
    reference = responses_for(cfg.bon.reference, "reference", eval_cfg) if cfg.bon.reference else []
    candidates = [c for t in temps for c in sample_pass(cfg, out, t, max(n_values))]
    best = out / "best"
    remove_stale_results(out, ["candidates.jsonl", "responses.jsonl", "sweep.json", "sweep.md",
                               *(str(p.relative_to(out)) for p in best.glob("*.jsonl"))])
    config_lib.save(cfg, out / "config.yaml")
    backend = build_backend(cfg.reward, cfg.reward.cache_path(out))
    scores = score_groups(backend, [[as_eval_rows(candidates), reference]])
    for c in candidates:
        c["score"] = scores[(prompt_key(c["prompt"]), c["response"])]
    write_jsonl_atomic(out / "candidates.jsonl", candidates)

    best.mkdir(exist_ok=True)
    rows = []
    for t in temps:
        for n in n_values:
            chosen = best_of(candidates, t, n)
            written = [chosen_row(c, n, cfg, backend.identity) for c in chosen]
            write_jsonl_atomic(best / f"{setting_name(t, n)}.jsonl", written)
            if reference:
                rows.append(sweep_row(t, n, chosen, reference, scores, cfg))
    if len(temps) * len(n_values) == 1:
        write_jsonl_atomic(out / "responses.jsonl", written)
        mean = sum(c["score"] for c in chosen) / len(chosen)
        print(terminal_safe(f"best-of-{n_values[0]} at temperature {temps[0]:g}: mean reward {mean:.3f} over "
                            f"{len(chosen)} prompts (judge {backend.identity}); in {out / 'responses.jsonl'}"))
    if reference:
        sweep = {"reference": cfg.bon.reference, "judge": backend.identity, "temperatures": temps,
                 "n_values": n_values, "rows": rows, "reward_failures": reward_failures(backend)}
        (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
        table = render_sweep(sweep, cfg.model.name_or_path)
        (out / "sweep.md").write_text(table)
        print(terminal_safe(table))
    return out
