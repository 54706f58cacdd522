"""Atomic, resumable checkpoints: `checkpoints/step-N/` is either complete or absent.

A checkpoint is written under a temporary name and renamed into place as its last act, so a
crash mid-write leaves only a `.tmp-*` folder that resume ignores (and the next save removes).
Each checkpoint is also a loadable Hugging Face model directory.

Every `.pt` file is read with `torch.load(..., weights_only=True)`: a checkpoint from someone else
can hold tensors, numbers and strings, never code that runs on load. The RNG state is therefore
stored as plain values (python's state as ints, numpy's key as a tensor); RNG files written by
older versions (numpy arrays inside) are read through an allowlist of numpy's array types only.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely or does not fit the run."""


RNG_FORMAT = 2  # 2: plain values only (loadable with weights_only=True); 1 (no "format" key): pickled numpy state


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors, ints and floats only."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "format": RNG_FORMAT,
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss or None)
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        key = np_state["key"].numpy().astype(np.uint32)
        np_state = {
            "bit_generator": "MT19937",
            "state": {"key": key, "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: Path, allow_numpy: bool = False):
    """torch.load with weights_only=True: tensors and plain values, never arbitrary objects.

    `allow_numpy` admits numpy arrays (only their reconstruction functions and dtypes), which
    RNG files from before RNG_FORMAT 2 hold.
    """
    allowed = numpy_globals() if allow_numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        why = f"it names {named.group(1)}" if named else "not a tensor file alignkit wrote"
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values ({why}) "
            "and was not loaded: unpickling it could run code. Resume only from checkpoints alignkit wrote; "
            "to start afresh, use a new output_dir."
        ) from None


def numpy_globals() -> list:
    """What a pickled np.random.get_state() needs: numpy's array rebuild function, ndarray and dtypes."""
    core = np._core if hasattr(np, "_core") else np.core
    rebuild = core.multiarray._reconstruct
    # Files written under numpy 1.x name the function numpy.core.multiarray._reconstruct.
    return [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype("uint32"))]


def load_rng_state(path: Path) -> dict:
    return safe_load(path, allow_numpy=True)


def load_weights(model, directory: Path) -> None:
    """Load safetensors weights written by save_pretrained into an existing model, exactly
    (an adapter checkpoint into the same peft model: its adapter weights)."""
    if (directory / "adapter_config.json").is_file():
        from ..models import load_adapter_weights

        return load_adapter_weights(model, directory)
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


# --------------------------------------------------------------------------- sharded (FSDP) runs
# Under FSDP each process holds a shard of every parameter and of the optimizer state (DTensors).
# Checkpoints stay full and process-count independent: weights are gathered into one state dict
# (written by the main process as an ordinary HF model directory, like final/), and the optimizer
# state is gathered into torch.distributed.checkpoint's full format (keyed by parameter name), which
# every process reads whole on resume and cuts to its own shard. The gathers are collectives: every
# process must call these functions, in the same order.


def is_sharded(accelerator) -> bool:
    """Whether the run's model is sharded by FSDP (accelerate's FSDP, version 1 or 2)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gathered_weights(accelerator, model) -> dict | None:
    """Under FSDP, the full weights (CPU tensors) on the main process ({} elsewhere); otherwise None
    (the model's own parameters are whole). Every process must call it."""
    if not is_sharded(accelerator):
        return None
    # Not accelerator.get_state_dict: with accelerate 1.16 and torch 2.13 its FSDP2 options
    # (broadcast_from_rank0 with cpu_offload) return the DTensor shards, not full tensors.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=full_state_options(cpu_offload=True))


def gathered_optimizer_state(accelerator, model, optimizer) -> dict:
    """The optimizer's state to save: torch's own format, or under FSDP the full state gathered
    (keyed by parameter name; on the main process, {} elsewhere). Every process must call it."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=full_state_options(cpu_offload=True))


def load_optimizer_state(accelerator, model, optimizer, state: dict, path: Path) -> None:
    """Restore what `gathered_optimizer_state` saved (each process reads the whole file)."""
    by_name = any(isinstance(k, str) for k in state.get("state", {})) or any(
        isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))
    if not by_name:
        if is_sharded(accelerator):
            raise CheckpointError(f"{path} was written by a run without FSDP (optimizer state by parameter index); "
                                  "resume it without FSDP, or start the FSDP run afresh")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state, options=full_state_options())


def load_weights_into(accelerator, model, directory: Path) -> None:
    """`load_weights` into a prepared model, also an FSDP-sharded one (each process reads the whole
    checkpoint and keeps its shard). Every process must call it."""
    if not is_sharded(accelerator):
        load_weights(accelerator.unwrap_model(model), directory)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise FileNotFoundError(f"no safetensors weights in {directory}")
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    tied = tied_names(model)
    for name, source in tied.items():  # a tied matrix is saved once; every name of it gets the tensor
        if name not in state and source in state:
            state[name] = state[source]
    unexpected = sorted(set(state) - names - set(tied))
    missing = sorted(n for n, _ in model.named_parameters() if n not in state)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_model_state_dict(model, {k: v for k, v in state.items() if k in names}, options=full_state_options(strict=False))


def tied_names(model) -> dict[str, str]:
    """Parameter name -> the first name of the same tensor (tied weights such as lm_head = embed_tokens)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return {k: v for k, v in out.items() if k != v}


@contextmanager
def saving_full_weights(model, weights: dict | None):
    """While open, `model.save_pretrained(...)` writes `weights` (a gathered full state dict) instead of
    the model's own (sharded) tensors, so any save function (alignkit's `save_model`, a stage's own)
    writes a whole HF model. Nothing changes when `weights` is None."""
    if weights is None:
        yield
        return
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, state_dict=weights)
    try:
        yield
    finally:
        del model.save_pretrained
