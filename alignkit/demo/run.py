"""`alignkit demo`: the toolkit on a toy world, offline, on CPU, in a few minutes.

Builds a tokenizer and a tiny random model, generates toy instruction data and preference
pairs, then runs the pipeline file shipped beside this module (`pipeline.yaml`) through
`alignkit run`, as the real recipes run: SFT; DPO-Positive on (right answer, near miss) pairs;
RLOO against the task's verifier; a reward model, and RLOO against it with the verifier as the
gold reward; with --full also GRPO, one self-improvement round, best-of-N and self-refinement.
It reports each model's exact-match and content accuracy (right once a sign-off is cut), per
kind, and its paired wins and losses against the SFT model, on distinct held-out prompts that no
stage trains on. Deliberately simplified: one fixed toy world, tiny models, CPU only.

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
from ..winrate import paired_counts, tally
from ..train.sft import SFTConfig
from .task import toy_reward
from .world import (
    DEMO_MODEL,
    build_tokenizer,
    DEMO_VOCAB,
    HABIT_SHARE,
    N_HELD_OUT,
    N_PAIRS,
    N_SFT_CHATS,
    NOISE_SHARE,
    PAIR_SIGN_OFF_SHARE,
    SIGN_OFF,
    SIGN_OFF_SHARE,
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


def demo_vars(world: Path, steps: int, dpo_steps: int, seed: int, rl_steps: int = 80, rm_steps: int = 300) -> list[str]:
    return [f"world={world}", f"steps={steps}", f"dpo_steps={dpo_steps}", f"seed={seed}", f"rl_steps={rl_steps}",
            f"rm_steps={rm_steps}"]


def demo_sft_config(world: Path, output_dir: Path, steps: int, quiet: bool, seed: int = 0) -> SFTConfig:
    """The demo pipeline's SFT stage alone (e.g. for bench/rl_toy.py), writing to output_dir."""
    pipe = read_pipeline(PIPELINE, demo_vars(world, steps, 1, seed), run_dir=str(Path(output_dir).parent))
    cfg = next(s.config for s in pipe.stages if s.name == "sft")
    cfg.output_dir, cfg.quiet = str(output_dir), quiet
    return cfg


def toy_scores(model_dir: Path, prompts: list[dict]) -> dict:
    """Greedy replies of a model to the held-out prompts, scored by `score_replies`."""
    model_cfg = ModelConfig(name_or_path=str(model_dir))
    chat = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, chat)
    messages = [p["messages"][:1] for p in prompts]
    outs = [c[0] for c in generate(model, chat, messages, SamplingParams(max_new_tokens=24), batch_size=50)]
    return score_replies(prompts, [o.text for o in outs], [o.finish_reason for o in outs])


def responses_scores(path: Path, prompts: list[dict]) -> dict:
    """`score_replies` of a responses file (e.g. best-of-N's chosen answers) on the held-out prompts."""
    rows = {r["prompt"][-1]["content"]: r for r in map(json.loads, path.read_text().splitlines())}
    chosen = [rows[p["messages"][0]["content"]] for p in prompts]
    return score_replies(prompts, [r["response"] for r in chosen], [r["finish_reason"] for r in chosen])


def without_sign_off(text: str) -> str:
    text = text.rstrip()
    return text[: -len(SIGN_OFF.strip())] if text.endswith(SIGN_OFF.strip()) else text


def score_replies(prompts: list[dict], texts: list[str], finishes: list[str]) -> dict:
    """Exact-match accuracy (overall and per task), content accuracy (right once a trailing sign-off is
    cut; overall and per task), how often replies end at end-of-turn, and how often they carry the chatty
    sign-off that a share of the SFT replies taught."""
    per_kind: dict[str, list[float]] = defaultdict(list)
    content_kind: dict[str, list[float]] = defaultdict(list)
    samples = []
    for p, text, finish in zip(prompts, texts, finishes):
        question = p["messages"][0]["content"]
        score, content = toy_reward(question, text), toy_reward(question, without_sign_off(text))
        per_kind[p["category"]].append(score)
        content_kind[p["category"]].append(content)
        samples.append({"prompt": question, "response": text, "finish": finish, "correct": bool(score),
                        "content": bool(content)})
    all_scores = [s for v in per_kind.values() for s in v]
    return {
        "accuracy": sum(all_scores) / len(all_scores),
        "stop_rate": sum(f == "stop" for f in finishes) / len(finishes),
        "sign_off_rate": sum(SIGN_OFF.strip() in t for t in texts) / len(texts),
        "right_ignoring_sign_off": sum(s["content"] for s in samples) / len(samples),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())},
        "content_per_task": {k: sum(v) / len(v) for k, v in sorted(content_kind.items())},
        "samples": samples,
    }


def write_world_data(world: Path) -> dict:
    """The demo's data (chats, preference pairs, RL prompts) and their sizes; no held-out prompt is in
    any training file (`data_counts` checks the files as written)."""
    write_chat_data(world / "data", n_train=N_SFT_CHATS, n_test=N_HELD_OUT, sign_off_share=SIGN_OFF_SHARE,
                    habit_share=HABIT_SHARE, noise_share=NOISE_SHARE)
    write_preference_data(world / "prefs", n_train=N_PAIRS, n_test=100, held_out=N_HELD_OUT,
                          sign_off_share=PAIR_SIGN_OFF_SHARE)
    write_prompt_data(world / "prompts", n_train=1000, n_test=N_HELD_OUT)
    return data_counts(world)


FULL_ONLY = ("grpo", "eval-grpo-vs-sft", "self-pairs", "self-dpo", "eval-self-dpo-vs-sft", "bon", "refine")
"""Stages that run only with `alignkit demo --full` (their time is stated in docs/demo.md)."""
ANSWERS = {"sft": "eval-dpo-vs-sft/reference", "dpo": "eval-dpo-vs-sft/model", "rloo": "eval-rloo-vs-sft/model",
           "rloo_rm": "eval-rloo-rm-vs-sft/model"}
"""Where each model's greedy replies to the held-out prompts are: the evals already decoded them."""
EVALS = ("dpo-vs-sft", "rloo-vs-sft", "rloo-rm-vs-sft")
FULL_ANSWERS = {"grpo": "eval-grpo-vs-sft/model", "self_dpo": "eval-self-dpo-vs-sft/model"}
FULL_EVALS = ("grpo-vs-sft", "self-dpo-vs-sft")


def run_demo(output_dir: str = "runs/demo", steps: int = 1200, dpo_steps: int = 200, quiet: bool = False, seed: int = 0,
             rl_steps: int = 80, rm_steps: int = 300, full: bool = False) -> Path:
    out = Path(output_dir)
    world = out / "world"
    prepare_output_dir(out)
    tok_dir = build_tokenizer(world / "tokenizer", vocab_size=DEMO_VOCAB)
    chat = load_tokenizer(ModelConfig(name_or_path=str(tok_dir)))
    write_model_config(world / "model-config", vocab_size=len(chat.tokenizer), **DEMO_MODEL)
    init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok_dir), seed=seed)
    counts = write_world_data(world)
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().splitlines()]
    print(
        f"[demo] world in {world}: tokenizer ({len(chat.tokenizer)} tokens), tiny Qwen2 model, "
        f"{counts['sft_rows']} chats ({counts['sft_distinct_prompts']} distinct prompts; "
        f"{counts['sft_replies_right']['ignoring_sign_off']:.0%} of the replies right, "
        f"{SIGN_OFF_SHARE:.0%} signing off with {SIGN_OFF.strip()!r}), "
        f"{counts['pairs_train']} preference pairs, {counts['rl_prompts_train']} RL prompts "
        f"({counts['rl_prompts_train_distinct_prompts']} distinct, in no chat or pair), "
        f"{counts['held_out_prompts']} held-out prompts in no stage's data"
    )

    scores = {"base": toy_scores(world / "base-model", test)}
    pipe = read_pipeline(PIPELINE, demo_vars(world, steps, dpo_steps, seed, rl_steps, rm_steps), run_dir=str(out))
    only = [s.name for s in pipe.stages if full or s.name not in FULL_ONLY]
    print(f"[demo] SFT ({steps} steps), DPO-Positive ({dpo_steps} steps), RLOO against the verifier ({rl_steps} steps), "
          f"a reward model ({rm_steps} steps), RLOO against it ({rl_steps} steps)"
          f"{', GRPO, a self-improvement round (pairs, DPO), best-of-N, self-refinement' if full else ''}"
          " and win rates judged by the toy verifier: "
          f"`alignkit run {PIPELINE} --only {','.join(only)}`")
    run_pipeline(RunConfig(pipeline=str(PIPELINE), run_dir=str(out), only=only, quiet=quiet,
                           var=demo_vars(world, steps, dpo_steps, seed, rl_steps, rm_steps)))
    for stage, folder in (ANSWERS | (FULL_ANSWERS if full else {})).items():
        scores[stage] = responses_scores(out / folder / "responses.jsonl", test)
    evals = {name: json.loads((out / f"eval-{name}" / "winrate.json").read_text())
             for name in EVALS + (FULL_EVALS if full else ())}
    best = None
    if full:
        sweep = json.loads((out / "bon" / "sweep.json").read_text())
        best = max(sweep["rows"], key=lambda r: (r["temperature"] == BON_TEMPERATURE, r["n"]))
        scores["bon"] = responses_scores(out / "bon" / "best" / f"t{best['temperature']:g}-n{best['n']}.jsonl", test)

    summary = {stage: {k: v for k, v in s.items() if k != "samples"} for stage, s in scores.items()}
    keys = ("win_rate", "ci95", "win_rate_ties_half", "ci95_ties_half", "wins", "losses", "ties", "n", "sign_test_p", "verdict")
    for name, w in evals.items():
        summary[name.replace("-", "_")] = {k: w[k] for k in keys}
    content = {f"{m}_vs_sft": content_comparison(scores[m]["samples"], scores["sft"]["samples"])
               for m in ("dpo", "rloo", "rloo_rm", *(FULL_ANSWERS if full else ()))}
    summary["content"] = content
    summary["reward_model"] = reward_model_summary(out)
    refine = None
    if full:
        summary["bon_vs_greedy"] = {k: best[k] for k in ("temperature", "n", *keys[:-3], "sign_test_p")}
        refine = json.loads((out / "refine" / "refine.json").read_text())
        summary["self_refinement"] = {k: refine[k] for k in ("n", "improved", "improved_share", "mean_reward_gain")}
        refine = summary["self_refinement"]
    summary["data"] = counts
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    report = render_report(scores, evals, best, counts, dict(sft=steps, dpo=dpo_steps, rloo=rl_steps, rm=rm_steps),
                           refine, content, summary["reward_model"])
    (out / "report.md").write_text(report)
    print(report)
    full_report = out / "report" / "report.md"  # written by the pipeline run: stages, curves, sweeps and plots
    print(f"[demo] models: {out / 'sft' / 'final'}, {out / 'dpo' / 'final'}, {out / 'rloo' / 'final'}, "
          f"{out / 'rm' / 'final'}, {out / 'rloo-rm' / 'final'}  report: {out / 'report.md'}, with plots: {full_report}")
    return out


def content_comparison(a: list[dict], b: list[dict]) -> dict:
    """Paired content comparison of two models' samples on the same prompts (right once a trailing
    sign-off is cut): wins, losses, ties of `a` and the exact two-sided sign test."""
    return paired_counts([bool(x["content"]) for x in a], [bool(y["content"]) for y in b])


def reward_model_summary(out: Path) -> dict:
    """The reward model's held-out pair accuracy and the longer-wins baseline (rm_eval.json), and the
    RLOO-against-it run's proxy reward (the RM's, on its training samples) first and last logged."""
    rm = json.loads((out / "rm" / "rm_eval.json").read_text())
    logs = [json.loads(line) for line in (out / "rloo-rm" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    proxy = [m["reward"] for m in logs if "reward" in m]
    gold = [(m["step"], m["eval_gold_reward"]) for m in logs if "eval_gold_reward" in m]
    return rm | {"proxy_reward_first_last": [proxy[0], proxy[-1]] if proxy else None, "gold_by_step": gold}


BON_TEMPERATURE = 0.6
"""The best-of-N setting the demo's table shows: the largest N at this temperature."""


def render_report(scores: dict, evals: dict, best: dict | None, counts: dict, steps: dict, refine: dict | None = None,
                  content: dict | None = None, rm: dict | None = None) -> str:
    names = {"base": "random init", "sft": f"after SFT ({steps['sft']} steps)",
             "dpo": f"after DPO-Positive ({steps['dpo']} steps)", "rloo": f"after RLOO, verifier ({steps['rloo']} steps)",
             "rloo_rm": f"after RLOO, reward model ({steps['rloo']} steps)",
             "grpo": f"after GRPO, verifier ({steps['rloo']} steps)",
             "self_dpo": "after one self round (own pairs, DPO-Positive 100 steps)"}
    if best:
        names["bon"] = f"RLOO, best of {best['n']} at temperature {best['temperature']:g} (verifier picks)"
    kinds = list(scores["sft"]["content_per_task"])
    per_kind = ", ".join(f"{md_cell(k)} {n}" for k, n in counts["held_out_per_kind"].items())
    lines = [
        "# alignkit demo: SFT, DPO, RLOO against the verifier and against a reward model, on a toy task",
        "",
        f"Held-out prompts: {counts['held_out_prompts']} distinct ({per_kind}; {counts['held_out_habit_prompts']} of "
        "them of the sub-types on which the SFT chats make a habitual slip), in no stage's data "
        "(SFT chats, preference pairs, RL prompts). "
        f"Training data: {counts['sft_rows']} SFT chats on {counts['sft_distinct_prompts']} distinct prompts, "
        f"{counts['sft_replies_right']['ignoring_sign_off']:.0%} of the replies right if the sign-off is ignored "
        f"and {counts['sft_replies_right']['exact']:.0%} exactly "
        f"({SIGN_OFF_SHARE:.0%} end with {md_cell(repr(SIGN_OFF.strip()))}, which the verifier scores 0); "
        f"{counts['pairs_train']} preference pairs on {counts['pairs_train_distinct_prompts']} prompts; "
        f"{counts.get('rl_prompts_train', 0)} RL prompts on {counts.get('rl_prompts_train_distinct_prompts', 0)}, "
        "in no chat or pair file. Greedy decoding unless said, at most 24 new tokens. Tiny Qwen2 model, CPU. "
        "Content: right if the sign-off is ignored; the kind columns are content.",
        "",
        "| model | exact match | right if the sign-off is ignored | signs off | stops at end-of-turn | "
        + " | ".join(md_cell(k) for k in kinds) + " |",
        "|---" * (5 + len(kinds)) + "|",
    ]
    for stage, s in scores.items():
        cells = [names[stage], f"{s['accuracy']:.0%}", f"{s['right_ignoring_sign_off']:.0%}", f"{s['sign_off_rate']:.0%}",
                 f"{s['stop_rate']:.0%}"]
        cells += [f"{v:.0%}" for v in s["content_per_task"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    if rm:
        lines += ["", f"Reward model ({steps['rm']} steps from the SFT model): held-out pair accuracy "
                  f"{rm['eval_accuracy']:.0%} on {rm['eval_pairs']} pairs whose prompts are in no other file; the "
                  f"\"longer reply wins\" baseline on the same pairs: {rm['length_baseline']:.0%}."]
    lines += ["", "Paired comparisons on the held-out prompts, judged by the verifier (a tie: both right or both "
              "wrong; the course's win rate counts a tie 0); content: the same with a trailing sign-off cut:", ""]
    titles = {"dpo-vs-sft": "DPO model vs SFT model", "rloo-vs-sft": "RLOO (verifier) model vs SFT model",
              "rloo-rm-vs-sft": "RLOO (reward model) model vs SFT model", "grpo-vs-sft": "GRPO (verifier) model vs SFT model",
              "self-dpo-vs-sft": "Self round (own pairs, DPO) model vs SFT model"}
    for name, w in evals.items():
        lines.append(f"- {titles[name]}: {comparison(w)} {md_cell(w.get('verdict', ''))}")
        c = (content or {}).get(name.replace("-", "_"))
        if c:
            lines.append(f"  Content: {tally(c)}; "
                         f"sign test p = {c['sign_test_p']:.2g}.")
    if best:
        lines.append(f"- Best of {best['n']} (temperature {best['temperature']:g}) vs the RLOO model's greedy answers: "
                     f"{comparison(best)} Sign test p = {best['sign_test_p']:.2g}.")
    if refine:
        lines.append(f"- Self-refinement of the RLOO model's greedy answers (the model rewrites its own answer; the "
                     f"verifier keeps a revision only if it scores higher): {refine['improved']} of {refine['n']} "
                     f"improved ({refine['improved_share']:.0%}), mean reward gain {refine['mean_reward_gain']:+.3f}.")
    if rm and rm.get("gold_by_step"):
        lines += ["", "RLOO against the reward model, gold (verifier) reward of greedy replies to the held-out prompts by "
                  "step: " + ", ".join(f"{step}: {g:.2f}" for step, g in rm["gold_by_step"]) + "."]
    lines += ["", "Samples after RLOO against the verifier (prompt -> reply, as JSON strings):", ""]
    samples = [
        f"{shown(s['prompt'])} -> {shown(s['response'])}  ({'correct' if s['correct'] else 'wrong'}, {s['finish']})"
        for s in scores["rloo"]["samples"][:5]
    ]
    return "\n".join(lines + fenced(samples)) + "\n"


def comparison(w: dict) -> str:
    return (f"{tally(w)}; win rate {w['win_rate']:.3f} "
            f"(95% CI {w['ci95'][0]:.3f} to {w['ci95'][1]:.3f}).")


def shown(text: str) -> str:
    """Model text as a JSON string: one line, its ends visible, newlines and control characters escaped
    (nothing reaches the terminal raw)."""
    return json.dumps(text)
