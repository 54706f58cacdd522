"""Load rows from a Hugging Face dataset id or local files, through `datasets`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Source:
    """Where rows came from, for error messages: 'file.jsonl' or 'org/name[split]'."""

    name: str
    is_file: bool

    def where(self, row: int) -> str:
        # JSONL files get line numbers (1-based) so users can jump to them; other sources get row indices.
        if self.is_file and self.name.endswith(".jsonl"):
            return f"{self.name}, line {row + 1}"
        return f"{self.name}, row {row}"


def resolve_local(spec: str, split: str) -> Path | None:
    """A local file, or the `{split}.jsonl|json|parquet` file inside a local folder."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for ext in FILE_BUILDERS:
            candidate = path / f"{split}{ext}"
            if candidate.is_file():
                return candidate
    return None


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
    return sorted({p.stem for p in path.iterdir() if p.is_file() and p.suffix in FILE_BUILDERS})


def load_rows(spec: str, split: str = "train", subset: str | None = None) -> tuple[datasets.Dataset, Source]:
    """Load one split of a dataset: local file, folder of split files, saved dataset, or Hub id."""
    local = resolve_local(spec, split)
    if local is not None:
        builder = FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise ValueError(f"{local}: unsupported file type (expected {', '.join(FILE_BUILDERS)})")
        ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        return ds, Source(str(local), True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path}: no split '{split}' (has {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded, Source(f"{path}[{split}]", False)
        files = sorted(p.name for p in path.iterdir() if p.suffix in FILE_BUILDERS)
        raise ValueError(
            f"{path}: no file for split '{split}' (expected {split}.jsonl, .json or .parquet; found {', '.join(files) or 'none'})"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(tuple(FILE_BUILDERS)):
        raise FileNotFoundError(f"dataset not found: {spec}")
    ds = datasets.load_dataset(spec, subset, split=split)
    return ds, Source(f"{spec}[{split}]", False)
