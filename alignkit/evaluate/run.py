"""`alignkit eval`: win rate of A against a reference B on a prompt set, judged by a reward backend.

A and B are each a model (responses are generated, resumably, into the run directory) or a
responses file (JSONL with prompt/instruction and response/output, e.g. AlpacaEval outputs).
Writes winrate.json, per_prompt.jsonl and report.md. Comparisons are per prompt: a side with several
responses to a prompt (n samples) gets the mean reward over them. Each distinct (prompt, response)
is scored once, so identical responses tie. Sampled (temperature > 0) answers of each side have their
own seed stream, salted with the side and its model, so A and B never share sampling noise, even when
they are one model. A run first removes the results of an earlier one in its folder, so a failed run
never leaves old results beside its new config.yaml; results are written through a temporary file.
A rule verifier's failures (scored 0.0) are counted in winrate.json and the report.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import config as config_lib
from ..data.loading import DataError
from ..data.prompts import PromptSource
from ..generation import GenerateConfig, SamplingParams, VLLMOptions
from ..markdown import md_cell, terminal_safe
from ..responses import prompt_key, side_sampling  # noqa: F401  (bon and refine import them from here)
from ..responses import responses_for as side_responses
from ..rewards.backends import RewardConfig, build_backend, check_reward_config, last_user_text
from ..winrate import outcomes, relation, summarize, verdict

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    model: str = "runs/sft/final"
    """A: a model (Hub id or folder) or a responses .jsonl file."""
    reference: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """B: a model or a responses .jsonl file."""
    ties: Literal["zero", "half"] = "zero"
    """How a tie counts: 0 (the reference protocol) or 0.5."""
    bootstrap: int = 2000
    seed: int = 0
    batch_size: int = 16
    prompts: PromptSource = field(default_factory=PromptSource)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: Literal["transformers", "vllm"] = "transformers"
    """How model responses are generated."""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    reward: RewardConfig = field(default_factory=RewardConfig)
    matrix: list[str] = field(default_factory=list)
    """Matrix mode: several models or responses files compared pairwise (model/reference unused)."""
    quiet: bool = False
    """No progress bars."""
    overwrite: bool = False
    """When a model's responses folder (model/, reference/, matrix-<k>/) holds a different job's
    responses: false stops with an error naming what changed; true regenerates them."""


def responses_for(spec: str, name: str, cfg: EvalConfig) -> list[dict]:
    """Responses of a model (generated into <output_dir>/<name>/) or read from a file, with this eval's
    prompts, sampling and engine (alignkit.responses); a file may hold several responses per prompt
    (n samples), which `group_by_prompt` gathers."""
    job = GenerateConfig(output_dir=cfg.output_dir, prompts=cfg.prompts, sampling=cfg.sampling,
                         engine=cfg.engine, vllm=cfg.vllm, batch_size=cfg.batch_size, overwrite=cfg.overwrite,
                         quiet=cfg.quiet)
    return side_responses(spec, name, job)


RESULTS = ("winrate.json", "per_prompt.jsonl", "report.md", "matrix.json")
"""What a run writes after scoring; removed when a run starts, so a failed run leaves none of an
earlier one."""


def remove_stale_results(out: Path, names=RESULTS) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reward_failures(backend) -> dict | None:
    """A rule verifier's failures so far (raised or non-finite: scored 0.0) as {failed, calls}; None
    for a model."""
    rule = getattr(backend, "backend", backend)
    if not hasattr(rule, "failures") or not hasattr(rule, "scored"):
        return None
    return {"failed": rule.failures, "calls": rule.scored}


def group_by_prompt(rows: list[dict], side: str) -> dict[str, list[dict]]:
    """Rows by prompt, in first-seen order. Several rows for one prompt (n samples, or duplicates) are
    kept together, and said so: each prompt then counts once, with the mean reward of its rows."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(prompt_key(r["messages"]), []).append(r)
    if len(groups) < len(rows):
        repeated = sum(len(g) > 1 for g in groups.values())
        log.warning("%s: %d responses for %d prompts (%d prompts have several); each prompt counts once, "
                    "with the mean reward over its responses", side, len(rows), len(groups), repeated)
    return groups


def pair_up(a: list[dict], b: list[dict]) -> list[tuple[list[dict], list[dict]]]:
    """Match A's and B's responses by prompt (one pair of response lists per prompt, in A's order);
    prompts missing on either side are reported and dropped."""
    ga, gb = group_by_prompt(a, "A"), group_by_prompt(b, "B")
    pairs = [(rows, gb[k]) for k, rows in ga.items() if k in gb]
    if len(pairs) < len(ga) or len(pairs) < len(gb):
        log.warning("evaluating %d prompts present on both sides (A has %d, B has %d)", len(pairs), len(ga), len(gb))
    if not pairs:
        raise DataError("A and B share no prompts")
    return pairs


def score_distinct(backend, items: list[tuple[list[dict], str]]) -> list[float]:
    """Scores of (prompt messages, response) items, each distinct pair scored once in one call, so
    identical responses to a prompt get identical scores (and tie) whatever batches they fall in."""
    index: dict[tuple[str, str], int] = {}
    unique: list[tuple[list[dict], str]] = []
    for messages, response in items:
        key = (prompt_key(messages), response)
        if key not in index:
            index[key] = len(unique)
            unique.append((messages, response))
    scores = backend.score([m for m, _ in unique], [r for _, r in unique]) if unique else []
    return [scores[index[(prompt_key(m), r)]] for m, r in items]


def per_prompt_means(groups: list[list[dict]], scores: dict[tuple[str, str], float]) -> tuple[list[float], list[float]]:
    """Mean reward and mean length (characters) per prompt over its responses."""
    rewards = [sum(scores[(prompt_key(r["messages"]), r["response"])] for r in g) / len(g) for g in groups]
    lengths = [sum(len(r["response"]) for r in g) / len(g) for g in groups]
    return rewards, lengths


def score_groups(backend, sides: list[list[list[dict]]]) -> dict[tuple[str, str], float]:
    """One score per distinct (prompt, response) over every side."""
    items = [(r["messages"], r["response"]) for side in sides for g in side for r in g]
    scores = score_distinct(backend, items)
    return {(prompt_key(m), resp): s for (m, resp), s in zip(items, scores)}


def run_eval(cfg: EvalConfig) -> Path:
    """Responses first (a rerun that is a different job stops there), then config.yaml and the scores."""
    out = Path(cfg.output_dir)
    check_reward_config(cfg.reward)  # before any generation work
    if cfg.matrix:
        return run_matrix(cfg, out)
    pairs = pair_up(responses_for(cfg.model, "model", cfg), responses_for(cfg.reference, "reference", cfg))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_results(out)
    config_lib.save(cfg, out / "config.yaml")
    backend = reward_backend(cfg, out)
    scores = score_groups(backend, [[a for a, _ in pairs], [b for _, b in pairs]])
    rewards_a, len_a = per_prompt_means([a for a, _ in pairs], scores)
    rewards_b, len_b = per_prompt_means([b for _, b in pairs], scores)
    tie_value = 0.5 if cfg.ties == "half" else 0.0
    result = {"model": cfg.model, "reference": cfg.reference, "judge": backend.identity,
              "responses_per_prompt": {"A": max(len(a) for a, _ in pairs), "B": max(len(b) for _, b in pairs)},
              "reward_failures": reward_failures(backend),
              **summarize(rewards_a, rewards_b, len_a, len_b, tie_value, cfg.bootstrap, cfg.seed)}
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, (a, _) in enumerate(pairs):
        if a[0].get("category"):
            by_cat[str(a[0]["category"])].append(k)
    if by_cat:
        result["per_category"] = {
            c: summarize([rewards_a[k] for k in ks], [rewards_b[k] for k in ks], [len_a[k] for k in ks], [len_b[k] for k in ks], tie_value, 200, cfg.seed)["win_rate"]
            for c, ks in sorted(by_cat.items())
        }
    lines = []
    for (a, b), ra, rb, la, lb in zip(pairs, rewards_a, rewards_b, len_a, len_b):
        outcome = "win" if ra > rb else "loss" if ra < rb else "tie"
        row = {"prompt": last_user_text(a[0]["messages"]), "response_a": a[0]["response"],
               "response_b": b[0]["response"], "n_a": len(a), "n_b": len(b), "reward_a": ra, "reward_b": rb,
               "length_a": la, "length_b": lb, "outcome": outcome, "category": a[0].get("category")}
        lines.append(json.dumps(row) + "\n")
    write_atomic(out / "per_prompt.jsonl", "".join(lines))
    report = render_report(result)
    write_atomic(out / "report.md", report)
    write_atomic(out / "winrate.json", json.dumps(result, indent=1))  # last: there means complete
    print(terminal_safe(report))
    return out


def reward_backend(cfg: EvalConfig, out: Path):
    return build_backend(cfg.reward, cfg.reward.cache_path(out))


def entry_labels(specs: list[str]) -> list[str]:
    """Short unique labels: a model's name as given; a responses file's shortest path suffix (without
    .jsonl) that no other entry shares, e.g. sft/responses and dpo/responses."""
    def parts(spec: str) -> list[str]:
        return list(Path(spec[: -len(".jsonl")]).parts) if spec.endswith(".jsonl") else [spec]

    split = [parts(s) for s in specs]
    depth = [1] * len(specs)
    for _ in range(max(len(p) for p in split)):
        labels = ["/".join(p[-d:]) for p, d in zip(split, depth)]
        clashes = {label for label in labels if labels.count(label) > 1}
        if not clashes:
            break
        depth = [d + 1 if label in clashes else d for label, d in zip(labels, depth)]
    labels = ["/".join(p[-d:]) for p, d in zip(split, depth)]
    return [label if labels.count(label) == 1 else f"{label} #{labels[:k + 1].count(label)}"
            for k, label in enumerate(labels)]


def run_matrix(cfg: EvalConfig, out: Path) -> Path:
    """Win rate of every entry against every other on the prompts they all answered (per prompt: mean
    reward over its responses). How many prompts each entry loses to the intersection is reported."""
    sides = [group_by_prompt(responses_for(spec, f"matrix-{k}", cfg), spec) for k, spec in enumerate(cfg.matrix)]
    common = [k for k in sides[0] if all(k in s for s in sides[1:])]
    if not common:
        raise DataError("the matrix entries share no prompts")
    names = entry_labels(cfg.matrix)
    dropped = [len(s) - len(common) for s in sides]
    if any(dropped):
        log.warning("matrix: comparing the %d prompts every entry answered; dropped per entry: %s",
                    len(common), ", ".join(f"{n} {d}" for n, d in zip(names, dropped)))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_results(out)
    config_lib.save(cfg, out / "config.yaml")
    backend = reward_backend(cfg, out)
    groups = [[s[k] for k in common] for s in sides]
    scores = score_groups(backend, groups)
    means = [per_prompt_means(g, scores) for g in groups]
    rewards = [m[0] for m in means]
    tie_value = 0.5 if cfg.ties == "half" else 0.0
    table = [[None if i == j else float(outcomes(rewards[i], rewards[j], tie_value).mean()) for j in range(len(sides))] for i in range(len(sides))]
    pairs = []
    for i in range(len(sides)):
        for j in range(i + 1, len(sides)):
            stats = summarize(rewards[i], rewards[j], means[i][1], means[j][1], tie_value, cfg.bootstrap, cfg.seed)
            stats["verdict"] = verdict(stats["wins"], stats["losses"], a=names[i], b=names[j])
            pairs.append({"a": names[i], "b": names[j], "row": i, "column": j, **stats})
    result = {"entries": cfg.matrix, "labels": names, "n": len(common), "prompts_per_entry": [len(s) for s in sides],
              "dropped_per_entry": dropped, "judge": backend.identity, "tie_value": tie_value, "win_rate": table,
              "mean_reward": [sum(r) / len(r) for r in rewards], "pairs": pairs,
              "reward_failures": reward_failures(backend)}
    lines = [f"# Win-rate matrix (row beats column), {len(common)} prompts, judge {md_cell(backend.identity)}", "",
             *matrix_tables(result), *failure_lines(result.get("reward_failures"))]
    report = "\n".join(lines) + "\n"
    write_atomic(out / "report.md", report)
    write_atomic(out / "matrix.json", json.dumps(result, indent=1))
    print(terminal_safe(report))
    return out


def ci_text(value: float, ci) -> str:
    return f"{value:.3f} ({ci[0]:.3f} to {ci[1]:.3f})"


def lc_text(r: dict) -> str:
    """The length-controlled win rate, or why there is none."""
    lc = r.get("length_controlled_win_rate")
    return f"{lc:.3f}" if lc is not None else f"not estimated: {md_cell(r.get('length_controlled_note') or 'no estimate')}"


def matrix_tables(m: dict) -> list[str]:
    """Markdown of a matrix.json: the win-rate matrix, then every pair's statistics that decide (wins,
    losses and ties; both tie rules with their intervals; the sign test and its plain verdict)."""
    names, tie_value = m["labels"], m.get("tie_value", 0.0)
    course = " (course protocol)" if tie_value == 0.0 else ""
    tie_value = f"{tie_value:g}"
    lines = [f"Compared on the {m['n']} prompts every entry answered; ties count {tie_value}{course}.", "",
             "| | " + " | ".join(md_cell(n) for n in names) + " | mean reward | prompts | dropped |",
             "|---" * (len(names) + 4) + "|"]
    for i, name in enumerate(names):
        cells = ["-" if v is None else f"{v:.3f}" for v in m["win_rate"][i]]
        tail = f" | {m['mean_reward'][i]:.3f} | {m['prompts_per_entry'][i]} | {m['dropped_per_entry'][i]} |"
        lines.append(f"| {md_cell(name)} | " + " | ".join(cells) + tail)
    if not m.get("pairs"):
        return lines
    lines += ["", "Every pair, A against B (95% intervals resample prompts; the sign test compares wins with losses, "
              "ties dropped):", "",
              f"| A | B | wins / losses / ties | win rate, ties count {tie_value}{course} | win rate, ties count 0.5 "
              "| length-controlled | sign test p | verdict (95%) |", "|---" * 8 + "|"]
    for p in m["pairs"]:
        lines.append(f"| {md_cell(p['a'])} | {md_cell(p['b'])} | {p['wins']} / {p['losses']} / {p['ties']} "
                     f"| {ci_text(p['win_rate'], p['ci95'])} | {ci_text(p['win_rate_ties_half'], p['ci95_ties_half'])} "
                     f"| {lc_text(p)} | {p['sign_test_p']:.3g} | {md_cell(p['a'])} is {relation(p['wins'], p['losses'])} {md_cell(p['b'])} |")
    return lines


def failure_lines(f: dict | None) -> list[str]:
    """The verifier's failures, when there were any (each scored 0.0)."""
    if not f or not f.get("failed"):
        return []
    return ["", f"Verifier failures (raised or returned NaN/inf, scored 0.0): {int(f['failed'])} of "
            f"{int(f['calls'])} answers scored."]


def render_report(r: dict) -> str:
    def pct(lo_hi) -> str:
        return f"95% CI {lo_hi[0]:.3f} to {lo_hi[1]:.3f}"

    zero, half = r["tie_value"] == 0.0, r["tie_value"] == 0.5
    lines = [
        f"# Win rate: A {md_cell(r['model'])} vs B {md_cell(r['reference'])}",
        "",
        f"Judge: {md_cell(r['judge'])}; {r['n']} prompts; ties count {r['tie_value']}.",
        "",
        f"{r['verdict']}.",
        "",
        "| | value |",
        "|---|---|",
        f"| win rate, ties count {r['tie_value']}{' (course protocol)' if zero else ''} "
        f"| {r['win_rate']:.3f} ({pct(r['ci95'])}) |",
    ]
    if not half:
        lines.append(f"| win rate, ties count 0.5 | {r['win_rate_ties_half']:.3f} ({pct(r['ci95_ties_half'])}) |")
    lines += [
        f"| sign test (wins vs losses, ties dropped) | p = {r['sign_test_p']:.3g} |",
        f"| length-controlled win rate | {lc_text(r)} |",
        f"| wins / losses / ties | {r['wins']} / {r['losses']} / {r['ties']} |",
        f"| mean reward A / B (diff) | {r['mean_reward_a']:.3f} / {r['mean_reward_b']:.3f} ({r['mean_reward_diff']:+.3f}) |",
        f"| mean length A / B (characters) | {r['mean_length_a']:.0f} / {r['mean_length_b']:.0f} |",
    ]
    lines += failure_lines(r.get("reward_failures"))
    per = r.get("responses_per_prompt") or {}
    if per.get("A", 1) > 1 or per.get("B", 1) > 1:
        lines += ["", f"Several responses per prompt (up to {per.get('A')} for A, {per.get('B')} for B): each prompt counts "
                  "once, with the mean reward over its responses; the interval resamples prompts."]
    if r.get("per_category"):
        lines += ["", "| category | win rate |", "|---|---|"]
        lines += [f"| {md_cell(c)} | {w:.3f} |" for c, w in r["per_category"].items()]
    return "\n".join(lines) + "\n"
