"""Filesystem helpers: atomic writes, path containment, safe names."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# Hidden folders where a series is written before it is renamed into place.
STAGING_PREFIX = ".ldct-partial-"
# In an output (or staging) folder: which input slices its files were made from and, once
# published, which input files could not be used. A folder holding it is never complete.
INCOMPLETE_MARKER = ".ldct-incomplete.json"


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


class FolderBusy(OSError):
    """Another process holds the staging folder of this output (a concurrent run)."""


class AlreadyComplete(Exception):
    """``final`` was found complete once the lock was held (another run just finished it)."""


def _lock_folder(folder: Path):
    """An exclusive, non-blocking lock on ``folder`` (flock on its descriptor; released when
    the descriptor is closed, and by the kernel when the process dies). None where the
    platform has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, as before
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{folder}: another ldct run is writing this series now; rerun when it has "
                         "finished") from None
    return fd


@contextmanager
def staged_folder(final: Path, *, overwrite: bool = False, resume: bool = False,
                  n_files: int | None = None) -> Iterator[Path]:
    """Yield the hidden staging folder of ``final``, locked; on success it becomes ``final``.

    The staging folder is named after ``final`` and locked for as long as this runs, so a
    second run into the same OUT gets ``FolderBusy`` instead of clearing the first one's
    work. Without ``resume`` it starts empty and is removed on any exception. With
    ``resume``, what a stopped run (Ctrl-C, SIGTERM, kill -9) left in it is kept: each file
    in it was written atomically, so the caller may resume by skipping the files present;
    an incomplete ``final`` (slices deleted by hand) is moved back into staging the same
    way (``n_files``: how many slice files a complete one holds; when it holds them all,
    ``AlreadyComplete`` is raised before anything moves). With ``overwrite`` staging starts
    empty and an existing ``final`` is replaced only once the new one is complete. On any
    other exception staging is removed. ``INCOMPLETE_MARKER`` is the caller's: it is kept,
    and moved with an incomplete ``final``, and a ``final`` holding it is never complete.
    """
    staging = final.with_name(STAGING_PREFIX + final.name)
    staging.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(staging)
    try:
        for leftover in staging.iterdir():  # a dead writer's temp files (we hold the lock)
            if (leftover.name.startswith(".") and leftover.name != INCOMPLETE_MARKER
                    or overwrite or not resume):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        if resume and not overwrite and n_files is not None and is_complete(final, n_files):
            raise AlreadyComplete(str(final))
        if resume and final.is_dir() and not overwrite:  # incomplete: resume from what it holds
            for item in final.iterdir():
                if not (staging / item.name).exists():
                    os.replace(item, staging / item.name)
            shutil.rmtree(final)
        try:
            yield staging
        except (KeyboardInterrupt, SystemExit):
            if not resume:
                shutil.rmtree(staging, ignore_errors=True)
            raise  # stopped: with resume, the finished slices stay for a rerun
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists() and overwrite:
            trash = final.with_name(STAGING_PREFIX + "old-" + final.name)
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if lock is not None:
            os.close(lock)
        _remove_if_empty(staging)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or holds slices to resume
        pass


def is_complete(folder: Path, n: int) -> bool:
    """True when ``folder`` holds all ``n`` slice files and no ``INCOMPLETE_MARKER``: a series
    written with bad slices left out is never complete, so a rerun retries it."""
    return (folder.is_dir() and len(complete_slices(folder, n)) == n
            and not (folder / INCOMPLETE_MARKER).exists())


def complete_slices(folder: Path, n: int) -> set[int]:
    """Indices ``i`` in [0, n) whose slice file (``i + 1:04d``.dcm) is in ``folder``."""
    if not folder.is_dir():
        return set()
    names = {p.name for p in folder.iterdir()}
    return {i for i in range(n) if f"{i + 1:04d}.dcm" in names}


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file, read in 1 MiB blocks (a VGG19 file is 548 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
