"""The files Caffe's data layers read: an image list (ImageData), an LMDB of Datums (Data) and a
list of HDF5 files (HDF5Data). Each opens its source once, says what is wrong with it where it is
wrong (file and line, record key, dataset), and hands out item i on demand.

Error codes: E0941 a source that does not exist, E0942 a database that is not an LMDB (LevelDB),
E0943 a bad list-file line, E0944 an empty source, E0945 an image that cannot be read, E0948
items of different sizes, E0949 a bad HDF5 file or dataset."""
from __future__ import annotations

import os

import numpy as np

from ..errors import NetdslError
from .images import decode_image, from_datum, need, resize


def _missing(what: str, path: str, help: str) -> NetdslError:
    return NetdslError("E0941", f"{what} not found: {path}", notes=[f"relative paths are read from {os.getcwd()}"],
                       help=help)


def read_list(path: str, what: str) -> list[tuple[int, str]]:
    """The non-blank lines of a list file, with their line numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise _missing(f"{what} list file", path, "check the layer's `source`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NetdslError("E0941", f"cannot read the {what} list file {path}: {e}",
                          help=f"`source` names a text file listing the {what}") from None
    if not lines:
        raise NetdslError("E0944", f"the {what} list file {path} is empty", help=f"list the {what}, one per line")
    return lines


class ImageList:
    """Caffe's ImageData source: `path label` lines (the label after the last space), each image at
    root_folder + path (string concatenation, as Caffe), resized to new_height x new_width if given.
    `fixed`: every image must come out this C x H x W (None: any size, e.g. cropped later)."""

    def __init__(self, source: str, root: str = "", color: bool = True, new_height: int = 0, new_width: int = 0):
        self.source, self.root, self.color, self.size = source, root, color, (new_height, new_width)
        self.paths, self.labels, self.lines = [], [], []
        for lineno, line in read_list(source, "image"):
            path, _, label = line.rpartition(" ")
            where = f"{source}:{lineno}"
            if not path:
                raise NetdslError("E0943", f"{where}: '{line}' is not `path label`",
                                  help="write each line as the image path, a space, and its integer label")
            try:
                self.labels.append(int(label))
            except ValueError:
                raise NetdslError("E0943", f"{where}: the label '{label}' is not an integer",
                                  help="labels are class numbers 0, 1, 2, ...") from None
            self.paths.append(path)
            self.lines.append(lineno)
        self.labels = np.asarray(self.labels, np.float32)
        self.fixed: tuple | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        return f"{self.source}:{self.lines[i]}"

    def read(self, i: int) -> bytes:
        """The bytes of image i's file."""
        path = self.root + self.paths[i]
        try:
            with open(path, "rb", buffering=0) as f:      # unbuffered: one read, no buffer object
                return f.readall()
        except OSError as e:
            raise NetdslError("E0945", f"{self.where(i)}: cannot read the image {path}: {e.strerror}",
                              help="fix the path in the list file (root_folder is prepended as written)") from None

    def item(self, i: int) -> tuple[np.ndarray, float]:
        """Image i (C x H x W uint8) and its label."""
        data, path = self.read(i), self.root + self.paths[i]
        chw = decode_image(data, self.color, f"{self.where(i)} ({path})")
        if all(self.size):
            chw = resize(chw, *self.size)
        if self.fixed is not None and chw.shape != self.fixed:
            raise _size_mismatch(f"{self.where(i)} ({path})", chw.shape, self.fixed,
                                 "give image_data_param new_height and new_width to resize every image")
        return chw, self.labels[i]


class LmdbRecords:
    """Caffe's Data source: the Datums of an LMDB, in key order (as Caffe's cursor reads them).
    color: force_color (True) / force_gray (False) for encoded Datums, else None."""

    def __init__(self, source: str, color: bool | None = None):
        if not os.path.exists(source):
            raise _missing("LMDB", source, "check data_param's `source` (an LMDB directory, as convert_imageset "
                                           "writes it)")
        if os.path.isdir(source) and not os.path.exists(os.path.join(source, "data.mdb")):
            leveldb = os.path.exists(os.path.join(source, "CURRENT"))
            raise NetdslError("E0942", f"{source} is a LevelDB database" if leveldb
                              else f"{source} is not an LMDB (no data.mdb in it)",
                              notes=["netdsl reads Caffe's LMDB backend only"],
                              help="convert it to LMDB: `netdsl data convert-imageset ROOT LIST OUT_DB` from the "
                                   "images, or Caffe's convert_imageset --backend=lmdb")
        lmdb = need("lmdb", "the Data layer")
        self.source, self.color = source, color
        try:
            self.env = _open_lmdb(lmdb, source)
            with self.env.begin() as txn:
                self.keys = list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as e:
            raise NetdslError("E0942", f"{source} is not a readable LMDB: {e}",
                              help="rebuild it with `netdsl data convert-imageset`") from None
        if not self.keys:
            raise NetdslError("E0944", f"the LMDB {source} has no records", help="fill it with `netdsl data convert-imageset`")
        self.fixed: tuple | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        return f"{self.source}: record '{self.keys[i].decode('utf-8', 'replace')}'"

    def item(self, i: int) -> tuple[np.ndarray, int]:
        """Record i's image (C x H x W) and label."""
        with self.env.begin() as txn:
            raw = txn.get(self.keys[i])
        chw, label = from_datum(raw, self.where(i), self.color)
        if self.fixed is not None and chw.shape != self.fixed:
            raise _size_mismatch(self.where(i), chw.shape, self.fixed,
                                 "build the LMDB with `netdsl data convert-imageset --resize H,W`")
        return chw, label


_ENVS: dict = {}


def _open_lmdb(lmdb, source: str):
    """One read-only environment per LMDB and process (LMDB refuses a second one: the train and
    test nets, or the checker and the net, may read the same database)."""
    key = os.path.realpath(source)
    data = os.path.join(source, "data.mdb") if os.path.isdir(source) else source
    stamp = (os.stat(data).st_ino, os.stat(data).st_dev)
    stamped, env = _ENVS.get(key, (None, None))
    if stamped != stamp:                     # new, or rebuilt in place: the old environment is stale
        if env is not None:
            env.close()
        env = lmdb.open(source, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(source),
                        max_readers=64)
        _ENVS[key] = (stamp, env)
    return env


class Hdf5Rows:
    """Caffe's HDF5Data source: the .h5 files a list file names, each holding one dataset per top
    (first axis: items, the same length in every dataset of a file), read whole as float32 and
    concatenated across files."""

    def __init__(self, source: str, tops: list[str], limit: int | None = None):
        h5py = need("h5py", "the HDF5Data layer")
        parts: dict[str, list[np.ndarray]] = {t: [] for t in tops}
        for lineno, path in read_list(source, "HDF5 file")[:limit]:
            where = f"{source}:{lineno} ({path})"
            try:
                f = h5py.File(path, "r")
            except FileNotFoundError:
                raise NetdslError("E0949", f"{where}: HDF5 file not found",
                                  notes=[f"relative paths are read from {os.getcwd()}"], help="fix the list file") from None
            except OSError as e:
                raise NetdslError("E0949", f"{where}: not a readable HDF5 file: {e}", help="fix the list file") from None
            with f:
                for t in tops:
                    if t not in f or not hasattr(f[t], "shape"):
                        have = ", ".join(k for k in f.keys()) or "none"
                        raise NetdslError("E0949", f"{where}: no dataset '{t}' for the top of that name",
                                          notes=[f"datasets in the file: {have}"],
                                          help="HDF5Data reads the dataset named like each top: rename the top or the "
                                               "dataset")
                    a = np.asarray(f[t][()], np.float32)
                    parts[t].append(a if a.ndim else a.reshape(1))
                lengths = {t: len(parts[t][-1]) for t in tops}
                if len(set(lengths.values())) > 1:
                    raise NetdslError("E0949", f"{where}: the datasets have different lengths: "
                                      + ", ".join(f"{t} {n}" for t, n in lengths.items()),
                                      help="every dataset of a file needs one row per item")
        self.arrays = {}
        for t in tops:
            shapes = {a.shape[1:] for a in parts[t]}
            if len(shapes) > 1:
                raise NetdslError("E0949", f"{source}: dataset '{t}' has rows of different shapes across files: "
                                  + ", ".join("x".join(map(str, s)) or "scalar" for s in shapes),
                                  help="give every file's dataset the same shape after the first axis")
            self.arrays[t] = np.concatenate(parts[t])
        if not len(self):
            raise NetdslError("E0944", f"the HDF5 files of {source} hold no rows", help="fill the datasets")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


def _size_mismatch(where: str, have: tuple, want: tuple, help: str) -> NetdslError:
    fmt = "x".join
    return NetdslError("E0948", f"{where} is {fmt(map(str, have))}, but the first item is {fmt(map(str, want))}",
                       notes=["a batch holds items of one size"], help=help)
