"""Writing into folders that may have come from elsewhere (a downloaded run folder, a shipped stage).

`write_atomic` writes a file through a fresh temporary file in the same folder (created with
O_EXCL, so a planted `name.tmp` link is never followed) and `os.replace`, which replaces a link at
the target instead of writing through it. `refuse_links` stops before a folder with a symbolic link
anywhere inside it is resumed or written into. Simplification: a link is refused, never resolved;
the check and the writes are not one atomic step (another local process could plant a link between
them; a shipped folder cannot).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file and os.replace; never follows a link at `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def find_link(folder: str | Path, limit: int = 100_000) -> Path | None:
    """The first symbolic link at or inside `folder` (the walk never follows one), else None. A folder
    with more than `limit` entries is not walked to the end: ConfigError (it cannot be vouched for)."""
    folder = Path(folder)
    if folder.is_symlink():
        return folder
    if not folder.is_dir():
        return None
    seen = 0
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            seen += 1
            if os.path.islink(os.path.join(top, name)):
                return Path(top) / name
        if seen > limit:
            raise ConfigError(f"{folder}: more than {limit} entries; too many to check for symbolic links")
    return None


def refuse_links(folder: str | Path, what: str) -> None:
    """ConfigError when `folder` is, or holds, a symbolic link: a shipped folder could point an
    output at a file outside it (report.md -> ~/.bashrc)."""
    link = find_link(folder)
    if link is not None:
        raise ConfigError(f"{what}: {link} is a symbolic link (to {os.readlink(link)!r}); alignkit "
                          "never writes through links in a run folder. Remove it, or delete the folder")
