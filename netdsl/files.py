"""Atomic file writes: snapshots, weights, downloads, PNGs and JSON never appear half-written."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash or Ctrl-C mid-write leaves the previous file (if any) intact and no torn one.
    OSError propagates for the caller to turn into a located diagnostic."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())          # mkstemp makes 0600; a file should get the user's umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
