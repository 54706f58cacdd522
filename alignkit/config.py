"""Typed stage configs: dataclass defaults <- YAML recipe <- command-line overrides.

Every stage config is a dataclass whose fields are scalars, lists or nested dataclasses.
Keys are addressed by dotted paths (`train.learning_rate`); unknown keys are errors that name
the key and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the stage's config."""


# --------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2.5-0.5B"
    """Hugging Face model id or local directory."""
    tokenizer: str | None = None
    """Tokenizer id or directory; defaults to name_or_path."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    chat_template: str | None = None
    """A Jinja chat template (string or path to a .jinja file) replacing the tokenizer's."""
    end_of_turn_token: str | None = None
    """Token that closes an assistant turn; detected from the chat template when unset."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""
    attn_implementation: str | None = None
    """e.g. sdpa, flash_attention_2, eager; transformers picks when unset."""


@dataclass
class DataConfig:
    dataset: str = "HuggingFaceTB/smol-smoltalk"
    """Hub dataset id, a local JSONL/JSON/Parquet file, a folder of such files named by split, or a saved dataset."""
    subset: str | None = None
    """Dataset config name on the Hub (the `name` argument of load_dataset)."""
    split: str = "train"
    eval_dataset: str | None = None
    """Dataset for evaluation; defaults to `dataset`."""
    eval_split: str | None = None
    """Split used for evaluation, e.g. test or test_sft. Unset: see eval_ratio."""
    eval_ratio: float = 0.0
    """Fraction of the training rows held out (seeded) for evaluation when eval_split is unset."""
    max_examples: int | None = None
    """Keep this many training rows (after a seeded shuffle); unset keeps all."""
    max_eval_examples: int | None = None
    max_prompt_tokens: int | None = None
    """Drop examples whose prompt (tokens before the first response) is longer."""
    max_response_tokens: int | None = None
    """Truncate each response to this many tokens; later turns of that chat are dropped."""
    min_response_chars: int = 0
    """Drop examples with a response shorter than this many characters."""
    first_turn_only: bool = False
    """Keep only the first user/assistant exchange (and a leading system message)."""
    skip_invalid: bool = False
    """Skip (and count) invalid rows instead of stopping with an error."""
    num_proc: int | None = None
    """Processes for tokenisation."""


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; overrides epochs when set."""
    batch_size: int = 8
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = batch_size * grad_accum * processes."""
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps; used when warmup_steps is 0."""
    max_grad_norm: float | None = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 mixed precision on a GPU that supports it, fp32 otherwise."""
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    """Evaluate every N steps (and at the end) when an eval split exists."""
    save_steps: int | None = 500
    """Write a resumable checkpoint every N steps."""
    save_total_limit: int | None = 2
    """Keep the newest N checkpoints (the best one is always kept)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; the best checkpoint is restored."""
    metric_for_best: str = "eval_loss"
    """Eval metric that picks the best checkpoint for early stopping."""
    greater_is_better: bool | None = None
    """Whether a higher metric_for_best is better; unset: false for names ending in loss or perplexity, true otherwise."""


# --------------------------------------------------------------------------- machinery


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def leaf_fields(cls: type, prefix: str = "", defaults=None) -> dict[str, tuple[Any, Any, str]]:
    """Dotted name -> (type, default, help) for every scalar field of a config dataclass.

    A section's defaults come from the enclosing stage (DPO's data default is not SFT's).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: dict[str, tuple[Any, Any, str]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = prefix + f.name
        default = getattr(defaults, f.name) if defaults is not None else default_of(f)
        if dataclasses.is_dataclass(tp):
            out.update(leaf_fields(tp, name + ".", default))
        else:
            out[name] = (tp, default, docs.get(f.name, ""))
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field (attribute docstrings), used as --help text."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# Names users bring from TRL / transformers TrainingArguments, mapped to ours.
ALIASES = {
    "lr": "learning_rate",
    "bs": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "model_name_or_path": "name_or_path",
    "model": "name_or_path",
    "dataset_name": "dataset",
    "gradient_checkpointing": "gradient_checkpointing",
    "bf16": "precision",
    "output": "output_dir",
}


def suggest(key: str, valid: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    leaf = ALIASES.get(leaf, leaf)
    key = key.rsplit(".", 1)[0] + "." + leaf if "." in key else leaf
    same_leaf = [v for v in valid if v.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return f"; did you mean '{same_leaf[0]}'?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:
        by_leaf = {v.rsplit(".", 1)[-1]: v for v in valid}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    return f"; did you mean '{close[0]}'?" if close else ""


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, key) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # also parses '1e-5', which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def flatten(mapping: dict, leaves: dict, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> dotted keys; a mapping stays whole where the field itself is a dict."""
    out = {}
    for k, v in mapping.items():
        k = prefix + str(k).replace("-", "_")
        if isinstance(v, dict) and k not in leaves:
            out.update(flatten(v, leaves, k + "."))
        else:
            out[k] = v
    return out


def build(cls: type, values: dict[str, Any]):
    """Instantiate `cls` from dotted-key values, validating every key and type."""
    leaves = leaf_fields(cls)
    valid = sorted(leaves)
    for key in values:
        if key not in leaves:
            raise ConfigError(f"unknown config key '{key}'{suggest(key, valid)}")
    nested: dict[str, Any] = {}
    for key, value in values.items():
        tp = leaves[key][0]
        parts = key.split(".")
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = coerce(value, tp, key)
    return _apply(cls(), nested)


def _apply(obj, nested: dict):
    """Set nested values on a config built with the stage's own defaults."""
    for name, value in nested.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value)
        else:
            setattr(obj, name, value)
    return obj


def load(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults <- YAML file at `path` <- `overrides` (dotted keys)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        values = flatten(raw, leaf_fields(cls))
        try:
            build(cls, values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    values.update({k.replace("-", "_"): v for k, v in (overrides or {}).items()})
    return build(cls, values)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
