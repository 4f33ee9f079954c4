"""Data stage: locating, parsing and validating the MNIST idx files."""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from netdsl.errors import NetdslError

# Error codes of this module:
#   E0901 MNIST files missing          E0904 idx header malformed
#   E0902 unknown split                E0905 idx payload size wrong (truncated or trailing bytes)
#   E0903 file unreadable / bad gzip   E0906 images and labels disagree, or a label is not 0..9

MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES: tuple[str, ...] = tuple(n for pair in MNIST_FILES.values() for n in pair)

_REDOWNLOAD = "run `netdsl data mnist --force` to download a fresh copy"
_IDX_UBYTE = 0x08
MAX_IDX_BYTES = 256 << 20     # no MNIST file expands to more (train images: 45 MiB)

# Decoded arrays keyed by (path, mtime, size): repeated loads are free, and a file replaced by a
# re-download is decoded again rather than served stale.
_cache: dict[tuple[str, int, int], np.ndarray] = {}


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The netdsl data directory: `explicit`, else $NETDSL_DATA, else the user cache dir."""
    return _resolve(explicit)[0]


def _resolve(explicit) -> tuple[Path, str]:
    """The data directory and, for error messages, why that one was chosen."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser(), "given by --data-dir"
    env = os.environ.get("NETDSL_DATA")
    if env:
        return Path(env).expanduser(), "from $NETDSL_DATA"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "netdsl", "the default (set $NETDSL_DATA or pass --data-dir to change it)"


def mnist_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where the four MNIST files live: `<data_dir>/mnist`."""
    return data_dir(explicit) / "mnist"


def find_mnist_file(directory: Path, name: str) -> Path | None:
    """`name.gz` if present (the form `netdsl data mnist` writes), else `name`, else None."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def read_uncompressed(path: Path) -> bytes:
    """The file's content, gunzipped when it ends in .gz; unreadable or bad gzip is E0903."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NetdslError("E0903", f"cannot read MNIST file {path}: {e.strerror or e}",
                          help=f"check the file's permissions, or {_REDOWNLOAD}") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gunzip(raw, MAX_IDX_BYTES)
    except OverflowError:
        raise NetdslError("E0905", f"MNIST file {path} expands to more than {MAX_IDX_BYTES >> 20} MiB",
                          notes=[f"the file is {len(raw)} bytes; MNIST's largest file expands to 45 MiB"],
                          help=f"this is not an MNIST file; delete it, or {_REDOWNLOAD}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise NetdslError("E0903", f"MNIST file {path} is not a valid gzip file",
                          notes=[f"gzip says: {e}", f"the file is {len(raw)} bytes"],
                          help=f"the file is truncated or corrupt; delete it, or {_REDOWNLOAD}"
                          ) from None


def gunzip(raw: bytes, limit: int) -> bytes:
    """gzip.decompress, but stopping (OverflowError) once the output passes `limit` bytes: a small
    file must not inflate to gigabytes before it is checked. Handles several gzip members."""
    out, total = [], 0
    while raw:
        d = zlib.decompressobj(wbits=31)
        while raw:
            chunk = d.decompress(raw, limit + 1 - total)
            out.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OverflowError
            raw = d.unconsumed_tail
        if not d.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        raw = d.unused_data.lstrip(b"\0")          # gzip allows zero padding between members
    return b"".join(out)


def verify_mnist(directory: Path, names: tuple[str, ...] = ALL_FILES,
                 checksums: dict[str, str] | None = None) -> list[str]:
    """The `names` that are missing from `directory` or, when `checksums` (name -> SHA-256 of the
    uncompressed content) is given, whose content does not match; [] means all are usable."""
    bad = []
    for name in names:
        path = find_mnist_file(directory, name)
        if path is None:
            bad.append(name)
        elif checksums is not None:
            try:
                digest = hashlib.sha256(read_uncompressed(path)).hexdigest()
            except NetdslError:
                digest = None
            if digest != checksums[name]:
                bad.append(name)
    return bad


def load_mnist(split: str, data_dir: str | os.PathLike | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` ("train": 60000, "test": 10000) as read-only uint8 images (N, 28, 28) and
    labels (N,), read from `<data_dir>/mnist` (see `data_dir` for how that is chosen)."""
    if split not in MNIST_FILES:
        raise NetdslError("E0902", f"unknown MNIST split {split!r}",
                          help="use \"train\" (60000 digits) or \"test\" (10000 digits)")
    base, why = _resolve(data_dir)
    directory = base / "mnist"
    missing = verify_mnist(directory, MNIST_FILES[split])
    if missing:
        raise NetdslError(
            "E0901", f"MNIST {split} data not found in {directory}",
            notes=[f"missing: {n}.gz (or uncompressed {n})" for n in missing]
            + [f"data directory {base} is {why}"],
            help=f"run `netdsl data mnist` to download them into {directory}, or copy the files "
                 "there by hand; set $NETDSL_DATA or pass --data-dir to use another directory "
                 "(the files go in its mnist/ subdirectory)")
    image_name, label_name = MNIST_FILES[split]
    images = _load_idx(find_mnist_file(directory, image_name), ndim=3)
    labels = _load_idx(find_mnist_file(directory, label_name), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise NetdslError("E0906", f"MNIST {split} images and labels disagree in {directory}",
                          notes=[f"{image_name} holds {images.shape[0]} images",
                                 f"{label_name} holds {labels.shape[0]} labels"],
                          help=f"the two files come from different data sets; {_REDOWNLOAD}")
    return images, labels


def _load_idx(path: Path, ndim: int) -> np.ndarray:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _cache:
        _cache[key] = parse_idx(read_uncompressed(path), path, ndim)
    return _cache[key]


def parse_idx(data: bytes, path: Path, ndim: int) -> np.ndarray:
    """Decode an MNIST idx file: magic 0x0000 08 <ndim>, then <ndim> big-endian uint32 dims,
    then the uint8 payload. Images must be (N, 28, 28); labels (N,) with values 0..9."""
    kind = "image" if ndim == 3 else "label"
    header = 4 + 4 * ndim

    def bad(code, what, notes=()):
        return NetdslError(code, f"MNIST {kind} file {path} is corrupt: {what}", notes=list(notes),
                           help=f"delete the file, or {_REDOWNLOAD}")

    magic = int.from_bytes(data[:4], "big")
    want = (_IDX_UBYTE << 8) | ndim
    if len(data) >= 4 and magic != want:
        raise bad("E0904", f"magic number is 0x{magic:08x}, expected 0x{want:08x}",
                  [f"an MNIST {kind} file is idx{ndim}-ubyte: 0x0000, type 0x08 (uint8), "
                   f"{ndim} dimension(s)"])
    if len(data) < header:
        raise bad("E0905", f"truncated: {len(data)} bytes, shorter than the {header}-byte "
                           "idx header")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if dims[0] == 0:
        raise bad("E0905", f"it holds no {kind}s (the header says 0)")
    if ndim == 3 and dims[1:] != (28, 28):
        raise bad("E0904", f"images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise bad("E0905", f"{what}: {len(data)} bytes, expected {expected}",
                  [f"header says {' x '.join(map(str, dims))} uint8 values"])
    # frombuffer over immutable bytes gives a read-only view: callers share the cached array.
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 1 and array.size and array.max() > 9:
        first = int(np.argmax(array > 9))
        raise bad("E0906", f"label {int(array[first])} at index {first} is not a digit 0..9")
    return array


def batch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The order in which epoch `epoch` visits the n images: a permutation drawn from (seed, epoch),
    or 0..n-1 unshuffled. The one definition of MNIST's batch order (eager and graph mode)."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


class MnistFeed:
    """One split of MNIST and a cursor over it, as Caffe's data cursor: batches are taken in
    `batch_order` and wrap into the next epoch's order. Owned by the Net (the MNIST layer's run
    state); `state()` goes into snapshots so a resumed run reads the same batches.

    shard (rank, ranks): in data-parallel training rank r of N takes items r, r+N, ... of each
    N x count run of the order (Caffe's DataLayer::Skip); the cursor counts the shared order."""
    shard = (0, 1)

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int, shuffle: bool):
        self.images, self.labels, self.seed, self.shuffle = images, labels, seed, shuffle
        self.load_state({"epoch": 0, "cursor": 0})

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = batch_order(self.seed, self.epoch, len(self.labels), self.shuffle)

    def next_indices(self, count: int) -> np.ndarray:
        """The next `count` image indices (vectorised over whole runs of an epoch)."""
        rank, ranks = self.shard
        count *= ranks
        out = np.empty(count, np.int64)
        filled = 0
        while filled < count:
            if self.cursor == len(self.order):
                self.load_state({"epoch": self.epoch + 1, "cursor": 0})
            take = min(count - filled, len(self.order) - self.cursor)
            out[filled:filled + take] = self.order[self.cursor:self.cursor + take]
            self.cursor += take
            filled += take
        return out[rank::ranks]
