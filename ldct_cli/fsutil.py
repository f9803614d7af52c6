"""Filesystem helpers: atomic writes, path containment, safe names."""

from __future__ import annotations

import os
import re
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
    # Hidden, and unique per process: no reader mistakes it for output, no writer collides.
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
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
