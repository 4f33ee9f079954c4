"""Atomic file writes (snapshots, weights, downloads, PNGs and JSON never appear half-written) and
the output directory of a run, checked before it starts."""
from __future__ import annotations

import contextlib
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


def prepare_output(prefix: str) -> str | None:
    """Make the directory that files named `prefix`* go to and prove it is writable, before a run
    spends any time: returns None when it is, else why not (for the caller's located error). Also
    removes the temporary `.NAME.part` files a killed snapshot write of this prefix left behind
    (write_atomic cleans up after itself unless the process is killed outright)."""
    if "\x00" in prefix:
        return "it contains a NUL character"
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".netdsl-probe-")
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        return f"{_nearest_file(directory)} is a file, not a directory"
    except OSError as e:
        return f"cannot write in {directory}: {e.strerror or e}"
    stem = os.path.basename(prefix)
    for name in os.listdir(directory):
        if name.startswith(f".{stem}_iter_") and name.endswith(".part"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
    return None


def _nearest_file(directory: str) -> str:
    """The first component of `directory` that exists and is not a directory."""
    parts = os.path.abspath(directory).split(os.sep)
    for k in range(2, len(parts) + 1):
        path = os.sep.join(parts[:k])
        if os.path.exists(path) and not os.path.isdir(path):
            return path
    return directory
