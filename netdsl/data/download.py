"""Data stage: downloading and checksum-verifying the MNIST files."""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from netdsl.data import mnist
from netdsl.errors import Collector, NetdslError
from netdsl.files import write_atomic

# Error codes of this module:
#   E0907 a file could not be fetched from any mirror (network / HTTP errors only)
#   E0908 a file could not be fetched intact: some mirror served content failing the checksum
#   E0909 the data directory cannot be created or written

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# SHA-256 of the *uncompressed* files, so a re-gzipped copy still verifies.
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

TIMEOUT_S = 30
_CHUNK = 1 << 16


class _Failed(Exception):
    """One mirror could not deliver one file; `unreachable` marks connection-level failures."""

    def __init__(self, reason: str, unreachable: bool = False, bad_content: bool = False):
        super().__init__(reason)
        self.unreachable = unreachable
        self.bad_content = bad_content


def download_mnist(data_dir: str | os.PathLike | None = None, force: bool = False,
                   progress: bool = True, mirrors: list[str] | tuple[str, ...] | None = None
                   ) -> Path:
    """Fetch the four MNIST .gz files into `<data_dir>/mnist` (trying `mirrors` in order) and
    return that directory. Files already present with the right checksum are kept unless
    `force`. Raises an `Errors` with one E0907/E0908 diagnostic per file that failed."""
    directory = mnist.mnist_dir(data_dir)
    mirrors = tuple(mirrors if mirrors is not None else MIRRORS)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(directory, e) from None
    wanted = list(mnist.ALL_FILES) if force else mnist.verify_mnist(directory, checksums=SHA256)
    show = progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    dead: set[str] = set()      # mirrors that refused a connection are not retried per file
    problems = Collector()
    for name in wanted:
        attempts, bad_content = [], False
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{name}.gz"
            if mirror in dead:
                attempts.append(f"{url}: skipped, the server was unreachable earlier")
                continue
            try:
                data = _fetch(url, f"{name}.gz", show)
                _check(data, name)
            except _Failed as f:
                attempts.append(f"{url}: {f}")
                bad_content |= f.bad_content
                if f.unreachable:
                    dead.add(mirror)
                continue
            _write_atomic(directory / f"{name}.gz", data)
            break
        else:
            code = "E0908" if bad_content else "E0907"
            why = "no mirror served an intact copy" if bad_content else "every mirror failed"
            problems.error(code, f"could not download {name}.gz into {directory}: {why}",
                           notes=attempts or ["no mirrors were given"],
                           help=f"download {name}.gz by hand from one of the URLs above and put "
                                f"it (gzipped or not) in {directory}; or check your network or "
                                "proxy and run `netdsl data mnist` again")
    problems.raise_if_errors()
    return directory


def _fetch(url: str, label: str, show: bool) -> bytes:
    """The body of `url`, read in chunks so a progress bar can follow it."""
    chunks, got, total = [], 0, 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(_CHUNK):
                chunks.append(chunk)
                got += len(chunk)
                if show:
                    _bar(label, got, total)
    except urllib.error.HTTPError as e:
        raise _Failed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _Failed(f"unreachable ({e.reason})", unreachable=True) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        # Timeouts, resets mid-transfer, malformed URLs.
        raise _Failed(f"failed ({type(e).__name__}: {e})", unreachable=True) from None
    finally:
        if show and got:
            sys.stderr.write("\n")   # end the progress bar's line, even after a failure
    if total and got != total:
        raise _Failed(f"truncated: got {got} of {total} bytes")
    return b"".join(chunks)


def _check(data: bytes, name: str) -> None:
    try:
        content = mnist.gunzip(data, mnist.MAX_IDX_BYTES)
    except OverflowError:
        raise _Failed(f"expands to more than {mnist.MAX_IDX_BYTES >> 20} MiB: not an MNIST file", bad_content=True) from None
    except (OSError, EOFError, zlib.error) as e:
        raise _Failed(f"not a valid gzip file ({e})", bad_content=True) from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != SHA256[name]:
        raise _Failed(f"checksum mismatch: SHA-256 {digest}, expected {SHA256[name]}",
                      bad_content=True)


def _bar(label: str, got: int, total: int) -> None:
    if total:
        filled = 30 * got // total
        text = (f"\r{label:28} [{'#' * filled}{'.' * (30 - filled)}] "
                f"{_size(got):>8}/{_size(total)} {100 * got // total:3d}%")
    else:
        text = f"\r{label:28} {_size(got):>8}"
    sys.stderr.write(text)
    sys.stderr.flush()


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        raise _unwritable(path.parent, e) from None


def _unwritable(directory: Path, e: OSError) -> NetdslError:
    return NetdslError("E0909", f"cannot write MNIST files into {directory}: {e.strerror or e}",
                       help="choose a writable directory with --data-dir or $NETDSL_DATA, or fix "
                            "the permissions of this one")
