"""alignkit: post-train small language models to follow instructions, and measure the result."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"


SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".jinja", ".txt")
"""What the package is made of (code and package data such as demo/pipeline.yaml); not caches, nor an
editor's swap or backup files, whose coming and going would make every pipeline stage rerun."""


def source_digest(root: Path) -> str:
    """A digest of the package's files under `root` (SOURCE_SUFFIXES, not hidden, not in __pycache__),
    by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
                       and not any(part.startswith(".") or part == "__pycache__"
                                   for part in p.relative_to(root).parts)):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`__version__` and the digest of this package's files, e.g. "0.1.0+3f9c2a1b7d04". Pipelines,
    reports and verifier score caches record it as the alignkit that made a result, so a checkout
    changed by a pull or a local edit (the version string stays the same) never passes for the one
    that ran. About 1 MB read once per process."""
    return f"{__version__}+{source_digest(Path(__file__).resolve().parent)}"
