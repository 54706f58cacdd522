"""Typed stage configs: dataclass defaults <- YAML recipe <- command-line overrides.

Every stage config is a dataclass whose fields are scalars, lists or nested dataclasses.
Keys are addressed by dotted paths (`train.learning_rate`); unknown keys are errors that name
the key and suggest the closest valid one. Once resolved, `validate` checks every value before any
data or model is loaded: ranges, combinations that cannot work, and local paths that must exist.
The rules live here, keyed by section class name, so that sections defined in the stage modules
(SamplingParams, DPOParams, RewardConfig, ...) need no import; a section may add its own
`validate(prefix)` method. The ground floor: this module imports nothing of alignkit (every other
module may import it), so what its checks share with the loaders lives here (eval_origin).

The trust boundary (`enforce_trust`): settings that grant power (running a Python verifier, running
a checkpoint's own code, sending a key over plain http, which key goes to which host) are honoured
only from the command line (overrides, and the grants in GRANTS that `alignkit` sets from
--allow-python-verifier, --trust-remote-code, --allow-insecure-http, --allow-key NAME=HOST), never
from a recipe, a pipeline file or a pipeline --var: a file that grants one is refused, naming the
flag. Their safe values (false, no key) stay allowed in files, so a saved config.yaml loads again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the stage's config."""


# --------------------------------------------------------------------------- shared sections


@dataclass
class LoRAConfig:
    r: int | None = None
    """LoRA rank (through peft); unset: full fine-tuning. Training stages only (sft, dpo, rm, rl)."""
    alpha: float | None = None
    """Scale numerator: the update is (alpha / r) * B A; unset: 2 * r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (suffixes) that get adapters; all-linear: every linear layer but the output layer."""


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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Train low-rank adapters instead of every weight (set lora.r); see docs/lora-and-tracking.md."""


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
    max_tokens_per_batch: int | None = None
    """Fill each micro-batch up to this many tokens instead of batch_size examples (sft, dpo, rm): with
    packing, the sequences' tokens; without, rows x the longest row. grad_accum such micro-batches make a step."""
    packing: bool = False
    """Pack each micro-batch's sequences without padding, several to a row, each attending only to itself
    (FlashAttention's variable-length path under flash_attention_2, a block-diagonal mask otherwise); sft, dpo,
    rm and rl."""
    group_by_length: bool = False
    """Without packing: order examples so that each micro-batch holds similar lengths (seeded, as HF's
    LengthGroupedSampler), which cuts padding more cheaply than packing."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the metrics.jsonl records and the config (accelerate's): wandb, tensorboard,
    trackio, mlflow. Empty: none. Each tracker reads its own settings (e.g. WANDB_API_KEY) from the environment."""


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


@functools.lru_cache(maxsize=None)  # parsing a class's source is slow; a pipeline builds many configs
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field (attribute docstrings), used as --help text; a subclass
    inherits its bases' and may restate them."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            docs = field_docs(base) | docs
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
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
    """Defaults <- YAML file at `path` <- `overrides` (dotted keys, the command line's). The file may
    not grant power (see `enforce_trust`); the overrides and GRANTS may."""
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
    from_file = dict(values)
    command_line = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    values.update(command_line)
    cfg = enforce_trust(build(cls, values), from_file, command_line, f"{path}: " if path is not None else "")
    return validate(cfg)


# --------------------------------------------------------------------------- the trust boundary
#
# A recipe, a pipeline file and a pipeline --var are data anyone may hand you; they may not grant
# themselves power. Only the command line (and Python code calling these functions) can.

POWERS: dict[str, tuple[str, str]] = {
    "allow_python_verifier": (
        "--allow-python-verifier", "imports and runs the Python function reward.rule names"
    ),
    "trust_remote_code": ("--trust-remote-code", "runs the Python code shipped with a model or tokenizer"),
    "allow_insecure_http": ("--allow-insecure-http", "sends an API key unencrypted over plain http"),
}
"""Config leaves (in any section) that grant power -> (the command-line flag that grants it, what it does)."""

KEY_HOSTS: dict[str, tuple[str, ...]] = {
    "NVIDIA_API_KEY": ("integrate.api.nvidia.com",),
    "OPENAI_API_KEY": ("api.openai.com",),
}
"""The hosts a key may go to (over https, exact host name) without --allow-key: its own service's."""


@dataclass(frozen=True)
class Grants:
    """What the command line grants: every field of that name in a stage's config is turned on."""

    allow_python_verifier: bool = False
    trust_remote_code: bool = False
    allow_insecure_http: bool = False
    keys: tuple[tuple[str, str], ...] = ()
    """(NAME, host or host:port): the key in environment variable NAME may go to that host."""


GRANTS = Grants()
"""The grants in force (set by the CLI for one command, see `granted`)."""


@contextlib.contextmanager
def granted(grants: Grants):
    global GRANTS
    saved, GRANTS = GRANTS, grants
    try:
        yield grants
    finally:
        GRANTS = saved


def url_host(url: str, key: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL that a key may be sent to, or ConfigError. URLs that
    parsers read differently (user info, backslashes, spaces or control characters) are refused."""
    text = str(url)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: {text!r} is not an http(s) URL")
    if "@" in parts.netloc or "\\" in text or any(not 33 <= ord(ch) < 127 for ch in text):
        raise ConfigError(f"{key}: {text!r}: write the URL as scheme://host[:port]/path in ASCII "
                          "(no user info, spaces, backslashes or control characters)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{key}: {text!r}: the port is not a number in [0, 65535]") from None
    return parts.scheme, parts.hostname.lower(), port


def parse_key_grant(item: str) -> tuple[str, str]:
    """--allow-key NAME=HOST, NAME=HOST:PORT or NAME=URL -> (NAME, host or host:port)."""
    name, eq, host = str(item).partition("=")
    name, host = name.strip(), host.strip().lower()
    if "://" in host:
        url_host(host, f"--allow-key {item}")
        host = urllib.parse.urlsplit(host).netloc
    host_port = r"([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?"
    if eq and re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and re.fullmatch(host_port, host):
        parts = urllib.parse.urlsplit("//" + host)
        with contextlib.suppress(ValueError):
            return name, parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    raise ConfigError(f"--allow-key {item!r}: expected NAME=HOST or NAME=HOST:PORT (e.g. --allow-key "
                      "MY_API_KEY=api.example.com, --allow-key MY_API_KEY=127.0.0.1:8000)")


def key_allowed(name: str, url: str, key: str = "base_url") -> bool:
    """May the key in variable `name` go to `url`? Its own service (KEY_HOSTS, https) or a grant."""
    scheme, host, port = url_host(url, key)
    if scheme == "https" and host in KEY_HOSTS.get(name, ()):
        return True
    return any(n == name and h in (host, f"{host}:{port}") for n, h in GRANTS.keys)


def truthy(value) -> bool:
    try:
        return coerce(value, bool, "") is True
    except ConfigError:
        return False  # not a boolean: build() reports it


def enforce_trust(cfg, from_file: dict[str, Any], command_line: dict[str, Any] | None = None,
                  where: str = ""):
    """The trust boundary, applied to a config built from a file's values and the command line's:
    a power the file grants itself is refused (naming the flag), GRANTS are applied, and every key
    the config would send goes to its own service's host, a host named with --allow-key, or a host
    that the command line named together with the key (both base_url and api_key_env)."""
    single = command_line is not None  # None: a pipeline, whose stages have no command-line keys
    command_line = command_line or {}
    for key, value in from_file.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in POWERS and key not in command_line and truthy(value) and not getattr(GRANTS, leaf):
            flag, what = POWERS[leaf]
            raise ConfigError(f"{where}{key}: {value!r} is not honoured from a file (it {what}); a recipe, "
                              f"pipeline file or --var cannot grant it. If you trust it, pass {flag} on the "
                              "command line")
    for section, prefix in sections(cfg):
        for f in dataclasses.fields(section):
            if f.name in POWERS and getattr(GRANTS, f.name):
                setattr(section, f.name, True)
        name, url = getattr(section, "api_key_env", None), getattr(section, "base_url", None)
        if not (name and url):
            continue
        named = prefix + "base_url" in command_line and prefix + "api_key_env" in command_line
        if not named and not key_allowed(name, url, f"{where}{prefix}base_url"):
            _, host, port = url_host(url, prefix + "base_url")
            grant = f"{host}:{port}" if urllib.parse.urlsplit(url).port is not None else host
            known = "; ".join(f"{k} -> {', '.join(v)}" for k, v in KEY_HOSTS.items())
            flag = "--" + prefix.replace("_", "-")
            both = f" (or give {flag}base-url and {flag}api-key-env on the command line)" if single else ""
            raise ConfigError(
                f"{where}{prefix}api_key_env: {name} would be sent to {host}, a host the command line did "
                f"not name. A key goes only to its own service over https ({known}) or to a host you name: "
                f"pass --allow-key {name}={grant}{both}"
            )
    return cfg


def sections(cfg, prefix: str = ""):
    """(section, dotted prefix) for a config and every nested config section in it."""
    yield cfg, prefix
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from sections(value, f"{prefix}{f.name}.")


# --------------------------------------------------------------------------- validation
#
# Ranges per section (class name -> field -> (test, what is allowed)); unset (None) values pass.


def at_least(low: float, what: str = "an integer") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"{what} >= {low}"


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    def test(v) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return test, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


COUNT = at_least(1)
NON_NEGATIVE = at_least(0, "a number")
POSITIVE = ((lambda v: v > 0), "a number > 0")
PROBABILITY = between(0, 1)

RANGES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "TrainConfig": {
        "epochs": COUNT, "max_steps": COUNT, "batch_size": COUNT, "grad_accum": COUNT, "learning_rate": POSITIVE,
        "weight_decay": NON_NEGATIVE, "adam_beta1": between(0, 1, high_open=True), "adam_beta2": between(0, 1, high_open=True),
        "adam_epsilon": POSITIVE, "warmup_steps": at_least(0), "warmup_ratio": PROBABILITY,
        "max_grad_norm": (NON_NEGATIVE[0], "a number >= 0 (0 or unset: no clipping)"), "logging_steps": COUNT,
        "eval_steps": COUNT, "save_steps": (at_least(0)[0], "an integer >= 0 (0 or unset: no checkpoints)"),
        "save_total_limit": COUNT, "early_stopping_patience": COUNT,
    },
    "DataConfig": {
        "eval_ratio": between(0, 1, high_open=True), "max_examples": COUNT, "max_eval_examples": COUNT,
        "max_prompt_tokens": COUNT, "max_response_tokens": COUNT, "min_response_chars": at_least(0), "num_proc": COUNT,
    },
    "TextMetricsData": {"max_examples": COUNT},
    "DataStatsConfig": {"max_examples": COUNT},
    "PromptSource": {"max_prompts": COUNT},
    "SamplingParams": {
        "max_new_tokens": COUNT, "temperature": NON_NEGATIVE, "top_p": between(0, 1, low_open=True), "top_k": at_least(0),
        "min_p": PROBABILITY, "repetition_penalty": POSITIVE, "n": COUNT, "num_beams": COUNT,
    },
    "VLLMOptions": {"gpu_memory_utilization": between(0, 1, low_open=True), "max_model_len": COUNT},
    "RLVLLMOptions": {"gpu_memory_utilization": between(0, 1, low_open=True), "max_model_len": COUNT},
    "RLParams": {"vllm_is_threshold": (lambda v: v >= 1, "a number >= 1 (the cap C of truncated importance sampling, e.g. 2)"),
                 "dynamic_sampling_rounds": at_least(0)},
    "DPOParams": {
        "beta": POSITIVE, "label_smoothing": between(0, 0.5, high_open=True), "dpop_lambda": NON_NEGATIVE,
        "kl_lambda": NON_NEGATIVE, "clamp_margin": POSITIVE, "beta_warmup_steps": at_least(0),
        "simpo_gamma": NON_NEGATIVE, "desirable_weight": POSITIVE, "undesirable_weight": POSITIVE,
    },
    "RewardConfig": {"concurrency": COUNT, "timeout_s": POSITIVE, "max_retries": at_least(0), "batch_size": COUNT, "max_length": COUNT},
    "ServeRewardConfig": {
        "port": (lambda v: 0 <= v <= 65535, "a port number in [0, 65535]"), "max_connections": COUNT,
        "socket_timeout_s": POSITIVE, "score_timeout_s": POSITIVE,
    },
    "WinRateDuringTraining": {"batch_size": COUNT},
    "GenerateConfig": {"batch_size": COUNT},
    "EvalConfig": {"bootstrap": COUNT, "batch_size": COUNT},
    "TextMetricsConfig": {"batch_size": COUNT},
    "RMConfig": {"max_length": COUNT},
    "DemoConfig": {"steps": COUNT, "dpo_steps": at_least(0)},
    "LoRAConfig": {"r": COUNT, "alpha": POSITIVE, "dropout": between(0, 1, high_open=True)},
    "SFTParams": {
        "length_penalty": NON_NEGATIVE, "length_penalty_every": COUNT, "length_penalty_samples": COUNT,
        "length_penalty_temperature": POSITIVE, "length_penalty_max_new_tokens": COUNT,
    },
}

RANGES["TrainConfig"]["max_tokens_per_batch"] = COUNT

# Metrics each training stage's evaluation produces (train.metric_for_best must be one of them);
# the win-rate callback adds WIN_RATE_METRICS when win_rate.reference is set.
STAGE_METRICS = {
    "SFTConfig": {"eval_loss"},
    "DPOConfig": {"eval_loss", "eval_rewards_chosen", "eval_rewards_rejected", "eval_reward_margin", "eval_reward_accuracy",
                  "eval_logps_chosen", "eval_logps_rejected"},
    "RMConfig": {"eval_loss", "eval_accuracy", "eval_reward_margin", "eval_rewards_chosen", "eval_rewards_rejected"},
}
WIN_RATE_METRICS = {"eval_win_rate", "eval_mean_reward"}

# Stage-level keys naming local files or folders that must exist (Hub ids pass).
STAGE_PATHS = {"EvalConfig": ("model", "reference"), "InitModelConfig": ("model_config", "tokenizer"), "DataStatsConfig": ("tokenizer",),
               "MergeConfig": ("source",)}


def bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def validate(cfg, prefix: str = ""):
    """Check every value of a resolved config (ranges, combinations, paths); return it or raise ConfigError."""
    name = type(cfg).__name__
    ranges = RANGES.get(name, {})
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(key, value, "a finite number")
        if f.name in ranges and value is not None and not ranges[f.name][0](value):
            raise bad(key, value, ranges[f.name][1])
    for check in SECTION_CHECKS.get(name, ()):
        check(cfg, prefix)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate(prefix)
    if not prefix:
        check_stage(cfg)
    return cfg


def looks_local(spec: str) -> bool:
    """A path rather than a Hub id: what the loaders look for on disk only."""
    return spec.startswith((".", "/", "~")) or spec.endswith((".jsonl", ".json", ".parquet"))


DEFERRED: tuple[Path, ...] = ()
"""Folders that an earlier stage of a pipeline will fill: paths in them pass `must_exist` while the
pipeline is planned (see `deferred`), and are checked when their stage starts."""


@contextlib.contextmanager
def deferred(folders):
    global DEFERRED
    saved, DEFERRED = DEFERRED, tuple(Path(os.path.abspath(Path(f).expanduser())) for f in folders)
    try:
        yield
    finally:
        DEFERRED = saved


def must_exist(key: str, spec: str | None, what: str = "file or folder") -> None:
    if spec and looks_local(spec) and not Path(spec).expanduser().exists():
        path = Path(os.path.abspath(Path(spec).expanduser()))
        if not any(path == d or d in path.parents for d in DEFERRED):
            raise ConfigError(f"{key}: {spec!r}: no such {what}")


def check_model(cfg, prefix: str) -> None:
    must_exist(prefix + "name_or_path", cfg.name_or_path, "model folder")
    must_exist(prefix + "tokenizer", cfg.tokenizer, "tokenizer folder")
    template = cfg.chat_template
    if template and "{{" not in template and "{%" not in template and not Path(template).expanduser().is_file():
        raise ConfigError(
            f"{prefix}chat_template: {template!r} is neither a template file nor inline Jinja ('{{{{ ... }}}}' or '{{% ... %}}')"
        )


def check_data(cfg, prefix: str) -> None:
    must_exist(prefix + "dataset", cfg.dataset, "dataset file or folder")
    must_exist(prefix + "eval_dataset", getattr(cfg, "eval_dataset", None), "dataset file or folder")
    for key in ("dataset", "split"):
        if not str(getattr(cfg, key, "x")).strip():
            raise bad(prefix + key, getattr(cfg, key), "a non-empty name")


def check_prompts(cfg, prefix: str) -> None:
    must_exist(prefix + "dataset", cfg.dataset, "dataset file or folder")


def check_sampling(cfg, prefix: str) -> None:
    if cfg.num_beams > 1 and cfg.n > cfg.num_beams:
        raise ConfigError(f"{prefix}n: {cfg.n} is more than {prefix}num_beams {cfg.num_beams}; beam search returns at most num_beams sequences")
    if cfg.n > 1 and cfg.temperature == 0 and cfg.num_beams == 1:
        raise ConfigError(
            f"{prefix}n: {cfg.n} completions per prompt with greedy decoding ({prefix}temperature 0) would be identical; "
            f"set {prefix}temperature > 0 or {prefix}num_beams >= n"
        )


def check_dpo(cfg, prefix: str) -> None:
    if cfg.label_smoothing and cfg.loss_type not in ("sigmoid", "simpo"):
        raise ConfigError(f"{prefix}label_smoothing: {cfg.label_smoothing} applies to loss_type sigmoid and "
                          f"simpo only, not {cfg.loss_type!r}")
    # Options of the DPO losses that SimPO, ORPO and KTO do not have; KTO's weights only KTO has.
    dpo = ("sigmoid", "ipo")
    only = {"dpop_lambda": dpo, "kl_lambda": dpo, "length_normalize": dpo, "clamp_margin": dpo,
            "ref_model": dpo + ("kto",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}
    for key, types in only.items():
        value = getattr(cfg, key)
        default = 1.0 if key.endswith("able_weight") else None
        if value not in (None, False, 0, default) and cfg.loss_type not in types:
            why = " (it needs no reference model)" if cfg.loss_type in ("simpo", "orpo") else ""
            raise ConfigError(f"{prefix}{key}: {value!r} applies to loss_type {' and '.join(types)}, "
                              f"not {cfg.loss_type!r}{why}")
    must_exist(prefix + "ref_model", cfg.ref_model, "model folder")


def check_reward(cfg, prefix: str) -> None:
    if cfg.kind == "hf":
        must_exist(prefix + "model", cfg.model, "reward model folder")
    if cfg.kind == "remote" and not (cfg.base_url and cfg.model):
        raise ConfigError(f"{prefix}base_url and {prefix}model are required for {prefix}kind 'remote'")


def check_train(cfg, prefix: str) -> None:
    if cfg.early_stopping_patience is not None and not cfg.eval_steps:
        raise ConfigError(
            f"{prefix}early_stopping_patience: {cfg.early_stopping_patience} needs evaluations during training; "
            f"set {prefix}eval_steps (and eval data)"
        )


def check_batching(cfg, prefix: str) -> None:
    """train.max_tokens_per_batch / packing / group_by_length combinations (the data checks run at the stage's start)."""
    if cfg.group_by_length and (cfg.packing or cfg.max_tokens_per_batch):
        other = "packing" if cfg.packing else "max_tokens_per_batch"
        raise ConfigError(f"{prefix}group_by_length is for padded batches of batch_size examples; with {prefix}{other} "
                          "micro-batches have no padding to save or are already made by length: set one of them")


TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow"}
"""train.report_to names -> the package each needs."""


def check_report_to(cfg, prefix: str) -> None:
    import importlib.util

    for name in cfg.report_to:
        if name not in TRACKERS:
            raise bad(prefix + "report_to", name, f"one of {', '.join(TRACKERS)}")
        package = TRACKERS[name]
        found = importlib.util.find_spec(package) is not None
        if name == "tensorboard" and not found:  # accelerate writes through torch's SummaryWriter or tensorboardX
            found = importlib.util.find_spec("tensorboardX") is not None
        if not found:
            raise ConfigError(f"{prefix}report_to: {name} needs the {package} package, which is not installed: "
                              f"pip install {package} (or 'alignkit[trackers]')")
    if len(set(cfg.report_to)) != len(cfg.report_to):
        raise ConfigError(f"{prefix}report_to: {cfg.report_to} names a tracker twice")


def check_sft_params(cfg, prefix: str) -> None:
    if cfg.length_penalty > 0 and cfg.length_penalty_samples < 2:
        raise ConfigError(
            f"{prefix}length_penalty_samples: {cfg.length_penalty_samples} with {prefix}length_penalty {cfg.length_penalty}: "
            "the penalty's baseline is the mean of the other samples of the step, so it needs at least 2"
        )


def check_lora(cfg, prefix: str) -> None:
    if cfg.r is not None and not cfg.target_modules:
        raise ConfigError(f"{prefix}target_modules: empty; name the modules that get adapters (e.g. all-linear)")


SECTION_CHECKS: dict[str, tuple[Callable, ...]] = {
    "LoRAConfig": (check_lora,),
    "ModelConfig": (check_model,),
    "DataConfig": (check_data,),
    "TextMetricsData": (check_data,),
    "DataStatsConfig": (check_data,),
    "PromptSource": (check_prompts,),
    "SamplingParams": (check_sampling,),
    "DPOParams": (check_dpo,),
    "RewardConfig": (check_reward,),
    "TrainConfig": (check_train, check_batching, check_report_to),
    "SFTParams": (check_sft_params,),
}


# --------------------------------------------------------------------------- where eval rows come from
# Here, on the ground floor, because both this module's checks (check_stage) and the data loader
# (data.prepare.load_examples) need the one rule, and this module imports nothing of alignkit.

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
"""Local data files: a dataset folder's splits are such files (data.loading.FILE_BUILDERS reads them)."""


def split_names(spec: str) -> list[str] | None:
    """The splits a local dataset has: [] for one file or a saved single Dataset (no splits: every split
    name would give the same rows); None where that cannot be told offline (Hub ids)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return []
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    if (path / "state.json").is_file():
        return []
    return sorted({p.stem for p in path.iterdir() if p.is_file() and p.suffix in DATA_FILE_SUFFIXES})


def no_splits(spec: str, key: str, split: str) -> str:
    return (
        f"data.eval_split '{split}': {key} {spec} is a single file and has no splits. Hold out part of the "
        "training rows with data.eval_ratio, or give a separate eval file as data.eval_dataset"
    )


def eval_origin(cfg: DataConfig, default_eval_split: str | None = None):
    """('dataset', spec, split) or ('ratio',) for where eval rows come from; a str says why there are none
    (worth a log line); None when no evaluation was asked for."""
    asked_split = cfg.eval_split if cfg.eval_split and cfg.eval_split != default_eval_split else None
    if not 0 <= cfg.eval_ratio < 1:
        raise ConfigError(f"data.eval_ratio must be at least 0 and below 1, got {cfg.eval_ratio}")
    if cfg.eval_dataset:
        if cfg.eval_ratio > 0:
            raise ConfigError("data.eval_dataset and data.eval_ratio are both set: choose one source of eval "
                              "rows")
        names = split_names(cfg.eval_dataset)
        if names == []:  # one file: all of it
            if asked_split:
                raise ConfigError(no_splits(cfg.eval_dataset, "data.eval_dataset", asked_split))
            return ("dataset", cfg.eval_dataset, "train")
        split = cfg.eval_split
        if names and len(names) == 1 and (split is None or (split not in names and not asked_split)):
            split = names[0]  # the eval dataset's only split
        if not split:
            has = f"has the splits {', '.join(names)}" if names else "is not a local file"
            raise ConfigError(f"data.eval_dataset {cfg.eval_dataset} {has}: set data.eval_split to choose one")
        return ("dataset", cfg.eval_dataset, split)
    if cfg.eval_ratio > 0:
        if asked_split:
            raise ConfigError(
                f"data.eval_split '{asked_split}' and data.eval_ratio {cfg.eval_ratio} are both set: "
                "choose one source of eval rows"
            )
        return ("ratio",)
    if not cfg.eval_split:
        return None
    names = split_names(cfg.dataset)
    if names == []:
        if asked_split:
            raise ConfigError(no_splits(cfg.dataset, "data.dataset", asked_split))
        return (
            f"{cfg.dataset} is a single file, so the default eval split '{cfg.eval_split}' does not apply; "
            "set data.eval_ratio or data.eval_dataset to evaluate"
        )
    if names is not None and cfg.eval_split not in names and not asked_split:
        return (f"{cfg.dataset} has no split '{cfg.eval_split}' (has {', '.join(names)}); set data.eval_split, "
                "data.eval_ratio or data.eval_dataset to evaluate")
    return ("dataset", cfg.dataset, cfg.eval_split)


def check_stage(cfg) -> None:
    """Combinations across sections of a whole stage config."""
    name = type(cfg).__name__
    for key in STAGE_PATHS.get(name, ()):  # e.g. eval: responses files must exist before model A is generated
        must_exist(key, getattr(cfg, key), "file or folder")
    for k, spec in enumerate(getattr(cfg, "matrix", None) or []):
        must_exist(f"matrix[{k}]", spec, "responses file or model folder")
    win_rate = getattr(cfg, "win_rate", None)
    if win_rate is not None and win_rate.reference:
        must_exist("win_rate.reference", win_rate.reference, "responses file or model folder")
    scored = name in ("EvalConfig", "ServeRewardConfig") or (win_rate is not None and win_rate.reference)
    reward = win_rate.reward if win_rate is not None else getattr(cfg, "reward", None)
    if scored and reward.kind == "hf" and not reward.model:
        where = "win_rate.reward" if win_rate is not None else "reward"
        raise ConfigError(f"{where}.model is required for {where}.kind 'hf' (a reward model folder or Hub id)")
    model = getattr(cfg, "model", None)
    if isinstance(model, ModelConfig) and model.lora.r is not None and not isinstance(getattr(cfg, "train", None), TrainConfig):
        raise ConfigError(f"model.lora.r: {model.lora.r}: LoRA applies to the training stages (sft, dpo, rm, rl); "
                          "this stage loads a model (an adapter folder loads as base + adapter); unset it")
    train, data = getattr(cfg, "train", None), getattr(cfg, "data", None)
    if not isinstance(train, TrainConfig) or not isinstance(data, DataConfig):
        return
    where = eval_origin(data, type(cfg)().data.eval_split)  # data settings that cannot work raise here
    if not isinstance(where, tuple):
        for key in ("eval_steps", "early_stopping_patience"):
            if getattr(train, key) is not None:
                why = where or "no data.eval_split, data.eval_ratio or data.eval_dataset is set"
                raise ConfigError(f"train.{key}: {getattr(train, key)} needs eval data, and there is none: {why}")
    produced = set(STAGE_METRICS.get(name, ()))
    if produced and win_rate is not None and win_rate.reference:
        produced |= WIN_RATE_METRICS
    if produced and train.metric_for_best not in produced:
        raise ConfigError(
            f"train.metric_for_best: {train.metric_for_best!r} is not a metric this stage evaluates; "
            f"expected one of {', '.join(sorted(produced))}"
        )


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
