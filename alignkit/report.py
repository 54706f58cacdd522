"""`alignkit report RUN_DIR`: one Markdown report of a run, with PNG plots beside it.

RUN_DIR is a pipeline run directory (a subdirectory per stage, each with stage.json), any folder of
stage output directories (e.g. the demo's), or a single stage's output directory. A stage without
stage.json is recognised by what it wrote: config.yaml, metrics.jsonl, winrate.json, matrix.json or
sweep.json. The report goes to RUN_DIR/report/report.md with its plots in the same folder, so the
folder can be copied into a PR or paper as is. It shows the stages (key settings, status, wall
time); training curves per stage; every win rate with both tie rules, intervals, the sign test and
a plain verdict; win-rate matrices; per-category rates; best-of-N sweeps; and a few prompts with
each model's answer. Model text only ever appears inside fenced code blocks (see `markdown`); every
other value from a stage's files is escaped or checked to be a number. Given a pipeline's stage
names, only those are reported; a stage whose upstream folder now holds another run is marked
stale. report.json beside report.md records what the report was written from (alignkit version,
run ids), so that `alignkit run` knows when to rewrite it.

Simplifications: a stage's kind, when stage.json does not say it, is guessed from its config keys;
stages without stage.json are ordered by when their config.yaml was written; a partial stage (still
running, no metrics yet) is listed with what it has. Drawing lives in `plots` only; without
matplotlib the report is written without plots and says so.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import code_version, plots
from .config import ConfigError
from .files import refuse_links, write_atomic
from .evaluate.run import ci_text, lc_text, matrix_tables
from .winrate import relation, sign_test
from .markdown import fenced, md_cell

log = logging.getLogger(__name__)

STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""A pipeline stage's name (its folder in the run directory); a record naming anything else as an
upstream is not followed."""
MARKERS = ("stage.json", "config.yaml", "metrics.jsonl", "winrate.json", "matrix.json", "sweep.json")
"""Files by which a directory is recognised as a stage's output."""

PANELS = {
    "dpo": [("reward margin", ["reward_margin", "eval_reward_margin"]),
            ("reward accuracy", ["reward_accuracy", "eval_reward_accuracy"])],
    "rm": [("accuracy", ["accuracy", "eval_accuracy"]),
           ("reward margin", ["reward_margin", "eval_reward_margin"])],
    "rl": [("reward", ["reward", "eval_reward"]), ("KL to the reference, per sequence", ["kl"]),
           ("KL to the reference, per token (k3)", ["kl_k3"]),
           ("completion length (tokens)", ["completion_length", "eval_completion_length"]),
           ("entropy", ["entropy"])],
}
"""Per kind of stage, its telling metrics: (subplot title, metrics.jsonl keys); training and eval_ keys
share a plot."""
COMMON_PANELS = [("loss", ["loss", "eval_loss"]), ("win rate during training (ties count 0)", ["eval_win_rate"]),
                 ("mean reward during training", ["eval_mean_reward"])]


@dataclass
class ReportConfig:
    run_dir: str = ""
    """A pipeline run directory, a folder of stage output directories, or one stage's output directory
    (also accepted as the first argument: `alignkit report RUN_DIR`)."""
    output_dir: str | None = None
    """Where report.md and its PNG plots go (default: RUN_DIR/report)."""
    samples: int = 3
    """Prompts whose answers are shown side by side across the evaluated models."""
    plots: bool = True
    """Draw PNG plots (needs matplotlib, the `plots` extra); false writes the Markdown only."""


@dataclass
class StageRun:
    """One stage's output directory and what the report reads of it."""

    name: str
    path: Path
    kind: str
    status: str
    config: dict
    record: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    """Why the stage's outputs no longer match its upstream stages on disk (empty when they do)."""

    def title(self) -> str:
        return self.name if self.name == self.kind else f"{self.name} ({self.kind})"

    def read(self, filename: str):
        return read_json(self.path / filename)


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable (a stage still writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file (a line being written, or a broken one, is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_stage_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def guess_kind(path: Path, config: dict) -> str:
    """The kind of stage a directory without stage.json holds, from its files and config keys."""
    if (path / "sweep.json").is_file():
        return "bon"
    if (path / "winrate.json").is_file() or (path / "matrix.json").is_file() or "matrix" in config:
        return "eval"
    for kind in ("rl", "dpo"):
        if kind in config:
            return kind
    if "max_length" in config and "data" in config:
        return "rm"
    if "data" in config and "train" in config:
        return "sft"
    if "sampling" in config and "prompts" in config:
        return "generate"
    for kind, key in (("curriculum", "categorize"), ("augment", "diversity")):
        if key in config:
            return kind
    return "stage"


def load_stage(path: Path, name: str | None = None) -> StageRun:
    """A stage folder as the report sees it; `name` (default: the record's, else the folder's) is
    what the report calls it: in a run directory always the folder's name, so a copied `sft-old`
    is not a second `sft`."""
    record = read_json(path / "stage.json")
    record = record if isinstance(record, dict) else {}
    config = record["config"] if isinstance(record.get("config"), dict) else read_config(path / "config.yaml")
    kind = str(record.get("kind") or guess_kind(path, config))
    if record.get("status"):
        status = str(record["status"])
    elif (path / "final").is_dir() or any((path / f).is_file() for f in ("winrate.json", "matrix.json", "sweep.json")):
        status = "done"
    else:
        status = "incomplete"
    metrics = read_jsonl(path / "metrics.jsonl")
    return StageRun(str(name or record.get("name") or path.name), path, kind, status, config, record, metrics)


def stage_order(path: Path) -> tuple:
    record = read_json(path / "stage.json")
    started = record.get("started") if isinstance(record, dict) else None
    written = [(path / m).stat().st_mtime for m in MARKERS if (path / m).is_file()]
    return (str(started) if started is not None else "", min(written), path.name)


def find_stages(run_dir: Path, names: list[str] | None = None) -> list[StageRun]:
    """The stages of a run directory in the order they ran, or the directory itself when it is one stage.
    With `names` (a pipeline run: its file's stages, in file order) only those folders, so that folders
    of stages removed from the file, or copies such as `sft-old`, are not reported."""
    if names is not None:
        stages = [load_stage(run_dir / n, n) for n in names if is_stage_dir(run_dir / n)]
    else:
        children = sorted((p for p in run_dir.iterdir() if is_stage_dir(p)), key=stage_order)
        pipeline = any((p / "stage.json").is_file() for p in children)
        if is_stage_dir(run_dir) and not pipeline:
            return [load_stage(run_dir)]
        stages = [load_stage(p, p.name) for p in children]
    for s in stages:
        s.stale = stale_reasons(s, run_dir)
    return stages


def stale_reasons(stage: StageRun, run_dir: Path) -> list[str]:
    """Upstream stages (a pipeline record's inputs) whose folder no longer holds the run, or the hash,
    that this stage used: its outputs were made from files that are not there any more."""
    why = []
    consumed, hashes = stage.record.get("consumed"), stage.record.get("upstream") or {}
    for u in stage.record.get("inputs") or []:
        up = read_json(run_dir / u / "stage.json") if isinstance(u, str) and STAGE_NAME.fullmatch(u) else None
        if not isinstance(up, dict):
            why.append(f"upstream {u} is gone")
        elif up.get("status") != "done":
            why.append(f"upstream {u} is {up.get('status') or 'incomplete'}")
        elif isinstance(consumed, dict) and consumed.get(u) != up.get("run_id"):
            why.append(f"upstream {u} ran again since")
        elif isinstance(hashes, dict) and u in hashes and hashes[u] != up.get("hash"):
            why.append(f"upstream {u} changed since")
    return why


# --------------------------------------------------------------------------- small formatting helpers


def get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def short(spec, run_dir: Path) -> str:
    """A model or file path relative to the run directory when it lies inside it; anything else as is."""
    text = str(spec)
    try:
        return str(Path(text).resolve().relative_to(run_dir.resolve()))
    except (ValueError, OSError):
        return text


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(v) -> str:
    """A number as text; anything else (a string in a JSON field that should hold a number) escaped."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if is_number(v) else md_cell(v)


def malformed(data: dict, keys: tuple[str, ...], pairs: tuple[str, ...] = ()) -> str | None:
    """The first of `keys` whose value is not a number (a missing one included; for `pairs`, not two
    numbers), else None: what the report cannot show of a hand-edited or foreign JSON file."""
    for k in keys:
        if not is_number(data.get(k)):
            return k
    for k in pairs:
        v = data.get(k)
        if not (isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v)):
            return k
    return None


def file_stem(name: str) -> str:
    """A stage name as a safe file-name part (and a safe Markdown link target)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "stage"


def reward_text(reward) -> str | None:
    if not isinstance(reward, dict) or not reward.get("kind"):
        return None
    kind = reward["kind"]
    if kind == "rule":
        detail = reward.get("rule")
    elif kind == "remote":
        detail = " at ".join(str(x) for x in (reward.get("model"), reward.get("base_url")) if x)
    else:  # hf: the reward model (the rule field keeps its default and means nothing here)
        detail = reward.get("model")
    return f"{kind} {detail}" if detail else str(kind)


def key_settings(stage: StageRun, run_dir: Path) -> list[tuple[str, str]]:
    """(name, value) of the settings that tell one stage from another: model, data, steps, learning
    rate, and per method its own (DPO beta and loss, RL algorithm, k and beta, the eval's judge)."""
    c, kind = stage.config, stage.kind
    out: list[tuple[str, object]] = []
    model = get(c, "model.name_or_path") if isinstance(c.get("model"), dict) else c.get("model")
    if kind == "eval":
        if c.get("matrix"):
            out.append(("entries", ", ".join(short(m, run_dir) for m in c["matrix"])))
        else:
            reference = c.get("reference")
            out += [("A", short(model, run_dir) if model else None), ("B", short(reference, run_dir) if reference else None)]
        out += [("judge", reward_text(c.get("reward"))), ("ties", c.get("ties")),
                ("prompts", short(get(c, "prompts.dataset"), run_dir) if get(c, "prompts.dataset") else None)]
        return [(k, str(v)) for k, v in out if v not in (None, "")]
    if model:
        out.append(("model", short(model, run_dir)))
    data = get(c, "data.dataset") or get(c, "prompts.dataset")
    if data:
        out.append(("data", short(data, run_dir)))
    train = c.get("train") if isinstance(c.get("train"), dict) else {}
    if train:
        steps = train.get("max_steps")
        out.append(("steps", steps if steps is not None else f"{train.get('epochs')} epochs"))
        out.append(("lr", train.get("learning_rate")))
        if train.get("batch_size") is not None:
            out.append(("batch", f"{train['batch_size']}x{train.get('grad_accum', 1)}"))
    if kind == "dpo":
        d = c.get("dpo") or {}
        out += [("beta", d.get("beta")), ("loss", d.get("loss_type"))]
        out += [(k, d[k]) for k in ("dpop_lambda", "kl_lambda", "label_smoothing") if d.get(k)]
        if d.get("length_normalize"):
            out.append(("length_normalize", "true"))
    if kind == "rl":
        r = c.get("rl") or {}
        out += [("algo", r.get("algo")), ("k", r.get("k")), ("beta", r.get("beta")),
                ("reward", reward_text(c.get("reward")))]
    if kind == "generate":
        s = c.get("sampling") or {}
        out += [("temperature", s.get("temperature")), ("n", s.get("n"))]
    sweep = stage.read("sweep.json") if kind == "bon" else None
    if isinstance(sweep, dict):
        out += [("reference", short(sweep.get("reference", ""), run_dir)), ("judge", sweep.get("judge")),
                ("temperatures", ", ".join(map(str, sweep.get("temperatures", [])))),
                ("N", ", ".join(map(str, sweep.get("n_values", []))))]
    return [(k, number(v)) for k, v in out if v not in (None, "")]


# --------------------------------------------------------------------------- sections


class Report:
    """Collects Markdown lines and the plots drawn for them."""

    def __init__(self, run_dir: Path, out: Path, draw: bool):
        self.run_dir, self.out, self.draw = run_dir, out, draw
        self.lines: list[str] = []
        self.plots: list[Path] = []
        self.stems: set[str] = set()

    def plot_path(self, prefix: str, stage: StageRun) -> Path:
        """A PNG path named by the stage's folder, distinct from every other one of this report."""
        stem = f"{prefix}-{file_stem(stage.path.name)}"
        k, unique = 1, stem
        while unique in self.stems:
            k += 1
            unique = f"{stem}-{k}"
        self.stems.add(unique)
        return self.out / f"{unique}.png"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def image(self, path: Path | None, alt: str) -> None:
        if path is not None:
            self.plots.append(path)
            self.add("", f"![{md_cell(alt)}]({path.name})")


def stages_section(rep: Report, stages: list[StageRun]) -> None:
    rep.add("", "## Stages", "", "| stage | kind | status | key settings | wall time |", "|---|---|---|---|---|")
    for s in stages:
        settings = "; ".join(f"{k} {v}" for k, v in key_settings(s, rep.run_dir)) or "-"
        status = f"{s.status}, stale" if s.stale else s.status
        rep.add(f"| {md_cell(s.name)} | {md_cell(s.kind)} | {md_cell(status)} | {md_cell(settings)} "
                f"| {duration(s.record.get('wall_s'))} |")
    total = sum(s.record.get("wall_s") for s in stages if is_number(s.record.get("wall_s")))
    if total:
        rep.add("", f"Total wall time of the stages: {duration(total)}.")
    stale = [s for s in stages if s.stale]
    if stale:
        listed = "; ".join(f"{md_cell(s.name)} ({md_cell(', '.join(s.stale))})" for s in stale)
        rep.add("", "**Stale:** these stages' results were made from upstream outputs that are no longer in "
                f"the run directory; `alignkit run` reruns them: {listed}.")


def panels_for(stage: StageRun) -> list[tuple[str, list[str]]]:
    """Loss, the kind's telling metrics, the win rate during training; a stage of another kind also
    gets a panel for each other eval_ metric it logs."""
    panels = COMMON_PANELS[:1] + PANELS.get(stage.kind, []) + COMMON_PANELS[1:]
    if stage.kind in PANELS or stage.kind == "sft":
        return panels
    shown = {k for _, keys in panels for k in keys}
    extra = sorted({k for r in stage.metrics for k in r if k.startswith("eval_") and k not in shown})
    return panels + [(k[len("eval_"):].replace("_", " ") + " (eval)", [k]) for k in extra]


def curves_section(rep: Report, stages: list[StageRun]) -> None:
    trained = [s for s in stages if s.metrics]
    if not trained:
        return
    rep.add("", "## Training curves", "",
            "First and last logged value of each telling metric (eval_*: measured on held-out data at evaluation steps).")
    for s in trained:
        panels = panels_for(s)
        rows = []
        for _, keys in panels:
            for key in keys:
                logged = [r for r in s.metrics if isinstance(r.get(key), (int, float))]
                if logged:
                    first, last = logged[0], logged[-1]
                    where = f"step {number(last.get('step'))}"
                    if last.get("restored_from_step") is not None:  # early stopping's restored best (final/)
                        where = f"final, restored from step {number(last['restored_from_step'])}"
                    rows.append(f"| {md_cell(key)} | {number(first[key])} (step {number(first.get('step'))}) "
                                f"| {number(last[key])} ({where}) |")
        rep.add("", f"### {md_cell(s.title())}", "")
        if rows:
            rep.add("| metric | first | last |", "|---|---|---|", *rows)
        else:
            rep.add("No metrics logged yet.")
        if rep.draw:
            path = plots.training_curves(s.metrics, panels, rep.plot_path("curves", s), s.title())
            rep.image(path, f"training curves of {s.name}")


GOLD_TABLE_ROWS = 12
"""Evaluation points listed in a proxy-vs-gold table at most (evenly spread, the first, the last and the
gold's best kept); the figure shows them all."""


def reward_label(reward, run_dir: Path) -> str:
    """A reward as the report names it: kind and rule, or kind and model (a path inside the run shortened)."""
    if isinstance(reward, dict) and reward.get("kind") == "hf" and reward.get("model"):
        return f"hf {short(reward['model'], run_dir)}"
    return reward_text(reward) or "-"


def gold_points(stage: StageRun) -> list[dict]:
    """The evaluations of an RL stage that scored a gold reward (numbers only), in step order."""
    return [r for r in stage.metrics if is_number(r.get("step")) and is_number(r.get("eval_gold_reward"))
            and math.isfinite(r["eval_gold_reward"])]


def gold_section(rep: Report, stages: list[StageRun]) -> None:
    """Per RL stage with a gold reward: proxy (the training reward) and gold against steps, the eval points,
    and what they show (a gold that peaks and falls while the proxy rises: over-optimisation)."""
    runs = [(s, gold_points(s)) for s in stages if s.kind == "rl"]
    runs = [(s, points) for s, points in runs if points]
    if not runs:
        return
    rep.add("", "## Proxy and gold reward", "",
            "RL maximises the proxy (its training reward, e.g. a learned reward model); the gold reward (another "
            "judge, e.g. the verifier) scores the same greedy answers to the held-out prompts at each evaluation. "
            "A proxy that keeps rising while the gold falls is reward over-optimisation (Gao et al. 2022, "
            "\"Scaling laws for reward model overoptimization\").")
    for s, points in runs:
        proxy, gold = reward_label(s.config.get("reward"), rep.run_dir), reward_label(s.config.get("gold_reward"), rep.run_dir)
        rep.add("", f"### {md_cell(s.title())}", "", f"Proxy: {md_cell(proxy)}. Gold: {md_cell(gold)}.", "")
        trained = {r["step"]: r["reward"] for r in s.metrics if is_number(r.get("step")) and is_number(r.get("reward"))}
        shown = points
        if len(points) > GOLD_TABLE_ROWS:
            best = max(range(len(points)), key=lambda i: points[i]["eval_gold_reward"])
            keep = {round(i * (len(points) - 1) / (GOLD_TABLE_ROWS - 2)) for i in range(GOLD_TABLE_ROWS - 1)} | {best}
            shown = [points[i] for i in sorted(keep)]
        rep.add("| step | proxy, training samples | proxy, held-out | gold, held-out |", "|---|---|---|---|")
        for r in shown:
            step = number(r["step"]) + (f" (restored from {number(r['restored_from_step'])})"
                                        if is_number(r.get("restored_from_step")) else "")
            held = number(r["eval_reward"]) if is_number(r.get("eval_reward")) else "-"
            rep.add(f"| {step} | {number(trained[r['step']]) if r['step'] in trained else '-'} | {held} "
                    f"| {number(r['eval_gold_reward'])} |")
        if len(shown) < len(points):
            rep.add("", f"{len(shown)} of {len(points)} evaluations listed (the figure has all).")
        rep.add("", gold_verdict(points))
        if rep.draw:
            path = plots.proxy_gold(s.metrics, rep.plot_path("proxy-gold", s), f"{s.title()}: proxy and gold reward",
                                    proxy, gold)
            rep.image(path, f"proxy reward ({proxy}) and gold reward ({gold}) of {s.name} against steps")


def gold_verdict(points: list[dict]) -> str:
    """What the evaluation points show, in a sentence or two (numbers only from the points)."""
    first, last = points[0], points[-1]
    best = max(points, key=lambda r: r["eval_gold_reward"])
    text = (f"Gold reward {number(first['eval_gold_reward'])} at step {number(first['step'])}, "
            f"{number(last['eval_gold_reward'])} at step {number(last['step'])}")
    if is_number(first.get("eval_reward")) and is_number(last.get("eval_reward")):
        text += f"; held-out proxy {number(first['eval_reward'])} -> {number(last['eval_reward'])}"
    text += "."
    proxy_rose = is_number(best.get("eval_reward")) and is_number(last.get("eval_reward")) and last["eval_reward"] > best["eval_reward"]
    if best is not last and last["eval_gold_reward"] < best["eval_gold_reward"] and proxy_rose:
        text += (f" The gold peaked at step {number(best['step'])} ({number(best['eval_gold_reward'])}) and fell while "
                 "the proxy kept rising: over-optimisation of the proxy. train.metric_for_best: eval_gold_reward with "
                 "train.early_stopping_patience keeps the gold's best checkpoint; a larger rl.beta holds the policy "
                 "closer to the reference.")
    return text


def comparison_label(r: dict, run_dir: Path) -> tuple[str, str]:
    return short(r.get("model", "A"), run_dir), short(r.get("reference", "B"), run_dir)


def winrate_row(name: str, r: dict, run_dir: Path) -> str:
    a, b = comparison_label(r, run_dir)
    wins, losses, ties, n = r["wins"], r["losses"], r["ties"], r["n"]
    tie_value = r.get("tie_value", 0.0)
    zero = ci_text(r["win_rate"], r["ci95"]) if tie_value == 0.0 else f"{wins / max(n, 1):.3f}"
    half = ci_text(r["win_rate_ties_half"], r["ci95_ties_half"]) if "ci95_ties_half" in r else "-"
    p = r.get("sign_test_p", sign_test(wins, losses))
    return (f"| {md_cell(name)} | {md_cell(a)} | {md_cell(b)} | {md_cell(r.get('judge', '-'))} | {n} "
            f"| {wins} / {losses} / {ties} | {zero} | {half} | {lc_text(r)} | {p:.3g} "
            f"| A is {relation(wins, losses)} B |")


WINRATE_NUMBERS = ("wins", "losses", "ties", "n", "win_rate")
PAIR_NUMBERS = WINRATE_NUMBERS + ("win_rate_ties_half", "sign_test_p")


def comparison_problem(r: dict, required: tuple[str, ...], intervals: tuple[str, ...] = ("ci95",)
                       ) -> str | None:
    """The first field of a comparison (winrate.json, a matrix pair) that the report would have to
    print but is not a number (`intervals`: not two numbers); optional fields are checked when present."""
    if "ci95_ties_half" in r and "ci95_ties_half" not in intervals:
        intervals += ("ci95_ties_half",)
        required += ("win_rate_ties_half",)
    optional = tuple(k for k in ("win_rate_ties_half", "sign_test_p", "tie_value")
                     if k in r and k not in required)
    bad = malformed(r, required + optional, intervals)
    lc = r.get("length_controlled_win_rate")
    if bad is None and lc is not None and not is_number(lc):
        bad = "length_controlled_win_rate"
    return bad


def matrix_problem(m: dict) -> str | None:
    labels = m.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return "labels"
    bad = malformed(m, ("n",) + (("tie_value",) if "tie_value" in m else ()))
    if bad:
        return bad
    table = m.get("win_rate")
    if not (isinstance(table, list) and len(table) == len(labels)
            and all(isinstance(row, list) and all(v is None or is_number(v) for v in row) for row in table)):
        return "win_rate"
    for key in ("mean_reward", "prompts_per_entry", "dropped_per_entry"):
        values = m.get(key)
        if not (isinstance(values, list) and len(values) == len(labels)
                and all(is_number(v) for v in values)):
            return key
    for k, pair in enumerate(m.get("pairs") or []):
        if not (isinstance(pair, dict) and isinstance(pair.get("a"), str) and isinstance(pair.get("b"), str)):
            return f"pairs[{k}]"
        bad = comparison_problem(pair, PAIR_NUMBERS, ("ci95", "ci95_ties_half"))
        if bad:
            return f"pairs[{k}].{bad}"
    return None


def evals_section(rep: Report, stages: list[StageRun]) -> None:
    pairwise = [(s, s.read("winrate.json")) for s in stages]
    pairwise = [(s, r) for s, r in pairwise if isinstance(r, dict) and "wins" in r]
    matrices = [(s, s.read("matrix.json")) for s in stages]
    matrices = [(s, m) for s, m in matrices if isinstance(m, dict) and "labels" in m]
    skipped = [(s, "winrate.json", comparison_problem(r, WINRATE_NUMBERS)) for s, r in pairwise]
    skipped += [(s, "matrix.json", matrix_problem(m)) for s, m in matrices]
    skipped = [x for x in skipped if x[2]]
    pairwise = [(s, r) for s, r in pairwise if not comparison_problem(r, WINRATE_NUMBERS)]
    matrices = [(s, m) for s, m in matrices if not matrix_problem(m)]
    if not pairwise and not matrices and not skipped:
        return
    rep.add("", "## Win rates", "")
    for s, name, bad in skipped:
        rep.add(f"Not shown: {md_cell(s.name)}/{name}: field {md_cell(bad)} is not what an eval writes "
                "(a number).", "")
    if pairwise:
        rep.add("Each comparison: A's reward against B's on the same prompts. **Ties count 0** is the course protocol "
                "(the reference results are stated in it; a model against itself scores below 0.5). "
                "**Ties count 0.5** is symmetric (0.5 means no difference). Intervals are 95% bootstrap intervals over "
                "prompts; the exact sign test compares wins with losses (ties dropped), and the verdict is its answer at 95% "
                "(with few decided prompts the bootstrap interval can be narrower than the exact test; the verdict goes by the test).",
                "",
                "| eval | A | B | judge | prompts | wins / losses / ties | win rate, ties count 0 (course protocol) "
                "| win rate, ties count 0.5 | length-controlled | sign test p | verdict (95%) |",
                "|---" * 11 + "|")
        for s, r in pairwise:
            rep.add(winrate_row(s.name, r, rep.run_dir))
        for s, r in pairwise:  # a verifier's failures, each scored 0.0 (evaluate.run counts them)
            f = r.get("reward_failures") or {}
            if isinstance(f.get("failed"), int) and f["failed"] > 0 and isinstance(f.get("calls"), int):
                rep.add("", f"{md_cell(s.name)}: the verifier failed on {f['failed']} of {f['calls']} "
                        "answers (each scored 0.0).")
        categories_subsection(rep, pairwise)
    for s, m in matrices:
        rep.add("", f"### Matrix {md_cell(s.name)}: row against column, judge {md_cell(m.get('judge', '-'))}", "")
        rep.add(*matrix_tables(m))
        if not m.get("pairs"):
            rep.add("", "This matrix.json predates the pairwise statistics; rerun the eval for intervals and sign tests.")
        if rep.draw:
            path = plots.matrix_heatmap(m["labels"], m["win_rate"], rep.plot_path("matrix", s),
                                        f"{s.name}: win rate of row against column")
            rep.image(path, f"win-rate matrix of {s.name}")


def category_counts(stage: StageRun) -> dict[str, list[int]]:
    """Wins, losses and ties per category from an eval's per_prompt.jsonl."""
    counts: dict[str, list[int]] = {}
    for row in read_jsonl(stage.path / "per_prompt.jsonl"):
        if row.get("category") is not None and row.get("outcome") in ("win", "loss", "tie"):
            per = counts.setdefault(str(row["category"]), [0, 0, 0])
            per[("win", "loss", "tie").index(row["outcome"])] += 1
    return counts


def categories_subsection(rep: Report, pairwise: list[tuple[StageRun, dict]]) -> None:
    """Per-category win rates of each pairwise eval: both tie rules and the counts from per_prompt.jsonl
    (the bars show ties as half, where 0.5 means no difference), else the eval's own per_category rates."""
    columns, half, zero = {}, {}, {}
    for s, r in pairwise:
        label = f"{s.name}: {comparison_label(r, rep.run_dir)[0]}"
        counts = category_counts(s)
        if counts:
            columns[label] = {c: f"{w / (w + l + t):.3f} / {(w + t / 2) / (w + l + t):.3f} ({w} / {l} / {t})"
                              for c, (w, l, t) in counts.items()}
            half[label] = {c: (w + t / 2) / (w + l + t) for c, (w, l, t) in counts.items()}
        elif isinstance(r.get("per_category"), dict) and r["per_category"]:
            columns[label] = {c: f"{v:.3f}" for c, v in r["per_category"].items() if isinstance(v, (int, float))}
            zero[label] = {c: v for c, v in r["per_category"].items() if isinstance(v, (int, float))}
    if not columns:
        return
    categories = sorted({c for per in columns.values() for c in per})
    rep.add("", "### Per category", "", "Each cell: win rate with ties counting 0 (course protocol) / counting 0.5, then "
            "wins / losses / ties (a single number: the eval's own rate, ties counting as in its config).", "",
            "| category | " + " | ".join(md_cell(k) for k in columns) + " |", "|---" * (len(columns) + 1) + "|")
    for c in categories:
        rep.add(f"| {md_cell(c)} | " + " | ".join(per.get(c, "-") for per in columns.values()) + " |")
    if rep.draw and half:
        rep.image(plots.category_bars(half, rep.out / "per-category.png", "win rate, ties count 0.5"),
                  "win rate per category, ties count 0.5")
    elif rep.draw and zero:
        rep.image(plots.category_bars(zero, rep.out / "per-category.png", "win rate"), "win rate per category")


def bon_section(rep: Report, stages: list[StageRun]) -> None:
    sweeps = [(s, s.read("sweep.json")) for s in stages]
    sweeps = [(s, m) for s, m in sweeps
              if isinstance(m, dict) and isinstance(m.get("rows"), list) and m["rows"]]
    if not sweeps:
        return
    rep.add("", "## Best-of-N", "")
    for s, sw in sweeps:
        good = [r for r in sw["rows"] if isinstance(r, dict) and not bon_row_problem(r)]
        if len(good) < len(sw["rows"]):
            rep.add(f"Not shown: {len(sw['rows']) - len(good)} row(s) of {md_cell(s.name)}/sweep.json whose "
                    "fields are not what best-of-N writes (numbers).", "")
        if not good:
            continue
        sw = {**sw, "rows": good}
        reference = md_cell(short(sw.get("reference", "-"), rep.run_dir))
        rep.add(f"### {md_cell(s.name)}: best of N samples against {reference}, judge {md_cell(sw.get('judge', '-'))}", "",
                "Win rate with ties counting 0 (course protocol) and 0.5, 95% intervals; the share of non-tied comparisons "
                "won next to N/(N+1), what picking the best of N would reach if the judge and the reward were one.", "",
                "| temperature | N | win rate, ties count 0 | win rate, ties count 0.5 | wins / losses / ties | sign test p "
                "| wins / (wins + losses) | ceiling N/(N+1) | mean reward |", "|---" * 9 + "|")
        for r in sorted(sw["rows"], key=lambda r: (r.get("temperature", 0), r.get("n", 0))):
            zero = ci_text(r["win_rate"], r["ci95"]) if r.get("ci95") else number(r.get("win_rate"))
            half = (ci_text(r["win_rate_ties_half"], r["ci95_ties_half"]) if r.get("ci95_ties_half")
                    else number(r.get("win_rate_ties_half", "-")))
            share = r.get("non_tied_win_share")
            rep.add(f"| {number(r.get('temperature'))} | {number(r.get('n'))} | {zero} | {half} "
                    f"| {number(r.get('wins'))} / {number(r.get('losses'))} / {number(r.get('ties'))} "
                    f"| {number(r.get('sign_test_p', '-'))} "
                    f"| {'-' if share is None else f'{share:.3f}'} | {number(r.get('ceiling', '-'))} "
                    f"| {number(r.get('mean_reward', '-'))} |")
        if rep.draw:
            rep.image(plots.bon_sweep(sw, rep.plot_path("bon", s)), f"best-of-N sweep of {s.name}")


def bon_row_problem(r: dict) -> str | None:
    """The first field of a sweep row that is not a number (temperature, N, the win rate: required)."""
    bad = malformed(r, ("temperature", "n", "win_rate"))
    optional = ("win_rate_ties_half", "wins", "losses", "ties", "sign_test_p", "non_tied_win_share",
                "ceiling", "mean_reward")
    bad = bad or next((k for k in optional if r.get(k) is not None and not is_number(r[k])), None)
    for k in ("ci95", "ci95_ties_half"):
        if not bad and r.get(k) and malformed(r, (), (k,)):
            bad = k
    return bad



def pairs_section(rep: Report, stages: list[StageRun]) -> None:
    """Preference pairs made by `alignkit pairs` (card.json: counts, what was dropped and why) and the
    rounds of iterative DPO (rounds.json: each round's win rate against round 0, with its sign test)."""
    cards = [(s, s.read("card.json")) for s in stages]
    cards = [(s, c) for s, c in cards if isinstance(c, dict) and c.get("stage") == "pairs"
             and isinstance(c.get("counts"), dict)]
    rounds = [(s, s.read("rounds.json")) for s in stages]
    rounds = [(s, r) for s, r in rounds if isinstance(r, dict) and isinstance(r.get("rounds"), list)]
    if not cards and not rounds:
        return
    rep.add("", "## Preference pairs", "")
    for s, c in cards:
        counts = {k: v for k, v in c["counts"].items() if is_number(v)}
        dropped = c.get("dropped") if isinstance(c.get("dropped"), dict) else {}
        rep.add(f"### {md_cell(s.name)}: mode {md_cell(c.get('mode', '-'))}, policy "
                f"{md_cell(short(c.get('policy') or '-', rep.run_dir))}, reward {md_cell(c.get('reward') or '-')}", "",
                "| count | value |", "|---|---|", *(f"| {md_cell(k)} | {number(v)} |" for k, v in counts.items()))
        if dropped:
            rep.add("", "| dropped because | prompts or rows |", "|---|---|",
                    *(f"| {md_cell(k)} | {number(v)} |" for k, v in dropped.items() if is_number(v)))
        else:
            rep.add("", "Nothing dropped.")
    for s, r in rounds:
        rows = [x for x in r["rounds"] if isinstance(x, dict) and is_number(x.get("round"))]
        rep.add(f"### {md_cell(s.name)}: iterative (online) DPO, each round's model against round 0 "
                f"({md_cell(short(r.get('reference', '-'), rep.run_dir))}), judge {md_cell(r.get('judge', '-'))}", "",
                "| round | pairs | dropped | win rate, ties count 0 (95% CI) | ties count 0.5 | wins / losses / ties "
                "| sign test p |", "|---" * 7 + "|")
        for x in rows:
            good = not malformed(x, ("win_rate", "wins", "losses", "ties", "sign_test_p"), ("ci95",))
            zero = ci_text(x["win_rate"], x["ci95"]) if good else "-"
            rep.add(f"| {number(x['round'])} | {number(x.get('pairs', '-'))} | {number(x.get('dropped', '-'))} "
                    f"| {zero} | {number(x.get('win_rate_ties_half', '-'))} "
                    f"| {number(x.get('wins', '-'))} / {number(x.get('losses', '-'))} / {number(x.get('ties', '-'))} "
                    f"| {number(x.get('sign_test_p', '-'))} |")

SAMPLE_CHARS = 2000
"""Characters of a prompt or answer shown in the report; the rest is cut, and said so."""


def clipped(text: str) -> str:
    if len(text) <= SAMPLE_CHARS:
        return text
    return text[:SAMPLE_CHARS] + f"\n[... {len(text) - SAMPLE_CHARS} more characters]"


def samples_section(rep: Report, stages: list[StageRun], count: int) -> None:
    """The same prompts answered by every evaluated model (A and B of each pairwise eval), each answer
    fenced. Prompts on which some comparison was not a tie come first."""
    if count <= 0:
        return
    answers: dict[str, dict[str, str]] = {}
    decided: set[str] = set()
    evals = 0
    for s in stages:
        r = s.read("winrate.json")
        rows = read_jsonl(s.path / "per_prompt.jsonl")
        if not isinstance(r, dict) or not rows:
            continue
        evals += 1
        a, b = comparison_label(r, rep.run_dir)
        for row in rows:
            prompt = row.get("prompt")
            if not isinstance(prompt, str):
                continue
            per = answers.setdefault(prompt, {})
            for label, key in ((a, "response_a"), (b, "response_b")):
                if isinstance(row.get(key), str):
                    per.setdefault(label, row[key])
            if row.get("outcome") in ("win", "loss"):
                decided.add(prompt)
    if not answers:
        return
    most = max(len(v) for v in answers.values())
    chosen = sorted((p for p in answers if len(answers[p]) == most), key=lambda p: p not in decided)[:count]
    rep.add("", "## Sample answers", "",
            f"{len(chosen)} prompts answered by every model in the evals above (prompts where a comparison was decided "
            "come first); the text is shown verbatim in code blocks.")
    for k, prompt in enumerate(chosen, 1):
        rep.add("", f"### Prompt {k}", "", *fenced([clipped(prompt)]))
        for label, text in answers[prompt].items():
            rep.add("", f"**{md_cell(label)}**", "", *fenced([clipped(text)]))


# --------------------------------------------------------------------------- data loops (curriculum, augment)


def loss_rates_of(data) -> dict[str, dict]:
    """A card's per-category rates, only the entries whose counts are numbers (files are data)."""
    if not isinstance(data, dict):
        return {}
    keys = ("n", "wins", "losses", "ties", "loss_rate")
    return {str(c): r for c, r in data.items() if isinstance(r, dict) and all(is_number(r.get(k)) for k in keys)}


def later_rates(stage: StageRun, later: list[StageRun], own_eval: str) -> dict[str, dict]:
    """Per-category loss rates of each later eval of the same prompts, categorised as the curriculum
    categorised them (its categories.jsonl maps prompt text to category)."""
    from .loops.categories import category_rates

    mapping = {r["prompt"]: str(r["category"]) for r in read_jsonl(stage.path / "categories.jsonl")
               if isinstance(r, dict) and isinstance(r.get("prompt"), str) and r.get("category") is not None}
    own = Path(own_eval).resolve() if own_eval else None
    columns = {}
    for s in later:
        path = s.path / "per_prompt.jsonl"
        if s.kind != "eval" or not path.is_file() or path.resolve() == own:
            continue
        rows = [(mapping[r["prompt"]], r["outcome"]) for r in read_jsonl(path)
                if isinstance(r, dict) and r.get("prompt") in mapping and r.get("outcome") in ("win", "loss", "tie")]
        if rows:
            columns[f"after: {s.name}"] = category_rates(rows)
    return columns


def loops_section(rep: Report, stages: list[StageRun]) -> None:
    """Curriculum: per-category loss rates before (its eval) and after (later evals of the same prompts),
    a table and a bar plot, the pick, counts and drops. Augment: counts and what was dropped, and why."""
    cards = [(k, s, s.read("card.json")) for k, s in enumerate(stages) if s.kind in ("curriculum", "augment")]
    cards = [(k, s, c) for k, s, c in cards if isinstance(c, dict)]
    if not cards:
        return
    rep.add("", "## Data loops")
    for k, s, card in cards:
        dropped = card.get("dropped") if isinstance(card.get("dropped"), dict) else {}
        drops = ", ".join(f"{md_cell(w)}: {number(n)}" for w, n in dropped.items()) or "nothing"
        if s.kind == "curriculum":
            before = loss_rates_of(card.get("rates"))
            if not before:
                continue
            picked = [str(c) for c in card.get("picked", []) if isinstance(c, str)]
            columns = {"before": before}
            columns.update(later_rates(s, stages[k + 1:], str(card.get("eval") or "")))
            rep.add("", f"### {md_cell(s.name)}: loss rate per category against the reference", "",
                    f"Categorised by {md_cell(card.get('method', '-'))}; picked (weakest): "
                    f"{', '.join(md_cell(c) for c in picked) or 'none'}. Each cell: losses / prompts (losses of "
                    "prompts); 'after' columns are later evals of the same prompts.", "")
            from .loops.curriculum import rates_table

            rep.add(*rates_table(columns, picked))
            rep.add("", f"New prompts: {number(card.get('kept', '-'))} kept of {number(card.get('candidates', '-'))} "
                    f"generated by {md_cell(card.get('generator', '-'))}; dropped: {drops}.")
            classifier = card.get("classifier")
            if isinstance(classifier, dict) and isinstance(classifier.get("unparsed"), dict):
                total = sum(v for v in classifier["unparsed"].values() if is_number(v))
                rep.add(f"Classifier answers that named no category (counted as other): {number(total)}.")
            if rep.draw:
                bars = {label: {c: r["loss_rate"] for c, r in per.items()} for label, per in columns.items()}
                rep.image(plots.category_bars(bars, rep.plot_path("curriculum", s), "loss rate against the reference",
                                              line=None), f"loss rate per category, {s.name}")
        else:
            rep.add("", f"### {md_cell(s.name)}: augmented prompts", "",
                    f"{number(card.get('kept_prompts', '-'))} prompts kept of {number(card.get('candidates', '-'))} "
                    f"generated by {md_cell(card.get('generator', '-'))}; dropped: {drops}."
                    + (f" Answered: {number(card['answered'])}." if "answered" in card else ""))
            merged = card.get("merged")
            if isinstance(merged, dict) and is_number(merged.get("mix_ratio")):
                rep.add(f"Merged: {number(merged.get('original', '-'))} original + {number(merged.get('synthetic', '-'))} "
                        f"synthetic rows (synthetic share {merged['mix_ratio']:.3f}).")


def render(run_dir: Path, out: Path, stages: list[StageRun], samples: int, draw: bool, note: str | None) -> Report:
    rep = Report(run_dir, out, draw)
    rep.add(f"# alignkit report: {md_cell(run_dir.resolve().name)}", "",
            f"{len(stages)} stage{'s' if len(stages) != 1 else ''} in {md_cell(run_dir.resolve())}. "
            f"Written by `alignkit report` (alignkit {md_cell(code_version())}); the plots are PNG files beside "
            "this one.")
    if note:
        rep.add("", note)
    if not stages:
        rep.add("", f"No stage output found (none of {', '.join(MARKERS)}).")
        return rep
    stages_section(rep, stages)
    curves_section(rep, stages)
    gold_section(rep, stages)
    evals_section(rep, stages)
    bon_section(rep, stages)
    pairs_section(rep, stages)
    loops_section(rep, stages)
    samples_section(rep, stages, samples)
    return rep


def report_state(run_dir: Path, names: list[str] | None) -> dict:
    """What a report of `run_dir` depends on besides the files it reads: the alignkit that writes it,
    and each reported stage's run id. Saved as report.json beside report.md."""
    stages = find_stages(run_dir, names) if run_dir.is_dir() else []
    return {"alignkit": code_version(), "stages": {s.name: s.record.get("run_id") for s in stages},
            "stale": {s.name: s.stale for s in stages if s.stale}}


def report_is_current(run_dir: str | Path, names: list[str] | None = None) -> bool:
    """Whether RUN_DIR/report holds the report this alignkit would write of these stages (after an
    upgrade, or with another set of stages, it does not)."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    return ((out / "report.md").is_file() and not (out / "report.md").is_symlink()
            and read_json(out / "report.json") == report_state(run_dir, names))


def write_report(run_dir: str | Path, output_dir: str | Path | None = None, samples: int = 3,
                 draw: bool = True, stages: list[str] | None = None) -> Path:
    """Write <output_dir or RUN_DIR/report>/report.md with its PNG plots beside it; returns its path.
    `stages`: the stage folders to report, in order (a pipeline's file); default every stage folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: run directory not found: {run_dir}")
    out = Path(output_dir) if output_dir else run_dir / "report"
    if not output_dir:  # inside a run folder that may have come from elsewhere: never write through a link
        refuse_links(out, "report")
    out.mkdir(parents=True, exist_ok=True)
    note = None
    if draw and not plots.available():
        draw, note = False, "Plots: not drawn, matplotlib is not installed (`pip install 'alignkit[plots]'`)."
    elif not draw:
        note = "Plots: not drawn (plots: false)."
    rep = render(run_dir, out, find_stages(run_dir, stages), samples, draw, note)
    path = write_atomic(out / "report.md", "\n".join(rep.lines) + "\n")
    write_atomic(out / "report.json", json.dumps(report_state(run_dir, stages), indent=1))
    log.info("report: %s (%d plots)", path, len(rep.plots))
    return path


def run_report(cfg: ReportConfig) -> Path:
    if not cfg.run_dir:
        raise ConfigError("run_dir is required: alignkit report RUN_DIR")
    if cfg.samples < 0:
        raise ConfigError(f"samples: {cfg.samples} must be 0 or more")
    return write_report(cfg.run_dir, cfg.output_dir, cfg.samples, cfg.plots)
