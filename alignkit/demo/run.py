"""`alignkit demo`: the toolkit on a toy world, offline, on CPU, in a few minutes.

Builds a tokenizer and a tiny random model, generates toy instruction data and preference
pairs, then runs the pipeline file shipped beside this module (`pipeline.yaml`) through
`alignkit run`, as the real recipes run: SFT, then DPO-Positive on (right answer, near miss)
pairs, then a win rate of the DPO model against the SFT model judged by the task's verifier. It
reports exact-match accuracy and the end-of-turn stop rate at each stage, on distinct held-out
prompts that no stage trains on.

The output directory is the demo's own: it is cleared on every run, so the demo refuses a
non-empty directory that it did not create (one without its marker file).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

from ..config import ModelConfig
from ..generation import SamplingParams, generate
from ..markdown import fenced, md_cell
from ..models import init_model, load_causal_lm, load_tokenizer
from ..pipeline import RunConfig, read_pipeline, run_pipeline
from ..report import write_report
from ..train.sft import SFTConfig
from .task import toy_reward
from .world import (
    build_tokenizer,
    N_HELD_OUT,
    data_counts,
    write_chat_data,
    write_model_config,
    write_preference_data,
    write_prompt_data,
)

log = logging.getLogger(__name__)

MARKER = ".alignkit-demo"
"""File the demo writes in its output directory; only a directory holding it is ever cleared."""
PIPELINE = Path(__file__).with_name("pipeline.yaml")
"""The demo's stages; its vars (world folder, steps, seed) come from the demo's options."""


def prepare_output_dir(out: Path) -> None:
    """Create `out`, or clear it when an earlier demo made it; refuse any other non-empty path."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"demo --output-dir {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(
                f"demo --output-dir {out}: the directory is not empty and was not made by `alignkit demo` "
                f"(no {MARKER} file in it). The demo clears its output directory on every run: "
                "give a new or empty directory."
            )
        shutil.rmtree(out)  # an earlier demo's output: the demo always starts from nothing
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Made by `alignkit demo`; a later demo run with this --output-dir clears it.\n")


def demo_vars(world: Path, steps: int, dpo_steps: int, seed: int) -> list[str]:
    return [f"world={world}", f"steps={steps}", f"dpo_steps={dpo_steps}", f"seed={seed}"]


def demo_sft_config(world: Path, output_dir: Path, steps: int, quiet: bool, seed: int = 0) -> SFTConfig:
    """The demo pipeline's SFT stage alone (e.g. for bench/rl_toy.py), writing to output_dir."""
    pipe = read_pipeline(PIPELINE, demo_vars(world, steps, 1, seed), run_dir=str(Path(output_dir).parent))
    cfg = next(s.config for s in pipe.stages if s.name == "sft")
    cfg.output_dir, cfg.quiet = str(output_dir), quiet
    return cfg


def toy_scores(model_dir: Path, prompts: list[dict]) -> dict:
    """Exact-match accuracy (overall and per task) and how often replies end at end-of-turn."""
    model_cfg = ModelConfig(name_or_path=str(model_dir))
    chat = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, chat)
    outs = [c[0] for c in generate(model, chat, [p["messages"][:1] for p in prompts], SamplingParams(max_new_tokens=24), batch_size=50)]
    per_kind: dict[str, list[float]] = defaultdict(list)
    samples = []
    for p, o in zip(prompts, outs):
        question = p["messages"][0]["content"]
        score = toy_reward(question, o.text)
        per_kind[p["category"]].append(score)
        samples.append({"prompt": question, "response": o.text, "finish": o.finish_reason, "correct": bool(score)})
    all_scores = [s for v in per_kind.values() for s in v]
    return {
        "accuracy": sum(all_scores) / len(all_scores),
        "stop_rate": sum(o.finish_reason == "stop" for o in outs) / len(outs),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "samples": samples,
    }


def write_world_data(world: Path) -> dict:
    """The demo's data (chats, preference pairs, RL prompts) and their sizes; no held-out prompt is in
    any training file (`data_counts` checks the files as written)."""
    write_chat_data(world / "data", n_train=4000, n_test=N_HELD_OUT)
    write_preference_data(world / "prefs", n_train=2000, n_test=100, held_out=N_HELD_OUT)
    write_prompt_data(world / "prompts", n_train=1000, n_test=N_HELD_OUT)
    return data_counts(world)


def run_demo(output_dir: str = "runs/demo", steps: int = 600, dpo_steps: int = 200, quiet: bool = False, seed: int = 0) -> Path:
    out = Path(output_dir)
    world = out / "world"
    prepare_output_dir(out)
    tok_dir = build_tokenizer(world / "tokenizer")
    chat = load_tokenizer(ModelConfig(name_or_path=str(tok_dir)))
    write_model_config(world / "model-config", vocab_size=len(chat.tokenizer))
    init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok_dir), seed=seed)
    counts = write_world_data(world)
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().splitlines()]
    print(
        f"[demo] world in {world}: tokenizer ({len(chat.tokenizer)} tokens), tiny Qwen2 model, "
        f"{counts['sft_rows']} chats ({counts['sft_distinct_prompts']} distinct prompts), "
        f"{counts['pairs_train']} preference pairs, "
        f"{counts['held_out_prompts']} held-out prompts in no training file"
    )

    scores = {"base": toy_scores(world / "base-model", test)}
    print(f"[demo] SFT ({steps} steps), DPO-Positive ({dpo_steps} steps) and the win rate of DPO against SFT, "
          f"judged by the toy verifier: `alignkit run {PIPELINE}`")
    run_pipeline(RunConfig(pipeline=str(PIPELINE), run_dir=str(out), var=demo_vars(world, steps, dpo_steps, seed), quiet=quiet))
    scores["sft"] = toy_scores(out / "sft" / "final", test)
    scores["dpo"] = toy_scores(out / "dpo" / "final", test)
    winrate = json.loads((out / "eval-dpo-vs-sft" / "winrate.json").read_text())

    summary = {stage: {k: v for k, v in s.items() if k != "samples"} for stage, s in scores.items()}
    summary["dpo_vs_sft"] = {k: winrate[k] for k in ("win_rate", "ci95", "wins", "losses", "ties", "n", "sign_test_p", "verdict")}
    summary["data"] = counts
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    report = render_report(scores, winrate, counts, steps, dpo_steps)
    (out / "report.md").write_text(report)
    print(report)
    full = write_report(out)  # stages, curves and plots, beside the summary above
    print(f"[demo] models: {out / 'sft' / 'final'}, {out / 'dpo' / 'final'}  report: {out / 'report.md'}, with plots: {full}")
    return out


def render_report(scores: dict, winrate: dict, counts: dict, steps: int, dpo_steps: int) -> str:
    names = {"base": "random init", "sft": f"after SFT ({steps} steps)", "dpo": f"after DPO-Positive ({dpo_steps} steps)"}
    kinds = list(scores["sft"]["per_task"])
    per_kind = ", ".join(f"{md_cell(k)} {n}" for k, n in counts["held_out_per_kind"].items())
    lines = [
        "# alignkit demo: SFT then DPO on a toy instruction task",
        "",
        f"Held-out prompts: {counts['held_out_prompts']} distinct ({per_kind}), in no stage's training data "
        "(SFT chats, preference pairs, RL prompts). "
        f"Training data: {counts['sft_rows']} SFT chats on {counts['sft_distinct_prompts']} distinct prompts, "
        f"{counts['pairs_train']} preference pairs on {counts['pairs_train_distinct_prompts']}. "
        "Greedy decoding, at most 24 new tokens. Tiny Qwen2 model, CPU.",
        "",
        "| model | exact match | stops at end-of-turn | " + " | ".join(md_cell(k) for k in kinds) + " |",
        "|---" * (3 + len(kinds)) + "|",
    ]
    for stage, s in scores.items():
        cells = [names[stage], f"{s['accuracy']:.0%}", f"{s['stop_rate']:.0%}"]
        cells += [f"{v:.0%}" for v in s["per_task"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"DPO model vs SFT model, judged by the verifier: win rate {winrate['win_rate']:.3f} "
        f"(95% CI {winrate['ci95'][0]:.3f} to {winrate['ci95'][1]:.3f}); {winrate['wins']} wins, {winrate['losses']} losses, "
        f"{winrate['ties']} ties (both right or both wrong; a tie counts 0). {md_cell(winrate.get('verdict', ''))}",
        "",
        "Samples after DPO (prompt -> reply, as JSON strings):",
        "",
    ]
    samples = [
        f"{shown(s['prompt'])} -> {shown(s['response'])}  ({'correct' if s['correct'] else 'wrong'}, {s['finish']})"
        for s in scores["dpo"]["samples"][:5]
    ]
    return "\n".join(lines + fenced(samples)) + "\n"


def shown(text: str) -> str:
    """Model text as a JSON string: one line, its ends visible, newlines and control characters escaped
    (nothing reaches the terminal raw)."""
    return json.dumps(text)
