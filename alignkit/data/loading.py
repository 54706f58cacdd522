"""Load rows from a Hugging Face dataset id or local files, through `datasets`.

Local files go through one front door (`check_file`) before `datasets` sees them, so every parse
failure is reported as "file, line N: what is wrong" (malformed JSON, a JSON array where JSON Lines
are expected, binary data, a byte that is not UTF-8, a Parquet column of the wrong type) and an
empty file as such, instead of a pyarrow traceback. Simplification: a local file is parsed twice
(once here, once by `datasets`, which caches it); the check is linear in the file's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..config import split_names  # noqa: F401  (kept here for its users; config.eval_origin needs it)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Local file suffix -> `datasets` builder (its keys are config.DATA_FILE_SUFFIXES)."""


class DataError(ValueError):
    """Invalid data, reported with source, line or row and field before any training starts."""


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


def load_rows(spec: str, split: str = "train", subset: str | None = None) -> tuple[datasets.Dataset, Source]:
    """Load one split of a dataset: local file, folder of split files, saved dataset, or Hub id."""
    local = resolve_local(spec, split)
    if local is not None:
        builder = FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise DataError(f"{local}: unsupported file type '{local.suffix}' (expected {', '.join(FILE_BUILDERS)})")
        check_file(local)
        try:
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:  # what check_file did not foresee: still one line that names the file
            raise DataError(f"{local}: cannot be read as a table: {first_line(e)}") from e
        return ds, Source(str(local), True)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split '{split}' (has {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded, Source(f"{path}[{split}]", False)
        files = sorted(p.name for p in path.iterdir() if p.suffix in FILE_BUILDERS)
        raise DataError(
            f"{path}: no file for split '{split}' (expected {split}.jsonl, .json or .parquet; found {', '.join(files) or 'none'})"
        )
    if spec.startswith((".", "/", "~")) or spec.endswith(tuple(FILE_BUILDERS)):
        raise FileNotFoundError(f"dataset not found: {spec}")
    try:
        ds = datasets.load_dataset(spec, subset, split=split)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ConnectionError) as e:
        raise DataError(f"dataset '{spec}' (split {split}): cannot be loaded: {first_line(e)}") from e
    except ValueError as e:  # e.g. an unknown split or subset
        raise DataError(f"dataset '{spec}' (split {split}, subset {subset}): {first_line(e)}") from e
    return ds, Source(f"{spec}[{split}]", False)


# --------------------------------------------------------------------------- the front door for local files


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_file(path: Path) -> None:
    """Raise DataError naming the file (and line) if `path` cannot give rows; return quietly if it can."""
    if path.suffix == ".parquet":
        return check_parquet(path)
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: empty file (0 rows)")
    if b"\0" in data[:65536]:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: binary data (a NUL byte), not JSON text")
    lines = data.split(b"\n")
    texts = []
    for i, raw in enumerate(lines):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}, line {i + 1}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8; "
                "save the file as UTF-8"
            ) from None
    text = "\n".join(texts).lstrip("\ufeff")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return check_json_array(path, text)
    check_json_lines(path, text.split("\n"))


def check_json_array(path: Path, text: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not value:
        raise DataError(f"{path}: an empty JSON array (0 rows)")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}, item {i}: expected a JSON object per row, got {json_kind(item)}")


def check_json_lines(path: Path, lines: list[str]) -> None:
    jsonl = path.suffix == ".jsonl"
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if i == 0 and line.lstrip().startswith(("[", "{")) and e.msg.startswith(("Expecting", "Unterminated")):
                hint = "; JSON Lines need one whole object per line (a JSON array belongs in a .json file)"
            raise DataError(f"{path}, line {i + 1}: not valid JSON: {e.msg} (column {e.colno}){hint}") from None
        if isinstance(value, list) and jsonl:
            raise DataError(
                f"{path}, line {i + 1}: a JSON array, but JSON Lines (.jsonl) need one object per line; "
                "write one object per line, or save the array as a .json file"
            )
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {i + 1}: expected a JSON object per line, got {json_kind(value)}")


def json_kind(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


# Columns whose type the schema fixes: a column of another type cannot give valid rows.
MESSAGE_COLUMNS = {"messages"}
TEXT_OR_MESSAGES = {"prompt", "completion", "chosen", "rejected"}


def check_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    if rows == 0:
        raise DataError(f"{path}: no rows (0 rows)")

    def is_messages(t) -> bool:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)

    def is_text(t) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    for f in schema:
        if f.name in MESSAGE_COLUMNS and not is_messages(f.type):
            raise DataError(f"{path}, column '{f.name}': type {f.type}; expected a list of {{role, content}} messages")
        if f.name in TEXT_OR_MESSAGES and not (is_text(f.type) or is_messages(f.type)):
            raise DataError(f"{path}, column '{f.name}': type {f.type}; expected a string or a list of messages")
        if f.name == "text" and not is_text(f.type):
            raise DataError(f"{path}, column 'text': type {f.type}; expected a string")
