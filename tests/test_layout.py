"""The import graph of alignkit: no cycles, and imports point down the layers (issue 20).

The graph is read from the source with `ast`: every `import` and `from ... import` of an alignkit
module, at the top of a file and inside functions alike (a function-level import is still a
dependency; it only runs later). Importing `alignkit.a.b` also runs `alignkit/a/__init__.py`, so a
package whose __init__ imports something counts as imported too. Not seen: imports built from
strings at run time (`importlib.import_module`; alignkit uses it only for a user's verifier).

The layers, bottom up (a module may import its own layer and those below it):

    ground     alignkit, config                   imports nothing of alignkit (config.py is the floor)
    utilities  files, markdown, plots, remote, winrate (win-rate statistics)
    data       data/ (loading, prompts, chat templates, ...), models
    engines    generation, responses, rewards/, serving
    stages     train/, evaluate/, testtime/, loops/   peers: one stage package does not import another
    report     report
    rounds     rounds (iterative DPO: runs the pairs, dpo and eval stages in turn, so it sits above them)
    table      stages (the stage table)
    pipeline   pipeline
    demo       demo/
    cli        cli

Imports that break this today are listed in KNOWN, each with its reason; the test fails on any other
and on a listed one that is gone (so the list stays a true picture: delete the entry).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ("ground", ["alignkit", "alignkit.config"]),
    ("utilities", ["alignkit.files", "alignkit.markdown", "alignkit.plots", "alignkit.remote",
                   "alignkit.winrate"]),
    ("data", ["alignkit.data", "alignkit.models"]),
    ("engines", ["alignkit.generation", "alignkit.responses", "alignkit.rewards", "alignkit.serving"]),
    ("stages", ["alignkit.train", "alignkit.evaluate", "alignkit.testtime", "alignkit.loops"]),
    ("report", ["alignkit.report"]),
    ("rounds", ["alignkit.rounds"]),
    ("table", ["alignkit.stages"]),
    ("pipeline", ["alignkit.pipeline"]),
    ("demo", ["alignkit.demo"]),
    ("cli", ["alignkit.cli", "alignkit.__main__"]),
]
PEERS = {"stages"}
"""Layers whose packages are peers: an import from one of its packages into another is flagged."""

KNOWN = {
    ("alignkit.generation", "alignkit.train.loop"):
        "precision_for and distributed_state (device, dtype, ranks) live in the training loop; they belong "
        "below both, e.g. in models",
    ("alignkit.evaluate.text_metrics", "alignkit.train.logprobs"):
        "perplexity uses the trainers' per-token log-probabilities (label_logps), a model-level helper",
    ("alignkit.testtime.bon", "alignkit.evaluate.run"):
        "best-of-N scores and tabulates its sweep with the eval stage's pairing, scoring and failure "
        "counts (pair_up, score_groups, per_prompt_means, reward_failures) and runs on an EvalConfig",
    ("alignkit.testtime.refine", "alignkit.evaluate.run"):
        "refinement scores its rounds with the eval stage's pairing and failure counts (pair_up, "
        "per_prompt_means, reward_failures) and runs on an EvalConfig",
}
"""(importer, imported) -> why the import that points up or across stage packages stays for now."""


def module_names(root: Path, package: str = "alignkit") -> dict[str, Path]:
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path, package: str = "alignkit") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file)."""
    modules = module_names(root, package)
    direct: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == package}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = here[:len(here) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != package:
                    continue
                for alias in node.names:  # `from . import config` imports the module alignkit.config
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
        direct[name] = {m for m in found if m in modules and m != name}
    graph = {}
    for name, targets in direct.items():
        edges = set(targets)
        for target in targets:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = target.split(".")
            for k in range(2, len(parts)):
                parent = ".".join(parts[:k])
                if direct.get(parent) and not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a -> ... -> a) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:  # Tarjan; alignkit's graph is shallow enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:  # breadth first, inside the group, back to start
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                found.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return found


def layer_of(module: str, layers=LAYERS) -> tuple[int, str] | None:
    """(layer index, the entry it matched: its package) for a module; None for one not in LAYERS."""
    best = None
    for i, (_, entries) in enumerate(layers):
        for entry in entries:
            hit = module == entry or ("." in entry and module.startswith(entry + "."))
            if hit and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best


def bad_imports(graph: dict[str, set[str]], layers=LAYERS, peers=PEERS) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for each import that points up a layer or across peer packages."""
    bad = []
    names = [name for name, _ in layers]
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            a, b = layer_of(src, layers), layer_of(dst, layers)
            if a is None or b is None:
                continue  # test_every_module_has_a_layer names them
            if b[0] > a[0]:
                bad.append((src, dst, f"up from {names[a[0]]} to {names[b[0]]}"))
            elif a[0] == b[0] and names[a[0]] in peers and a[1] != b[1]:
                bad.append((src, dst, f"across the {names[a[0]]} layer ({a[1]} -> {b[1]})"))
    return bad


def render(pairs) -> str:
    return "\n".join("  " + " -> ".join(p[:2]) + (f"  ({p[2]})" if len(p) > 2 else "") for p in pairs)


# --------------------------------------------------------------------------- the checks, on a toy package


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_graph_sees_top_level_function_level_and_package_imports(tmp_path):
    write_package(tmp_path, {
        "alignkit/__init__.py": "",
        "alignkit/config.py": "import os\n",
        "alignkit/low/__init__.py": "from .core import thing\n",
        "alignkit/low/core.py": "from .. import config\nthing = 1\n",
        "alignkit/low/leaf.py": "from ..config import x\n",
        "alignkit/top.py": "import alignkit.low.leaf\n\ndef late():\n    from .high import y\n",
        "alignkit/high.py": "from alignkit import top\nfrom . import __init__ as nothing\n",
    })
    graph = import_graph(tmp_path)
    assert graph["alignkit.config"] == set()
    assert graph["alignkit.low.core"] == {"alignkit.config"}
    assert graph["alignkit.low"] == {"alignkit.low.core"}
    assert graph["alignkit.top"] == {"alignkit.low.leaf", "alignkit.low", "alignkit.high"}  # low/__init__ too
    assert graph["alignkit.low.leaf"] == {"alignkit.config"}  # its own package's __init__ is no edge
    assert cycles(graph) == [["alignkit.high", "alignkit.top", "alignkit.high"]]  # through late()'s import


def test_layer_rules_flag_upward_and_cross_peer_imports():
    layers = [("ground", ["alignkit", "alignkit.config"]), ("stages", ["alignkit.a", "alignkit.b"]),
              ("top", ["alignkit.cli"])]
    graph = {"alignkit.config": {"alignkit.a.x"}, "alignkit.a.x": {"alignkit.a.y", "alignkit.b.z"},
             "alignkit.a.y": {"alignkit.config"}, "alignkit.b.z": set(), "alignkit.cli": {"alignkit.a.x"}}
    assert bad_imports(graph, layers, {"stages"}) == [
        ("alignkit.a.x", "alignkit.b.z", "across the stages layer (alignkit.a -> alignkit.b)"),
        ("alignkit.config", "alignkit.a.x", "up from ground to stages")]
    assert layer_of("alignkit.elsewhere", layers) is None and layer_of("alignkit", layers) == (0, "alignkit")


# --------------------------------------------------------------------------- the checks, on alignkit


def test_no_import_cycles():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles (top-level or function-level imports):\n" + "\n".join(
        "  " + " -> ".join(c) for c in found)


def test_config_is_the_ground_floor():
    assert import_graph(ROOT)["alignkit.config"] == set()


def test_the_pipeline_and_the_stage_table_do_not_import_the_cli_or_the_demo():
    graph = import_graph(ROOT)
    for low in ("alignkit.pipeline", "alignkit.stages"):
        assert not {m for m in graph[low] if m == "alignkit.cli" or m.startswith("alignkit.demo")}, low


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph(ROOT) if layer_of(m) is None)
    assert not missing, f"add these modules to a layer in LAYERS of tests/test_layout.py: {missing}"


def test_imports_point_down():
    bad = bad_imports(import_graph(ROOT))
    new = [b for b in bad if b[:2] not in KNOWN]
    gone = sorted(set(KNOWN) - {b[:2] for b in bad})
    assert not new, "imports against the layers (see this file's docstring):\n" + render(new)
    assert not gone, "no longer imported: delete these from KNOWN in tests/test_layout.py:\n" + render(gone)


def test_data_file_suffixes_agree_with_the_loader():
    from alignkit.config import DATA_FILE_SUFFIXES
    from alignkit.data.loading import FILE_BUILDERS

    assert tuple(FILE_BUILDERS) == DATA_FILE_SUFFIXES
