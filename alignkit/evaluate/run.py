"""`alignkit eval`: win rate of A against a reference B on a prompt set, judged by a reward backend.

A and B are each a model (responses are generated, resumably, into the run directory) or a
responses file (JSONL with prompt/instruction and response/output, e.g. AlpacaEval outputs).
Writes winrate.json, per_prompt.jsonl and report.md.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from .. import config as config_lib
from ..config import ModelConfig
from ..generation import GenerateConfig, PromptSource, SamplingParams, VLLMOptions, prompt_messages_of, read_jsonl, run_generate
from ..rewards.backends import RewardConfig, build_backend, last_user_text
from .winrate import outcomes, summarize

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


def responses_for(spec: str, name: str, cfg: EvalConfig) -> list[dict]:
    """Responses of a model (generated into <output_dir>/<name>/) or read from a file."""
    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"responses file not found: {spec}")
        rows = []
        for i, r in enumerate(read_jsonl(spec)):
            messages = r["prompt"] if isinstance(r.get("prompt"), list) else prompt_messages_of(r)
            response = r.get("response", r.get("output"))
            if messages is None or not isinstance(response, str):
                raise ValueError(f"{spec}, line {i + 1}: expected a prompt (or instruction) and a response (or output)")
            rows.append({"messages": messages, "response": response, "category": r.get("category", r.get("dataset"))})
        return rows
    gen = GenerateConfig(output_dir=str(Path(cfg.output_dir) / name), model=ModelConfig(name_or_path=spec), prompts=cfg.prompts,
                         sampling=replace(cfg.sampling, n=1), engine=cfg.engine, vllm=cfg.vllm, batch_size=cfg.batch_size)
    path = run_generate(gen)
    return [{"messages": r["prompt"], "response": r["response"], "category": r["category"]} for r in sorted(read_jsonl(path), key=lambda r: r["id"])]


def prompt_key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


def pair_up(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """Match A and B responses by prompt; prompts missing on either side are reported and dropped."""
    by_prompt = {prompt_key(r["messages"]): r for r in b}
    pairs = [(r, by_prompt[prompt_key(r["messages"])]) for r in a if prompt_key(r["messages"]) in by_prompt]
    if len(pairs) < len(a) or len(pairs) < len(b):
        log.warning("evaluating %d prompts present on both sides (A has %d, B has %d)", len(pairs), len(a), len(b))
    if not pairs:
        raise ValueError("A and B share no prompts")
    return pairs


def run_eval(cfg: EvalConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out / "config.yaml")
    if cfg.matrix:
        return run_matrix(cfg, out)
    pairs = pair_up(responses_for(cfg.model, "model", cfg), responses_for(cfg.reference, "reference", cfg))
    backend = reward_backend(cfg, out)
    prompts = [a["messages"] for a, _ in pairs]
    rewards_a = backend.score(prompts, [a["response"] for a, _ in pairs])
    rewards_b = backend.score(prompts, [b["response"] for _, b in pairs])
    len_a = [len(a["response"]) for a, _ in pairs]
    len_b = [len(b["response"]) for _, b in pairs]
    tie_value = 0.5 if cfg.ties == "half" else 0.0
    result = {"model": cfg.model, "reference": cfg.reference, "judge": backend.identity, **summarize(rewards_a, rewards_b, len_a, len_b, tie_value, cfg.bootstrap, cfg.seed)}
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, (a, _) in enumerate(pairs):
        if a.get("category"):
            by_cat[str(a["category"])].append(k)
    if by_cat:
        result["per_category"] = {
            c: summarize([rewards_a[k] for k in ks], [rewards_b[k] for k in ks], [len_a[k] for k in ks], [len_b[k] for k in ks], tie_value, 200, cfg.seed)["win_rate"]
            for c, ks in sorted(by_cat.items())
        }
    (out / "winrate.json").write_text(json.dumps(result, indent=1))
    with (out / "per_prompt.jsonl").open("w") as f:
        for (a, b), ra, rb in zip(pairs, rewards_a, rewards_b):
            outcome = "win" if ra > rb else "loss" if ra < rb else "tie"
            f.write(json.dumps({"prompt": last_user_text(a["messages"]), "response_a": a["response"], "response_b": b["response"], "reward_a": ra, "reward_b": rb, "length_a": len(a["response"]), "length_b": len(b["response"]), "outcome": outcome, "category": a.get("category")}) + "\n")
    report = render_report(result)
    (out / "report.md").write_text(report)
    print(report)
    return out


def reward_backend(cfg: EvalConfig, out: Path):
    return build_backend(cfg.reward, cfg.reward.cache_path(out))


def run_matrix(cfg: EvalConfig, out: Path) -> Path:
    """Win rate of every entry against every other on the prompts they all answered."""
    sides = [{prompt_key(r["messages"]): r for r in responses_for(spec, f"matrix-{k}", cfg)} for k, spec in enumerate(cfg.matrix)]
    common = sorted(set.intersection(*(set(s) for s in sides)))
    if not common:
        raise ValueError("the matrix entries share no prompts")
    backend = reward_backend(cfg, out)
    prompts = [json.loads(k) for k in common]
    rewards = [backend.score(prompts, [side[k]["response"] for k in common]) for side in sides]
    tie_value = 0.5 if cfg.ties == "half" else 0.0
    table = [[None if i == j else float(outcomes(rewards[i], rewards[j], tie_value).mean()) for j in range(len(sides))] for i in range(len(sides))]
    result = {"entries": cfg.matrix, "n": len(common), "judge": backend.identity, "win_rate": table, "mean_reward": [sum(r) / len(r) for r in rewards]}
    (out / "matrix.json").write_text(json.dumps(result, indent=1))
    names = [Path(m).stem if m.endswith(".jsonl") else m for m in cfg.matrix]
    lines = [f"# Win-rate matrix (row beats column), {len(common)} prompts, judge `{backend.identity}`", "", "| | " + " | ".join(names) + " | mean reward |", "|---" * (len(names) + 2) + "|"]
    for i, name in enumerate(names):
        cells = ["-" if v is None else f"{v:.3f}" for v in table[i]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['mean_reward'][i]:.3f} |")
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    return out


def render_report(r: dict) -> str:
    lines = [
        f"# Win rate: {r['model']} vs {r['reference']}",
        "",
        f"Judge: `{r['judge']}`; {r['n']} prompts; ties count {r['tie_value']}.",
        "",
        "| | value |",
        "|---|---|",
        f"| win rate | {r['win_rate']:.3f} (95% CI {r['ci95'][0]:.3f} to {r['ci95'][1]:.3f}) |",
        f"| length-controlled win rate | {r['length_controlled_win_rate']:.3f} |",
        f"| wins / losses / ties | {r['wins']} / {r['losses']} / {r['ties']} |",
        f"| mean reward A / B (diff) | {r['mean_reward_a']:.3f} / {r['mean_reward_b']:.3f} ({r['mean_reward_diff']:+.3f}) |",
        f"| mean length A / B (characters) | {r['mean_length_a']:.0f} / {r['mean_length_b']:.0f} |",
    ]
    if r.get("per_category"):
        lines += ["", "| category | win rate |", "|---|---|"] + [f"| {c} | {w:.3f} |" for c, w in r["per_category"].items()]
    return "\n".join(lines) + "\n"
