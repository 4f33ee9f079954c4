"""Weights in and out: netdsl's .npz (`<layer>/<i>` arrays), Caffe's binary .caffemodel (V1 `layers`
and V2 `layer`) and mean .binaryproto files. Copying into a net follows Caffe's
CopyTrainedLayersFrom: by layer name, layers the net lacks skipped and listed, a blob count or shape
mismatch a located error, legacy 4-D blobs (1 x 1 x M x K for an InnerProduct) accepted."""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import NetdslError
from .files import write_atomic

CAFFE_SUFFIXES = (".caffemodel", ".binaryproto", ".pb")


@dataclass
class Weights:
    """The blobs of a weights file by layer name, in file order. A netdsl .npz names each blob
    (`<layer>/<i>`), so it may give some blobs of a layer (None for the others); a .caffemodel gives
    every blob of each layer it has (`whole_layers`), and Caffe checks their count."""
    path: str
    layers: dict[str, list[np.ndarray | None]]
    whole_layers: bool = False
    types: dict[str, str] = field(default_factory=dict)     # layer -> type, where the file says
    legacy: set = field(default_factory=set)                 # (layer, i) of blobs with only num/channels/height/width

    def arrays(self) -> dict[str, np.ndarray]:
        """`<layer>/<i>` -> array (netdsl's naming)."""
        return {f"{name}/{i}": a for name, blobs in self.layers.items() for i, a in enumerate(blobs) if a is not None}

    def fit(self, layer: str, i: int, want: tuple) -> np.ndarray | None:
        """Blob i of `layer` shaped as the net wants it, or None when the shapes differ. A legacy blob
        fits when the net's shape, padded with leading 1s to 4-D, equals it (Caffe's ShapeEquals)."""
        a = self.layers[layer][i] if i < len(self.layers[layer]) else None
        if a is None or tuple(a.shape) == tuple(want):
            return a
        if (layer, i) in self.legacy and len(want) <= 4 and (1,) * (4 - len(want)) + tuple(want) == a.shape:
            return a.reshape(want)
        return None


def read_weights(path: str, expect: dict[str, list[tuple]] | None = None) -> Weights:
    """A weights file, by content: an .npz (a zip), else a binary Caffe NetParameter. `expect`
    (layer -> its param shapes in the net) lets an .npz skip inflating the arrays the net cannot
    take: they come back as zero-memory views of their declared shape, enough to report them."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise NetdslError("E0802", f"{path} is not a regular file", help="pass a .caffemodel or .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise NetdslError("E0801", f"weights file not found: {path}", help="check the path") from None
    except OSError as e:
        raise NetdslError("E0802", f"cannot read weights {path}: {e.strerror}", help="check the path") from None
    if head == b"PK\x03\x04":
        return _read_npz(path, expect)
    if head == b"\x93NUM":
        raise NetdslError("E0802", f"{path} is a single .npy array, not a set of named weights",
                          help="save the weights as an .npz of '<layer>/<i>' arrays (np.savez), or a .caffemodel")
    return read_caffemodel(path)


def _read_npz(path: str, expect: dict[str, list[tuple]] | None) -> Weights:
    """An .npz whose members are checked before any is inflated (a 6 MB file of zeros can claim a
    40000 x 40000 array): each .npy header must declare numbers; an array the net cannot take
    (another layer, another size) is not inflated; the rest must fit in memory, and each inflates
    to no more than the zip directory declares."""
    import zipfile

    from .memory import require
    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.infolist() if m.filename.endswith(".npy") and not m.filename.startswith("__")]
            declared = {}
            for m in members:
                with z.open(m) as f:
                    header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = header(f)
                if dtype.kind not in "fiu" or dtype.fields is not None:
                    raise NetdslError("E0802", f"{path}: array '{m.filename[:-4]}' holds {dtype} values, not numbers",
                                      help="weights are float arrays named '<layer>/<i>'")
                declared[m.filename] = (tuple(shape), dtype)
            wanted = [m for m in members if _wanted(m.filename[:-4], declared[m.filename][0], expect)]
            require(sum(m.file_size for m in wanted), f"weights file {path} (as its zip directory declares)")
            arrays = {}
            for m in members:
                key = m.filename[:-4]
                if m in wanted:
                    with z.open(m) as f:
                        arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
                else:
                    shape, dtype = declared[m.filename]
                    arrays[key] = np.broadcast_to(np.zeros((), dtype), shape)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise NetdslError("E0802", f"cannot read weights {path}: {e}",
                          help="pass an .npz written by `netdsl train` (..._iter_N.npz) or a .caffemodel") from None
    return from_arrays(arrays, path)


def _wanted(key: str, shape: tuple, expect: dict[str, list[tuple]] | None) -> bool:
    """Whether blob `key` ('<layer>/<i>') of `shape` may be copied into the net (same element
    count: legacy shapes are reconciled later); with no expectations, every blob is."""
    if expect is None:
        return True
    name, _, i = key.rpartition("/")
    shapes = expect.get(name, [])
    if not (i.isdigit() and int(i) < len(shapes)):
        return False
    want = shapes[int(i)]
    return any(d is None for d in want) or math.prod(shape) == math.prod(want)


def from_arrays(arrays: dict[str, np.ndarray], path: str = "<arrays>") -> Weights:
    """`<layer>/<i>` arrays (netdsl's naming) as Weights."""
    layers: dict[str, list] = {}
    for key, a in arrays.items():
        name, _, i = key.rpartition("/")
        if not name or not i.isdigit():
            raise NetdslError("E0802", f"{path}: array '{key}' is not named <layer>/<index>",
                              help="netdsl weights are arrays named '<layer>/<i>' (what `netdsl train` writes)")
        blobs = layers.setdefault(name, [])
        blobs.extend([None] * (int(i) + 1 - len(blobs)))
        blobs[int(i)] = a
    return Weights(path, layers)


def _parse(path: str, kind: str):
    """Parse a binary protobuf message from a file without reading it into Python objects first
    (the file is mapped; the parser never allocates past its size)."""
    from google.protobuf.message import DecodeError

    from .caffe_pb import messages
    msg = messages()[kind]()
    size = os.path.getsize(path)
    if size == 0:
        raise NetdslError("E0802", f"{path} is empty", help="pass a .caffemodel written by Caffe or netdsl")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if _looks_like_text(m[:256]):
            raise NetdslError("E0802", f"{path} is a text file (a net or solver definition?), not binary weights",
                              help="pass the trained weights (.caffemodel or .npz); the .prototxt is the net")
        try:
            msg.ParseFromString(memoryview(m))
        except DecodeError as e:
            raise NetdslError("E0802", f"{path} is not a Caffe {kind} (the protobuf decoding failed: {e})",
                              notes=["the file may be truncated or of another format"],
                              help="pass a .caffemodel written by Caffe or netdsl, or netdsl's .npz") from None
    return msg


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return False
    return any(w in text for w in ("layer", "name:", "input:", "net:", "base_lr")) and all(
        c.isprintable() or c in "\r\n\t" for c in text)


def read_caffemodel(path: str) -> Weights:
    """Caffe's binary NetParameter: V2 `layer` and V1 `layers` entries, each with its blobs."""
    from .upgrade import v1_numbers
    net = _parse(path, "NetParameter")
    numbers = v1_numbers()
    w = Weights(path, {}, whole_layers=True)
    entries = [(lp.name, lp.type, lp.blobs) for lp in net.layer]
    entries += [(lp.name, numbers.get(lp.type, f"V1 type {lp.type}"), lp.blobs) for lp in net.layers]
    for name, type_, blobs in entries:
        if not blobs:
            continue
        arrays = []
        for i, blob in enumerate(blobs):
            a, legacy = blob_array(blob, f"{path}: layer '{name}', blob {i}")
            arrays.append(a)
            if legacy:
                w.legacy.add((name, i))
        w.layers[name] = arrays
        w.types[name] = type_
    if not w.layers and not entries:
        raise NetdslError("E0802", f"{path} holds no layers: it is not a Caffe weights file",
                          help="pass a .caffemodel written by Caffe or netdsl, or netdsl's .npz")
    return w


def blob_array(blob, where: str) -> tuple[np.ndarray, bool]:
    """A BlobProto's values as an array of its shape (`shape`, else the legacy 4-D dims), and
    whether the shape is legacy. float data stays float32; double_data is float64."""
    from .caffe_pb import messages
    legacy = not blob.HasField("shape")
    shape = tuple(blob.shape.dim) if not legacy else tuple(
        int(getattr(blob, d)) for d in ("num", "channels", "height", "width"))
    if legacy and not any(shape):
        shape = (0,)
    if blob.data:
        a = np.frombuffer(b"".join(blob.data) if len(blob.data) > 1 else blob.data[0], "<f4")
    elif blob.double_data:
        a = np.frombuffer(b"".join(blob.double_data), "<f8")
    elif math.prod(shape) and blob.ListFields():
        # written unpacked: decode the same bytes with the repeated-float declaration
        unpacked = messages()["BlobProtoUnpacked"].FromString(blob.SerializeToString())
        a = np.array(unpacked.data, np.float32) if len(unpacked.data) else np.array(unpacked.double_data)
    else:
        a = np.zeros(0, np.float32)
    if any(d < 0 for d in shape) or a.size != math.prod(shape):
        raise NetdslError("E0802", f"{where}: {a.size} values for shape {'x'.join(map(str, shape))}",
                          help="the file is damaged or not written by Caffe")
    return a.reshape(shape), legacy


def _blob(a: np.ndarray):
    from .caffe_pb import messages
    blob = messages()["BlobProto"]()
    blob.shape.dim.extend(int(d) for d in a.shape)
    if a.dtype == np.float64:
        blob.double_data.append(np.ascontiguousarray(a, "<f8").tobytes())
    else:
        blob.data.append(np.ascontiguousarray(a, "<f4").tobytes())
    return blob


def write_caffemodel(path: str, layers: dict[str, tuple[str, list[np.ndarray]]], name: str = "") -> None:
    """A V2 binary NetParameter (layer name, type, blobs with `shape` and packed float data) that Caffe,
    OpenCV 4 and netdsl read. Streamed a layer at a time (serialised NetParameters concatenate into
    one: repeated fields append), so only one layer is ever held twice. Written atomically."""
    from .caffe_pb import messages
    net_class = messages()["NetParameter"]

    def write(f) -> None:
        if name:
            f.write(net_class(name=name).SerializeToString())
        for layer_name, (type_, blobs) in layers.items():
            one = net_class()
            lp = one.layer.add(name=layer_name, type=type_)
            for a in blobs:
                lp.blobs.append(_blob(np.asarray(a, np.float32)))
            f.write(one.SerializeToString())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, write)


def read_blobproto(path: str) -> np.ndarray:
    """A mean file (mean.binaryproto: one BlobProto), as an array of its shape."""
    if not os.path.exists(path):
        raise NetdslError("E0801", f"mean file not found: {path}", help="check transform_param's mean_file")
    return blob_array(_parse(path, "BlobProto"), path)[0]


def write_blobproto(path: str, array: np.ndarray) -> None:
    data = _blob(np.asarray(array, np.float32)).SerializeToString()
    write_atomic(path, lambda f: f.write(data))
