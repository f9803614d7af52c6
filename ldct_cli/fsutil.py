"""Filesystem helpers: atomic writes, path containment, safe names."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Hidden folders where a series is written before it is renamed into place.
STAGING_PREFIX = ".ldct-partial-"


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


@contextmanager
def staged_folder(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; on success it becomes ``final``.

    On an exception (or Ctrl-C) the folder is removed: a half-written series never
    appears under its real name. With ``overwrite`` an existing ``final`` is replaced
    only once the new one is complete.
    """
    staging = final.with_name(STAGING_PREFIX + final.name)
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
        if final.exists() and overwrite:
            trash = final.with_name(STAGING_PREFIX + "old-" + final.name)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
