"""`alignkit <stage> [--config recipe.yaml] [--dotted.key value ...]`.

Thin, the top of the import graph: every stage is a config dataclass plus a `run_<stage>(config)`
function, listed in alignkit.stages; this module adds the two stages that run the pipeline (`run`,
`demo`), which the table below the pipeline cannot hold. Options are generated from the dataclass,
so `--help` always lists every field with its default.

Powers only the command line grants (`--allow-python-verifier`, `--trust-remote-code`,
`--allow-insecure-http`, `--allow-key NAME=HOST`) are accepted by every stage, `alignkit run` included
(its stages get them); a recipe, a pipeline file or a --var cannot grant them (config.enforce_trust).

Exit status: 0 done; 2 a user error (bad option, config value, data file, missing path), printed as
one message without a traceback (`--debug` adds it); 130 interrupted; anything unexpected raises
with its traceback (status 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import typing
from dataclasses import dataclass

from . import config as config_lib
from . import stages as stage_table
from .config import ConfigError, Grants, leaf_fields, suggest
from .demo import run as demo
from .markdown import terminal_safe
from .pipeline import RunConfig, run_pipeline
from .stages import Stage
from .train.loop import check_launch


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    steps: int = 1200
    """SFT optimizer steps."""
    dpo_steps: int = 200
    """DPO optimizer steps after SFT."""
    rl_steps: int = 80
    """RL optimizer steps from the SFT model (each RL stage: RLOO against the verifier and against the
    reward model; with --full, GRPO against the verifier)."""
    rm_steps: int = 300
    """Reward model optimizer steps (from the SFT model, on the demo's preference pairs)."""
    seed: int = 0
    """Seed of the model's initialisation and of training (the toy data stay the same)."""
    full: bool = False
    """Also run the stages left out by default for time: GRPO, one self-improvement round (pairs from
    the SFT model's own samples, then DPO), best-of-N and self-refinement of the RLOO model."""
    quiet: bool = False


def run_demo(cfg: DemoConfig):
    return demo.run_demo(cfg.output_dir, cfg.steps, cfg.dpo_steps, cfg.quiet, cfg.seed, cfg.rl_steps,
                         cfg.rm_steps, cfg.full)


def all_stages() -> dict[str, Stage]:
    """The stage table (alignkit.stages) with the two stages that run the pipeline, which only the top
    of the import graph may add: `demo` first and `run` after `report`, the order --help lists."""
    table = {"demo": Stage(DemoConfig, run_demo, "offline toy pipeline on CPU: tokenizer, tiny model, data, "
                           "SFT, DPO, RLOO, reward model, RLOO against it, win rates, report")}
    for name, stage in stage_table.STAGES.items():
        table[name] = stage
        if name == "report":
            table["run"] = Stage(RunConfig, run_pipeline, "run a pipeline file of stages into one run "
                                 "directory; a rerun does only what changed", positional="pipeline")
    return table


STAGES = all_stages()
"""Every stage `alignkit <stage>` accepts."""


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is list:
        return "A,B,..."
    if args and origin is not None:
        return type_name(args[0])
    return getattr(tp, "__name__", str(tp)).upper()


GRANT_FLAGS = {
    "allow_python_verifier": "let reward.rule name a Python function ('module:function'), imported and run",
    "trust_remote_code": "run the code shipped with a model or tokenizer (every model the command loads)",
    "allow_insecure_http": "let an API key go over plain http beyond loopback (and through an http_proxy)",
}
"""Switches of the trust boundary: each turns on every config field of that name (config.POWERS)."""


def add_grant_flags(parser: argparse.ArgumentParser) -> None:
    hosts = "; ".join(f"{k} -> {', '.join(v)}" for k, v in config_lib.KEY_HOSTS.items())
    group = parser.add_argument_group("powers only the command line grants", textwrap.fill(
        "A recipe, a pipeline file or a --var cannot set these; `alignkit run` passes them to every stage. "
        f"A key goes without --allow-key only to its own service over https: {hosts}.", 78))
    for key, doc in GRANT_FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), dest="grant." + key, nargs="?", const="true",
                           default=argparse.SUPPRESS, metavar="BOOL", help=doc)
    group.add_argument("--allow-key", dest="grant.keys", action="append", default=argparse.SUPPRESS,
                       metavar="NAME=HOST[:PORT]", help="let the key in environment variable NAME go to HOST "
                       "(exact host name; any port unless given); repeat for more keys or hosts")


def pop_grants(values: dict) -> Grants:
    """The grant flags out of parsed values (as a Grants)."""
    flags = {k.split(".", 1)[1]: values.pop(k) for k in list(values) if k.startswith("grant.")}
    keys = tuple(config_lib.parse_key_grant(item) for item in flags.pop("keys", ()))
    switches = {k: config_lib.coerce(v, bool, "--" + k.replace("_", "-")) for k, v in flags.items()}
    return Grants(**switches, keys=keys)


def build_parser(name: str, stage: Stage) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"alignkit {name}",
        description=stage.help + ". Values come from the defaults, then --config, then these options. "
        "--debug prints the traceback of an error.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"alignkit {name} {stage.positional.upper()} [options]" if stage.positional else None,
    )
    parser.add_argument("--config", help="YAML recipe", metavar="RECIPE.yaml")
    for key, (tp, default, doc) in leaf_fields(stage.config).items():
        if key in GRANT_FLAGS:
            continue  # a top-level power (init-model's trust_remote_code) is the grant flag itself
        flag = key[:-1] if key.endswith("_") else key  # from_ (a Python keyword) is --from
        flags = ["--" + flag.replace("_", "-")] + (["--" + flag] if "_" in flag else [])
        kwargs = dict(dest=key, default=argparse.SUPPRESS, help=f"{doc} (default: {default})".lstrip())
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+", action="extend", metavar="VALUE")  # --var a=1 --var b=2 keeps both
        else:
            kwargs.update(metavar=type_name(tp))
        parser.add_argument(*flags, **kwargs)
    add_grant_flags(parser)
    return parser


BOOL_WORDS = {"true", "yes", "1", "on", "false", "no", "0", "off"}


def positional_after_switch(stage: Stage, argv: list[str]) -> tuple[dict, list[str]]:
    """`alignkit run --dry-run PIPELINE.yaml`: a bool switch takes an optional value, so the positional
    argument after it would be read as that value; a word that is not a bool is the positional one."""
    flags = [k.rstrip("_") for k, (tp, _, _) in leaf_fields(stage.config).items() if tp is bool]
    switches = {"--" + k.replace("_", "-") for k in flags} | {"--" + k for k in flags}
    switches |= {"--" + k.replace("_", "-") for k in GRANT_FLAGS}
    for i, item in enumerate(argv[1:], 1):
        if argv[i - 1] in switches and not item.startswith("-") and item.lower() not in BOOL_WORDS:
            return {stage.positional: item}, argv[:i] + argv[i + 1:]
    return {}, argv


def parse(name: str, argv: list[str]):
    """The stage's config from the command line (with its grants applied)."""
    return parse_with_grants(name, argv)[0]


def parse_with_grants(name: str, argv: list[str]):
    """(config, Grants): the grants are in force while the config is built and must be while it runs."""
    stage = STAGES[name]
    first = {}
    if stage.positional and argv and not argv[0].startswith("-"):
        first, argv = {stage.positional: argv[0]}, argv[1:]
    elif stage.positional:
        first, argv = positional_after_switch(stage, argv)
    parser = build_parser(name, stage)
    args, unknown = parser.parse_known_args(argv)
    values = vars(args) | first
    grants = pop_grants(values)
    path = values.pop("config", None)
    extra_overrides = []
    for item in unknown:
        if item.startswith("-"):
            key = item.lstrip("-").split("=", 1)[0].replace("-", "_")
            raise ConfigError(f"unknown option '{item}'{suggest(key, sorted(leaf_fields(stage.config)))}")
        if name == "init-model" and "=" in item:
            extra_overrides.append(item)
        elif stage.positional and stage.positional not in values:
            values[stage.positional] = item  # e.g. alignkit run --dry-run true PIPELINE.yaml
        else:
            raise ConfigError(f"unexpected argument '{item}'")
    with config_lib.granted(grants):
        if extra_overrides:
            # Trailing key=value pairs add to the recipe's (or --overrides') list; later ones win on a key.
            base = values["overrides"] if "overrides" in values else \
                config_lib.load(stage.config, path, values).overrides
            values["overrides"] = list(base) + extra_overrides
        return config_lib.load(stage.config, path, values), grants


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    top = argparse.ArgumentParser(
        prog="alignkit",
        description="Post-train small language models and measure the result. Add --debug to any stage to "
        "see the traceback of a user error (bad option or data), which is otherwise one message with exit "
        "status 2.",
    )
    top.add_argument("--version", action="store_true",
                     help="print alignkit's version and the digest of its code (what pipelines record)")
    sub = top.add_subparsers(dest="stage", metavar="STAGE")
    for name, stage in STAGES.items():
        sub.add_parser(name, help=stage.help, add_help=False)
    if argv == ["--version"]:
        from . import code_version

        print(f"alignkit {code_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        if argv and argv[0] not in ("-h", "--help"):
            close = suggest(argv[0], list(STAGES))
            print(f"alignkit: unknown stage '{argv[0]}'{close}\n", file=sys.stderr)
            top.print_help(sys.stderr)
            return 2
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if "-h" in rest or "--help" in rest:
        build_parser(name, STAGES[name]).print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_third_party()
    try:
        check_launch(os.environ)
        cfg, grants = parse_with_grants(name, rest)
        with config_lib.granted(grants):  # `alignkit run` reads its stages' files under them
            result = STAGES[name].run(cfg)
        close_process_group(barrier=True)
    except KeyboardInterrupt:
        again = "run the same command again" if name == "run" else "run again with --resume"
        print(f"alignkit: interrupted; {again} to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # known user-facing errors get one clear message, the rest a traceback
        if not is_user_error(e):
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(terminal_safe(f"alignkit {name}: error: {e}"), file=sys.stderr)  # messages may quote a server
        return 2
    finally:
        close_process_group(barrier=False)
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        print(result)
    return 0


def close_process_group(barrier: bool) -> None:
    """Destroy the process group (under torchrun / accelerate launch) before the interpreter exits.

    Without this, Gloo's worker threads can outlive the interpreter and abort the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded.
    """
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and no torch import)
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


# Errors whose message says everything a user needs (these classes and their subclasses, e.g. every
# OSError: a missing input, a full disk, a refused connection); anything else keeps its traceback.
USER_ERRORS = {"ConfigError", "DataError", "TemplateError", "TrainingDiverged", "StepFailed", "OSError",
               "RemoteError", "CheckpointError"}


def is_user_error(e: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS for c in type(e).__mro__)


def quiet_third_party() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_warning()


if __name__ == "__main__":
    sys.exit(main())
