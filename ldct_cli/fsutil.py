"""Filesystem helpers: atomic writes, path containment, safe names."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is renamed onto ``final``.

    A crash or an exception leaves no half-written ``final``: readers see the old file
    or the complete new one, never a partial one.
    """
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_within(path: Path, parent: Path) -> bool:
    """True when ``path`` is ``parent`` or lies inside it (both resolved)."""
    path, parent = path.resolve(), parent.resolve()
    return path == parent or parent in path.parents


def safe_name(text: str, *, max_len: int = 48, fallback: str = "x") -> str:
    """A file-name component made of [A-Za-z0-9._-] only: no tag value can escape a folder."""
    name = _UNSAFE.sub("_", text).strip("._-")[:max_len].strip("._-")
    return name or fallback
