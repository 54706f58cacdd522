"""`alignkit run PIPELINE.yaml`: stages from one file into one run directory; a rerun does only what changed.

The file:

    run_dir: runs/reference            # each stage writes to run_dir/<stage name>/ (the runner sets output_dir)
    vars:                              # optional free values, used as ${vars.NAME}; --var NAME=VALUE overrides
      steps: 20
    stages:                            # run in this order
      sft:                             # the stage's name; its kind defaults to the name
        recipe: sft-recipe.yaml        # optional; relative to the pipeline file (its output_dir is ignored)
        train: {max_steps: "${vars.steps}"}   # settings over the recipe: nested or dotted keys, as in a recipe
      dpo:
        model: {name_or_path: "${sft.final}"}  # an earlier stage's output, by name
      eval-dpo:
        kind: eval                     # a CLI stage that writes to an output_dir (not demo, serve-reward)
        model: "${dpo.final}"

A reference is `${stage.output}` or `${vars.NAME}`; a value that is one reference alone keeps the
referenced value's type, one inside a longer string is pasted as text. Each kind's outputs are in
OUTPUTS (every stage also has `dir`, its folder). A stage may refer only to stages above it, so
there are no cycles.

The whole file is checked before any stage starts: keys, kinds, references, vars, then every stage's
resolved config through config.validate, with paths inside the stage folders deferred (an upstream
stage makes them; they are checked when their stage starts). Errors name the stage and the key.
Nothing in the file or a --var grants power (config.enforce_trust); the grants of the command line
(--trust-remote-code, --allow-key NAME=HOST, ...) apply to every stage.

Each stage folder holds stage.json (written atomically): name, kind, hash, run_id (new each time the
stage is cleared and run; kept by a resume), alignkit (`code_version`: the version and a digest of
the package's files), status (running or done), started, finished, wall_s, outputs (name -> path
relative to the stage folder, so a moved run directory keeps them), inputs (the upstream stages it
uses), consumed (upstream -> the run id it read), config (the resolved config), and, for the plan's
reasons, upstream (name -> hash) and files (local input -> digest). The hash covers the resolved
config (paths in the run directory written relative to it; not output_dir, resume or quiet), the
upstream stages' hashes, alignkit's code_version (a pulled or edited checkout reruns what it ran),
and a fingerprint of every config string that names an existing file or folder outside the stage
folders (relative to the working directory, as the loaders read it; not name-only keys such as
split, nor files a stage writes itself such as reward.cache and dpo.ref_cache_dir), of the base that
a LoRA adapter folder among them was trained on (its adapter_config.json names it), and of the
source file of a `module:function` verifier. Fingerprints are bounded (CONTENT_BYTES, MAX_FILES):
past them, files count by name, size and mtime, and the plan says so. A literal path into an earlier
stage's folder makes that stage an input, as a reference would; into a later one, or the stage's
own, it is an error.

On a rerun a stage is skipped when done with the same hash (and its outputs present) and every
upstream still holds the run it read; resumed when its last run was interrupted with the same hash
(training stages from their last checkpoint, generate and eval from the responses on disk); and
otherwise cleared and run again; a stage below one that runs or resumes runs too. `--only a,b` and
`--from name` restrict which stages may run; a chosen stage whose upstream is not done and
unchanged is an error. `--dry-run` prints the plan. A stage folder holding a symbolic link is
refused (a shipped folder must not make a stage write outside it). At the end the report is
written (the file's stages only) unless nothing ran and report/report.json shows it current.

Simplified: stages run one after another in file order, in this process; a folder is the unit of
caching (no sharing of unchanged outputs between run directories); to force a stage to run
again, delete its folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from . import code_version
from . import config as config_lib
from .config import ConfigError, flatten, leaf_fields, suggest
from .files import refuse_links, write_atomic
from .models import is_adapter_dir, named_base
from .stages import STAGES

OUTPUTS: dict[str, dict[str, str]] = {
    "sft": {"final": "final"},
    "dpo": {"final": "final"},
    "rm": {"final": "final"},
    "rl": {"final": "final"},
    "generate": {"responses": "responses.jsonl"},
    "eval": {"winrate": "winrate.json"},
    "bon": {"responses": "responses.jsonl", "candidates": "candidates.jsonl", "sweep": "sweep.json"},
    "refine": {"responses": "responses.jsonl"},
    "pairs": {"dataset": "dataset", "train": "dataset/train.jsonl", "card": "card.json"},
    "self-improve": {"rounds": "rounds.json"},
    "curriculum": {"prompts": "prompts.jsonl", "card": "card.json"},
    "augment": {"prompts": "prompts.jsonl", "sft": "sft.jsonl", "merged": "merged.jsonl", "card": "card.json"},
    "merge": {"model": ""},  # the merged model is the stage folder itself
}
"""Outputs of each kind, by name -> path inside the stage folder; every kind also has `dir` (the folder)."""

NOT_STAGES = {"serve-reward", "serve-chat", "report"}
"""Stages of the table (alignkit.stages) that cannot be pipeline stages (besides those without an
output_dir); `run` and `demo`, which run a pipeline themselves, are not in the table at all."""
RUNNER_KEYS = {"output_dir": "the runner writes each stage to run_dir/<stage name>",
               "resume": "the runner resumes an interrupted stage itself"}
NOT_HASHED = {"output_dir", "resume", "quiet"}
WRITTEN_BY_STAGE = {"cache", "ref_cache_dir"}
"""Config leaves naming files a stage writes itself: never fingerprinted as inputs."""
NOT_PATHS = {"split", "eval_split", "subset", "revision", "column", "category_column", "metric_for_best",
             "attn_implementation", "end_of_turn_token", "base_url", "api_key_env", "system_prompt", "kind"}
"""Config leaves that hold names, not paths: never fingerprinted even when a file of that name exists
(`split: train` beside a folder called train)."""
CONTENT_BYTES = 256 << 20
"""Bytes of one input (file or folder) hashed by content; files past this budget are fingerprinted by
relative name, size and modification time (a 5 GB model folder plans in milliseconds, not minutes)."""
MAX_FILES = 10_000
"""Files of one input folder fingerprinted at most; past this the walk stops and the plan says so."""
MODULE_RULE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*")
"""A `module:function` verifier (reward.rule): its module's source file is an input."""
TOP_KEYS = ("run_dir", "vars", "stages")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REF = re.compile(r"\$\{([^{}]*)\}")


@dataclass
class RunConfig:
    pipeline: str = ""
    """The pipeline file (also the first argument: alignkit run PIPELINE.yaml)."""
    only: list[str] = field(default_factory=list)
    """Run only these stages (names, comma-separated); the others are left as they are."""
    from_: str | None = None
    """Run this stage and the ones below it; the ones above are left as they are."""
    dry_run: bool = False
    """Print the plan (which stages run, resume or are skipped, and why) and do nothing."""
    var: list[str] = field(default_factory=list)
    """NAME=VALUE: a value of the pipeline's vars, replacing the file's."""
    run_dir: str | None = None
    """Write to this run directory instead of the file's run_dir."""
    quiet: bool = False
    """No progress bars in any stage."""


@dataclass
class PlannedStage:
    name: str
    kind: str
    dir: Path
    config: Any
    inputs: list[str]
    outputs: dict[str, str]
    files: dict[str, str]
    upstream: dict[str, str] = field(default_factory=dict)
    """Hash of each stage in `inputs`."""
    notes: list[str] = field(default_factory=list)
    """What the plan should say about how the inputs were fingerprinted (bounded folders)."""
    run_id: str | None = None
    """Id of the stage's current run: the previous record's, or a new one once it runs."""
    hash: str = ""
    action: str = "run"
    """run (from a cleared folder), resume or skip."""
    why: str = ""
    previous: dict | None = None
    """The stage.json of the last run in the folder, if any."""


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    stages: list[PlannedStage]


# --------------------------------------------------------------------------- reading and checking


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (e.g. two stages of one name)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"key {key!r} is given twice ({mark.name}, line {mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def stage_kinds() -> dict[str, type]:
    """Kind -> config class: the stages of the table that write to an output_dir."""
    return {k: s.config for k, s in STAGES.items()
            if k not in NOT_STAGES and "output_dir" in {f.name for f in dataclasses.fields(s.config)}}


def outputs_of(kind: str) -> dict[str, str]:
    return {"dir": "", **OUTPUTS.get(kind, {})}


def parse_vars(raw, overrides: list[str]) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"vars: expected a mapping of names to values, got {raw!r}")
    values = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not VAR_NAME.fullmatch(name):
            raise ConfigError(f"vars: {name!r} is not a valid name (letters, digits and _, not starting with a digit)")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"vars.{name}: {value!r} is not allowed; expected a string, number, boolean or null")
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"vars.{name}: {value!r}: a var cannot refer to other values")
        values[name] = value
    for item in overrides:
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--var {item!r}: expected NAME=VALUE")
        if name not in values:
            known = ", ".join(values) or "none"
            raise ConfigError(f"--var {name}: the pipeline has no var '{name}'{suggest(name, list(values))} "
                              f"(its vars: {known})")
        values[name] = value
    return values


def substitute(value, key: str, resolve):
    """`value` with every ${...} replaced through resolve(text, key); lists and mappings recursively."""
    if isinstance(value, str):
        whole = REF.fullmatch(value.strip())
        out = resolve(whole.group(1), key) if whole else REF.sub(lambda m: str(resolve(m.group(1), key)), value)
        if isinstance(out, str) and "${" in out and not whole:
            raise ConfigError(f"{key}: {value!r}: unclosed or nested reference; "
                              "write ${stage.output} or ${vars.NAME}")
        return out
    if isinstance(value, list):
        return [substitute(v, f"{key}[{i}]", resolve) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: substitute(v, f"{key}.{k}", resolve) for k, v in value.items()}
    return value


def stage_values(name: str, body: dict, cls: type, base: Path) -> dict[str, Any]:
    """Dotted settings of a stage: its recipe (output_dir dropped), then the inline keys over it."""
    leaves = leaf_fields(cls)
    inline = flatten({k: v for k, v in body.items() if k not in ("kind", "recipe")}, leaves)
    for key in inline:
        if key in RUNNER_KEYS:
            raise ConfigError(f"stage '{name}': {key} cannot be set in a pipeline: {RUNNER_KEYS[key]}")
    values: dict[str, Any] = {}
    recipe = body.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, str):
            raise ConfigError(f"stage '{name}': recipe: expected a path, got {recipe!r}")
        path = Path(recipe).expanduser()
        path = path if path.is_absolute() else base / path
        recipe_values = flatten(read_yaml(path, f"stage '{name}': recipe"), leaves)
        values = {k: v for k, v in recipe_values.items() if k not in RUNNER_KEYS}
        check_keys(values, leaves, f"stage '{name}': recipe {path}: ")
    check_keys(inline, leaves, f"stage '{name}': ")
    return values | inline


def check_keys(values: dict, leaves: dict, where: str) -> None:
    unknown = [k for k in values if k not in leaves]
    if unknown:
        raise ConfigError(f"{where}unknown config key '{unknown[0]}'{suggest(unknown[0], sorted(leaves))}")


def read_pipeline(path: str | Path, var_overrides: list[str] = (), run_dir: str | None = None) -> Pipeline:
    """Parse and check the whole file; every stage's config resolved and validated, hashes computed."""
    path = Path(path)
    raw = read_yaml(path, "pipeline file")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{path}: unknown top-level key '{key}'{suggest(str(key), list(TOP_KEYS))} "
                              f"(allowed: {', '.join(TOP_KEYS)})")
    variables = parse_vars(raw.get("vars"), list(var_overrides))

    def var_only(text: str, key: str):
        head, _, tail = text.partition(".")
        if head != "vars":
            raise ConfigError(f"{key}: ${{{text}}}: only ${{vars.NAME}} may be used here")
        return resolve_var(tail, key, variables)

    spec = run_dir if run_dir is not None else raw.get("run_dir")
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{path}: run_dir is required (the folder that holds a subfolder per stage), got {spec!r}")
    root = Path(substitute(spec, "run_dir", var_only)).expanduser()
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{path}: stages: expected a mapping of stage names to their settings, got {stages_raw!r}")
    kinds = stage_kinds()
    names = [str(n) for n in stages_raw]
    for name in names:
        if not NAME.fullmatch(name) or name == "vars":
            raise ConfigError(f"stages: {name!r} is not a valid stage name (letters, digits, - and _; not 'vars')")
    stages: list[PlannedStage] = []
    for index, (name, body) in enumerate(zip(names, stages_raw.values())):
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ConfigError(f"stage '{name}': expected a mapping of settings, got {body!r}")
        kind = body.get("kind", name)
        if kind not in kinds:
            where = "" if "kind" in body else " (the kind defaults to the stage name; set kind:)"
            raise ConfigError(f"stage '{name}': unknown stage kind '{kind}'{suggest(str(kind), list(kinds))}{where}; "
                              f"kinds: {', '.join(kinds)}")
        values = stage_values(name, body, kinds[kind], path.parent)
        inputs: list[str] = []

        def resolve(text: str, key: str, name=name, index=index, inputs=inputs):
            head, dot, tail = text.partition(".")
            if not dot or not head or not tail or "." in tail:
                raise ConfigError(f"stage '{name}': {key}: ${{{text}}} is not a reference; "
                                  "write ${stage.output} or ${vars.NAME}")
            if head == "vars":
                return resolve_var(tail, f"stage '{name}': {key}", variables)
            if head == name:
                raise ConfigError(f"stage '{name}': {key}: ${{{text}}} refers to the stage itself")
            if head not in names:
                raise ConfigError(f"stage '{name}': {key}: ${{{text}}}: there is no stage '{head}'{suggest(head, names)}")
            if names.index(head) > index:
                raise ConfigError(f"stage '{name}': {key}: ${{{text}}}: stage '{head}' comes later; "
                                  "a stage can refer only to the stages above it")
            upstream = stages[names.index(head)]
            if tail not in upstream.outputs:
                raise ConfigError(f"stage '{name}': {key}: ${{{text}}}: stage '{head}' (kind {upstream.kind}) has no output "
                                  f"'{tail}'{suggest(tail, list(upstream.outputs))}; it has: {', '.join(upstream.outputs)}")
            if head not in inputs:
                inputs.append(head)
            return upstream.outputs[tail]

        resolved = {k: substitute(v, k, resolve) for k, v in values.items()}
        resolved["output_dir"] = str(root / name)
        try:
            cfg = config_lib.build(kinds[kind], resolved)
            config_lib.enforce_trust(cfg, resolved)  # no power from the file or a --var; the CLI grants
            with config_lib.deferred([root / n for n in names]):
                config_lib.validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"stage '{name}': {e}") from None
        found, notes, named = input_files(config_lib.to_dict(cfg), root, names)
        for other, (key, value) in named.items():
            where = f"stage '{name}': {key}: {value!r} lies in the folder of stage '{other}'"
            if other == name:
                raise ConfigError(f"{where} itself, which the runner clears before the stage runs")
            if names.index(other) > index:
                raise ConfigError(f"{where}, which comes later; a stage can use only the stages above it")
            if other not in inputs:  # a literal path into an earlier stage: an input, like ${other.dir}
                inputs.append(other)
        folder = root / name
        outputs = {k: str(folder / rel) if rel else str(folder) for k, rel in outputs_of(kind).items()}
        stage = PlannedStage(name, kind, folder, cfg, inputs, outputs, {}, notes=notes)
        stage.files = {portable(k, root): d for k, d in found.items()}
        stage.upstream = {u: stages[names.index(u)].hash for u in inputs}
        stage.hash = stage_hash(stage)
        stages.append(stage)
    return Pipeline(path, root, stages)


def resolve_var(name: str, where: str, variables: dict):
    if name not in variables:
        raise ConfigError(f"{where}: ${{vars.{name}}}: there is no var '{name}'{suggest(name, list(variables))}")
    return variables[name]


# --------------------------------------------------------------------------- hashes


def fingerprint(path: Path) -> tuple[str, str | None]:
    """(digest, note) of a file's or a folder's content: every file's relative name and size, and its
    bytes while the input's CONTENT_BYTES budget lasts, else its modification time. A folder of more
    than MAX_FILES files is fingerprinted by its first MAX_FILES (in name order); the note says what
    was bounded (None when everything was hashed by content)."""
    h = hashlib.sha256()
    budget, by_metadata, files, truncated = CONTENT_BYTES, 0, [], False
    if path.is_file():
        files = [(path.name, path)]
    else:
        for f in walk_files(path):
            if len(files) == MAX_FILES:
                truncated = True
                break
            files.append((f.relative_to(path).as_posix(), f))
    for rel, f in files:
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0".encode())
        if st.st_size > budget:
            by_metadata += 1
            h.update(f"mtime {st.st_mtime_ns}\0".encode())
            continue
        budget -= st.st_size
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    notes = []
    if truncated:
        notes.append(f"more than {MAX_FILES} files, fingerprinted by the first {MAX_FILES}")
    if by_metadata:
        notes.append(f"{by_metadata} file(s) past the {CONTENT_BYTES >> 20} MiB content budget "
                     "fingerprinted by size and modification time")
    return h.hexdigest()[:16], "; ".join(notes) or None


def walk_files(folder: Path):
    """Files under `folder` in a fixed order (sorted names, depth first), links not followed."""
    for top, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            f = Path(top) / name
            if f.is_file():
                yield f


def module_source(spec: str) -> Path | None:
    """The source file of the module of a `module:function` verifier, found without importing it (no
    package __init__ runs), or None."""
    module = spec.split(":", 1)[0]
    locations, found = None, None
    for part in module.split("."):
        try:
            where = locations if locations is not None else sys.path
            found = importlib.machinery.PathFinder.find_spec(part, where)
        except (ImportError, ValueError, OSError):
            return None
        if found is None:
            return None
        locations = found.submodule_search_locations
    origin = getattr(found, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def input_files(config: dict, root: Path, names: list[str]) -> tuple[dict[str, str], list[str], dict]:
    """What a stage's config reads from disk: (files, notes, stages).

    files: every config string that names an existing file or folder (relative to the working
    directory, as the loaders read it; not inside a stage folder of the pipeline; not a name-only leaf
    of NOT_PATHS) -> digest, and for a `module:function` verifier its module's source file; notes: how
    bounded fingerprints were taken; stages: stage name -> (key, value) of a string that lies in that
    stage's folder (the caller makes it a dependency)."""
    folders = {n: Path(os.path.abspath(Path(root) / n)) for n in names}
    found: dict[str, str] = {}
    notes: list[str] = []
    named: dict[str, tuple] = {}
    seen: set[str] = set()

    def add(label: str, path: Path) -> None:
        found[label], note = fingerprint(path)
        if note:
            notes.append(f"{label}: {note}")

    def visit(value, key: str) -> None:
        leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                visit(v, f"{key}[{i}]")
        elif isinstance(value, str) and value.strip() and leaf not in WRITTEN_BY_STAGE | NOT_PATHS:
            if leaf == "rule" and MODULE_RULE.fullmatch(value):
                source = module_source(value)
                if source is not None:
                    add(value, source)
                return
            try:
                path = Path(value).expanduser()
                absolute = Path(os.path.abspath(path))
                inside = next((n for n, f in folders.items() if absolute == f or f in absolute.parents), None)
                if inside is not None:
                    named.setdefault(inside, (key, value))
                    return
                if not path.exists():
                    return
            except (OSError, ValueError):  # e.g. an inline chat template, too long for a file name
                return
            add(value, path)
            base = adapter_base_of(path)
            if base is not None and base not in found and base not in seen:
                seen.add(base)  # a chain of adapters, each trained on the one before, ends; a cycle too
                visit(base, f"{key} (base of the adapter in {value})")

    visit({k: v for k, v in config.items() if k not in NOT_HASHED}, "")
    return dict(sorted(found.items())), notes, named


def adapter_base_of(path: Path) -> str | None:
    """The base an adapter folder names (models.named_base), or None for anything else. An adapter's
    weights are deltas on that base, so the base is an input as much as the adapter: a base folder
    retrained in place must rerun the stage (a Hub id, like any Hub id, is not fingerprinted). An
    unreadable adapter_config.json is the loader's error when the stage runs, not the plan's."""
    if not is_adapter_dir(path):
        return None
    try:
        return named_base(path)
    except (ConfigError, OSError):
        return None


def portable(value, root: Path):
    """`value` with paths inside the run directory written as ${run_dir}/..., so that a run directory
    moved or copied elsewhere keeps its hashes."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and (value == str(root) or value.startswith(str(root) + os.sep)):
        return "${run_dir}" + value[len(str(root)):]
    return value


def hashed_config(config: dict, root: Path) -> dict:
    return portable({k: v for k, v in config.items() if k not in NOT_HASHED}, root)


def stage_hash(stage: PlannedStage) -> str:
    root = stage.dir.parent
    payload = {"kind": stage.kind, "config": hashed_config(config_lib.to_dict(stage.config), root),
               "upstream": stage.upstream, "files": stage.files, "alignkit": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- the plan


def read_record(folder: Path) -> dict | None:
    path = folder / "stage.json"
    if not path.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder} holds files but no stage.json: it was not made by `alignkit run`. "
                              "Move it away or choose another run_dir; the runner clears only its own stage folders")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a torn record: the stage runs again


def changes(stage: PlannedStage, old: dict, plan: dict[str, PlannedStage]) -> list[str]:
    """Why a stage's hash differs from its recorded one, in words."""
    if old.get("kind") != stage.kind:
        return [f"kind changed: {old.get('kind')} -> {stage.kind}"]
    why = []
    if old.get("alignkit") != code_version():
        why.append(f"alignkit changed: {old.get('alignkit') or 'unrecorded'} -> {code_version()}")
    config = old.get("config") or {}
    old_root = Path(config["output_dir"]).parent if config.get("output_dir") else stage.dir.parent  # it may have moved
    before = flatten(hashed_config(config, old_root), {})
    now = flatten(hashed_config(config_lib.to_dict(stage.config), stage.dir.parent), {})
    keys = sorted(k for k in before.keys() | now.keys() if repr(before.get(k)) != repr(now.get(k)))
    if keys:
        why.append("config changed: " + ", ".join(keys))
    files = old.get("files") or {}
    moved = sorted(k for k in files.keys() | stage.files.keys() if files.get(k) != stage.files.get(k))
    if moved:
        why.append("input changed: " + ", ".join(moved))
    recorded = old.get("upstream") or {}
    for u in stage.inputs:
        if recorded.get(u) != stage.upstream[u]:
            why.append(f"upstream {u} {'reruns' if plan[u].action == 'run' else 'changed'}")
    return why or ["settings changed"]


def natural_action(stage: PlannedStage, plan: dict[str, PlannedStage]) -> tuple[str, str]:
    """(run | resume | skip, why) for a stage by the rerun rules, before --only/--from."""
    old = stage.previous
    if old is None:
        return "run", "not started"
    if old.get("hash") != stage.hash:
        return "run", "; ".join(changes(stage, old, plan))
    moving = [u for u in stage.inputs if plan[u].action in ("run", "resume")]
    if moving:
        return "run", "; ".join(f"upstream {u} {plan[u].action.replace('run', 'rerun')}s" for u in moving)
    consumed = old.get("consumed") or {}
    replaced = [u for u in stage.inputs if consumed.get(u) is None or consumed.get(u) != plan[u].run_id]
    if replaced:  # same hash, but the upstream ran again after this stage read it (--only, an interruption)
        return "run", "; ".join(f"upstream {u} ran again since this stage used it" for u in replaced)
    if old.get("status") != "done":
        return "resume", "interrupted, unchanged"
    missing = [k for k, p in (old.get("outputs") or {}).items() if not (stage.dir / p).exists()]
    if missing:
        return "run", "outputs missing: " + ", ".join(missing)
    return "skip", "done, unchanged"


def make_plan(pipe: Pipeline, only: list[str] = (), start: str | None = None) -> None:
    """Set each stage's action and reason; --only / --from restrict the stages that may run."""
    names = [s.name for s in pipe.stages]
    for chosen, flag in [(n, "--only") for n in only] + ([(start, "--from")] if start else []):
        if chosen not in names:
            raise ConfigError(f"{flag} {chosen}: there is no stage '{chosen}'{suggest(chosen, names)}; "
                              f"stages: {', '.join(names)}")
    selected = set(only) if only else set(names)
    if start:
        selected &= set(names[names.index(start):])
    by_name: dict[str, PlannedStage] = {}
    refuse_links(Path(pipe.run_dir) / "report", "report")  # before any work, not only when it is written
    for stage in pipe.stages:  # first by the rerun rules alone
        refuse_links(stage.dir, f"stage '{stage.name}'")
        stage.previous = read_record(stage.dir)
        stage.run_id = (stage.previous or {}).get("run_id")
        stage.action, stage.why = natural_action(stage, by_name)
        by_name[stage.name] = stage
    for stage in pipe.stages:
        if stage.name not in selected:
            continue
        for u in stage.inputs:
            if u not in selected and by_name[u].action != "skip":
                flag = f"--only {','.join(only)}" if only else f"--from {start}"
                raise ConfigError(f"{flag}: stage '{stage.name}' needs '{u}', which is not done and unchanged "
                                  f"({by_name[u].why}); let it run too")
    flag = "--only" if only else "--from"
    for stage in pipe.stages:
        if stage.name not in selected and stage.action != "skip":
            stage.action, stage.why = "skip", f"not chosen ({flag}); would {stage.action}: {stage.why}"


def render_plan(pipe: Pipeline) -> str:
    width = max(len(s.name) for s in pipe.stages)
    lines = [f"pipeline {pipe.path} -> {pipe.run_dir}"]
    for s in pipe.stages:
        lines.append(f"  {s.name:<{width}}  {s.action:<6}  {s.why}")
        lines += [f"  {'':<{width}}  {'':<6}  (input {note})" for note in s.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(folder: Path, record: dict) -> None:
    write_atomic(folder / "stage.json", json.dumps(record, indent=1, default=str))


def execute(stage: PlannedStage, quiet: bool, consumed: dict[str, str | None] | None = None) -> None:
    """Run (from a cleared folder) or resume one stage, recording it in stage.json: `consumed` is the
    run id of each upstream stage it reads."""
    if stage.action == "run" and stage.dir.exists():
        shutil.rmtree(stage.dir)
    stage.dir.mkdir(parents=True, exist_ok=True)
    before = float((stage.previous or {}).get("wall_s") or 0.0) if stage.action == "resume" else 0.0
    if stage.action != "resume" or not stage.run_id:
        stage.run_id = uuid.uuid4().hex[:16]
    record = {"name": stage.name, "kind": stage.kind, "hash": stage.hash, "run_id": stage.run_id,
              "alignkit": code_version(), "status": "running", "started": now(), "finished": None,
              "wall_s": before,
              "outputs": {"dir": "."}, "inputs": stage.inputs, "consumed": dict(consumed or {}),
              "config": config_lib.to_dict(stage.config), "upstream": stage.upstream, "files": stage.files}
    write_record(stage.dir, record)
    cfg = dataclasses.replace(stage.config)
    try:
        config_lib.validate(cfg)  # now with the upstream outputs on disk
    except ConfigError as e:
        raise ConfigError(f"stage '{stage.name}': {e}") from None
    if stage.action == "resume" and hasattr(cfg, "resume"):
        cfg.resume = True
    if quiet and hasattr(cfg, "quiet"):
        cfg.quiet = True
    t0 = time.perf_counter()
    try:
        STAGES[stage.kind].run(cfg)
    except BaseException as e:
        record.update(wall_s=before + time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        write_record(stage.dir, record)  # still running: the next run resumes it
        raise
    record.update(status="done", finished=now(), wall_s=round(before + time.perf_counter() - t0, 3))
    record["outputs"] = {k: os.path.relpath(p, stage.dir) for k, p in stage.outputs.items()
                         if Path(p).exists()}
    record.pop("error", None)
    write_record(stage.dir, record)


def run_pipeline(cfg: RunConfig) -> Path | None:
    """Check the whole file, print the plan, run what it says; return the run directory (None for a dry run)."""
    if not cfg.pipeline:
        raise ConfigError("give the pipeline file first: alignkit run PIPELINE.yaml [options] "
                          "(a list option such as --only takes every word after it)")
    only = [n for item in cfg.only for n in item.split(",") if n]
    pipe = read_pipeline(cfg.pipeline, cfg.var, cfg.run_dir)
    make_plan(pipe, only, cfg.from_)
    print(render_plan(pipe), flush=True)
    if cfg.dry_run:
        return None
    by_name = {s.name: s for s in pipe.stages}
    for stage in pipe.stages:
        if stage.action == "skip":
            continue
        print(f"[run] {stage.name} ({stage.kind}): {stage.action}: {stage.why}", flush=True)
        execute(stage, cfg.quiet, {u: by_name[u].run_id for u in stage.inputs})
    ran = sum(s.action != "skip" for s in pipe.stages)
    from .report import report_is_current, write_report

    names = [s.name for s in pipe.stages]
    if ran or not report_is_current(pipe.run_dir, names):  # else the report on disk is this one already
        write_report(pipe.run_dir, stages=names)
    print(f"[run] {ran} of {len(pipe.stages)} stages ran, {len(pipe.stages) - ran} skipped", flush=True)
    return pipe.run_dir
