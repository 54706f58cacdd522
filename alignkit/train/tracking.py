"""Experiment trackers (`train.report_to`) through accelerate's tracker API.

The loop builds its Accelerator with `accelerator_kwargs` (log_with, and a project folder:
tensorboard writes under <output_dir>/tracking), calls `start` once the run may start
(init_trackers with the resolved config as flat dotted keys, secrets left out), `log` with every
record it writes to metrics.jsonl (its numbers; the record's step as the step), and `end` at the end
(end_training). Which packages exist is checked when the config is validated (config.check_report_to),
so a missing tracker fails at start, not at the first log call.

Simplified: a resumed run logs the steps after its checkpoint again (metrics.jsonl drops them; a tracker
keeps both); each tracker reads its own settings (project, entity, URI, key) from its environment
variables; only the main process logs.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)


def accelerator_kwargs(report_to: list[str], output_dir: Path) -> dict:
    """Arguments of Accelerator(...) that attach the trackers (none when report_to is empty)."""
    if not report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(report_to),
            "project_config": ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "tracking"))}


def public_config(values: dict, environ=None, prefix: str = "") -> dict:
    """The config as flat dotted keys with scalar values (lists and None as text), for a tracker's hparams.

    Secrets never go in: alignkit's configs hold only the *names* of environment variables that carry
    keys, but any value equal to the value of such a variable (one whose name says KEY, TOKEN, SECRET,
    PASSWORD or CREDENTIAL) is replaced by "<redacted>", in case a key was pasted into a field.
    """
    environ = os.environ if environ is None else environ
    secrets = {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
    out: dict = {}
    for k, v in values.items():
        key = prefix + str(k)
        if isinstance(v, dict):
            out.update(public_config(v, environ, key + "."))
            continue
        if isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v))
        elif v is None:
            v = "none"
        if isinstance(v, str) and any(s in v for s in secrets):
            v = "<redacted>"
        out[key] = v
    return out


def start(accelerator, report_to: list[str], config, output_dir: Path) -> None:
    """init_trackers with the run's resolved config (a stage config dataclass, or None)."""
    if not report_to:
        return
    from .. import config as config_lib

    values = public_config(config_lib.to_dict(config)) if config is not None else {}
    accelerator.init_trackers(Path(output_dir).name or "alignkit", config=values)


def numbers(record: dict) -> dict:
    """The finite numbers of a metrics.jsonl record (what a tracker can plot), without its step."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def log(accelerator, report_to: list[str], record: dict) -> None:
    if not report_to:
        return
    accelerator.log(numbers(record), step=int(record["step"]))
    for tracker in accelerator.trackers:  # write through now, so a killed run keeps what it logged
        flush = getattr(getattr(tracker, "writer", None), "flush", None)
        if callable(flush):
            flush()


def end(accelerator, report_to: list[str]) -> None:
    if report_to:
        accelerator.end_training()
