"""Every plot alignkit draws, as PNG files, headless (matplotlib's Agg canvas; no pyplot, no display).

Stages only write data (metrics.jsonl, winrate.json, matrix.json, sweep.json); `alignkit.report`
reads it and calls these functions. Each takes plain Python data and a path, writes one PNG and
returns its path, or None when there is nothing to draw. matplotlib is optional (the `plots`
extra): `available()` says whether it is installed, and nothing here imports it before a plot is drawn.
Simplification: fixed sizes and the default style; no interactive output.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

DPI = 110


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) raises ValueError
        return False


def plain(text, limit: int = 40) -> str:
    """A label from untrusted text: one line, shortened, without control characters, and no `$` that
    matplotlib would read as mathtext (which raises on bad input)."""
    from .markdown import terminal_safe

    text = " ".join(terminal_safe(str(text)).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG through a temporary file and os.replace (never through a link at `path`)."""
    import io

    from .files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_atomic(path, buffer.getvalue())


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that log `key` as a finite number."""
    points = [(r["step"], float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
    points = [p for p in points if math.isfinite(p[1])]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(rows: list[dict], panels: list[tuple[str, list[str]]], path: str | Path,
                    title: str) -> Path | None:
    """One subplot per panel (title, metric keys), a line per key against the optimizer step; keys
    logged at evaluations only (eval_*) get markers. Panels with no logged key are left out."""
    drawn = [(name, [(k, *series(rows, k)) for k in keys]) for name, keys in panels]
    drawn = [(name, [s for s in lines if s[1]]) for name, lines in drawn]
    drawn = [(name, lines) for name, lines in drawn if lines]
    if not drawn:
        return None
    cols = min(3, len(drawn))
    nrows = -(-len(drawn) // cols)
    fig = new_figure(4.2 * cols, 3.0 * nrows)
    for i, (name, lines) in enumerate(drawn):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for key, steps, values in lines:
            marker = "o" if key.startswith("eval_") or len(steps) < 3 else None
            ax.plot(steps, values, label=plain(key), marker=marker, markersize=3)
        ax.set_title(plain(name))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(plain(title, 80))
    return save(fig, path)


def category_bars(rates: dict[str, dict[str, float]], path: str | Path, ylabel: str) -> Path | None:
    """Grouped bars: per category, one bar per comparison ({comparison: {category: win rate}})."""
    categories = sorted({c for per in rates.values() for c in per})
    if not categories:
        return None
    fig = new_figure(max(5.0, 1.1 * len(categories) * max(1, len(rates)) ** 0.5 + 2), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rates)
    for k, (label, per) in enumerate(rates.items()):
        xs = [i + (k - (len(rates) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, [per.get(c, float("nan")) for c in categories], width, label=plain(label))
    ax.set_xticks(range(len(categories)))
    tilt = len(categories) > 4
    ax.set_xticklabels([plain(c, 24) for c in categories], rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel(plain(ylabel, 60))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def bon_sweep(sweep: dict, path: str | Path) -> Path | None:
    """Best-of-N: win rate (ties count 0) against N, a line per temperature with its 95% band; next to
    it the measured share of non-tied comparisons won against the N/(N+1) ceiling."""
    rows = sweep.get("rows") or []
    if not rows:
        return None
    fig = new_figure(10.0, 3.8)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for t in sorted({r["temperature"] for r in rows}):
        rs = sorted((r for r in rows if r["temperature"] == t), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        line = left.plot(ns, [r["win_rate"] for r in rs], marker="o", label=f"T={t:g}")[0]
        if all(r.get("ci95") for r in rs):
            lows, highs = [r["ci95"][0] for r in rs], [r["ci95"][1] for r in rs]
            left.fill_between(ns, lows, highs, color=line.get_color(), alpha=0.2)
        shares = [r.get("non_tied_win_share", float("nan")) for r in rs]
        right.plot(ns, shares, marker="o", color=line.get_color(), label=f"T={t:g}")
    all_n = sorted({r["n"] for r in rows})
    right.plot(all_n, [n / (n + 1) for n in all_n], color="black", linestyle="--", label="ceiling N/(N+1)")
    for ax, title in ((left, "win rate (ties count 0), 95% band"), (right, "wins / (wins + losses)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_n)
        ax.set_xticklabels([str(n) for n in all_n])
        ax.set_xlabel("N (samples per prompt)")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(plain(f"best-of-N against {sweep.get('reference', 'the reference')}", 80))
    return save(fig, path)


def matrix_heatmap(labels: list[str], table: list[list[float | None]], path: str | Path,
                   title: str) -> Path | None:
    """Win rate of row against column as a heat map with the numbers written in."""
    if len(labels) < 2:
        return None
    values = [[float("nan") if v is None else v for v in row] for row in table]
    size = 1.0 + 0.9 * len(labels)
    fig = new_figure(size + 1.5, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdBu")
    for i, row in enumerate(table):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v is not None and abs(v - 0.5) > 0.3 else "black")
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    ax.set_xticklabels([plain(x, 24) for x in labels], rotation=30, ha="right", fontsize=8)
    ax.set_yticklabels([plain(x, 24) for x in labels], fontsize=8)
    ax.set_title(plain(title, 80))
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def proxy_gold(rows: list[dict], path: str | Path, title: str, proxy_label: str, gold_label: str) -> Path | None:
    """Reward over-optimisation (Gao et al. 2022): the proxy reward that RL maximises (its mean on the
    training samples, `reward`, each logged step; on held-out greedy answers, `eval_reward`) on the left
    axis, the gold reward of the same held-out answers (`eval_gold_reward`) on the right, against steps."""
    gold = series(rows, "eval_gold_reward")
    if not gold[0]:
        return None
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    right = ax.twinx()
    lines = []
    train = series(rows, "reward")
    if train[0]:
        lines += ax.plot(*train, color="tab:blue", alpha=0.45, linewidth=1,
                         label=plain(f"proxy, training samples: {proxy_label}", 70))
    held = series(rows, "eval_reward")
    if held[0]:
        lines += ax.plot(*held, color="tab:blue", marker="o", markersize=4,
                         label=plain(f"proxy, held-out: {proxy_label}", 70))
    lines += right.plot(*gold, color="tab:orange", marker="s", markersize=4, linewidth=2,
                        label=plain(f"gold, held-out: {gold_label}", 70))
    ax.set_xlabel("step")
    ax.set_ylabel("proxy reward", color="tab:blue")
    right.set_ylabel("gold reward", color="tab:orange")
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    ax.set_title(plain(title, 80))
    return save(fig, path)
