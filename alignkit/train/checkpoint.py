"""Atomic, resumable checkpoints: `checkpoints/step-N/` is either complete or absent.

A checkpoint is written under a temporary name and renamed into place as its last act, so a
crash mid-write leaves only a `.tmp-*` folder that resume ignores (and the next save removes).
Each checkpoint is also a loadable Hugging Face model directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step}"


def clear_stale(root: Path) -> None:
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written folder visible under its final name in one rename."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int | None, protect: set[int]) -> None:
    if keep_last is None:
        return
    found = list_checkpoints(root)
    for step, path in found[: max(0, len(found) - keep_last)]:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model, directory: Path) -> None:
    """Load safetensors weights written by save_pretrained into an existing model, exactly."""
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. lm_head = embed_tokens) are saved once; they are fine to be "missing".
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters())
    really_missing = [k for k in missing if k in params and params[k].data_ptr() not in loaded]
    if really_missing or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {really_missing[:5]}, unexpected {unexpected[:5]}")


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE_FILE).read_text())
