"""Images and Caffe Datums, as Caffe's io.cpp makes them: pixels are C x H x W uint8 in OpenCV's
channel order (BGR for colour), decoded with Pillow, resized with OpenCV's bilinear rule.

Error codes: E0940 a package is missing, E0946 an image cannot be decoded, E0947 a corrupt Datum."""
from __future__ import annotations

import importlib
import io

import numpy as np
from google.protobuf.message import DecodeError

from ..caffe_pb import messages
from ..errors import NetdslError
from .png import colour_type, decode_png

_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "TIFF", "WEBP", "GIF")     # what cv::imdecode reads, tried in this order
_PACKAGE = {"lmdb": "lmdb", "h5py": "h5py", "PIL.Image": "pillow"}


def need(module: str, what: str):
    """Import one of the data extra's packages, or say how to install it (E0940)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NetdslError("E0940", f"{what} needs the Python package '{_PACKAGE[module]}', which is not installed",
                          help='install the data extra: pip install "netdsl[data]"') from None


def decode_image(data: bytes, color: bool | None, where: str) -> np.ndarray:
    """An encoded image (PNG, JPEG, ...) as C x H x W uint8, as cv::imdecode gives it: color True
    gives 3 channels (BGR), False 1 (gray), None the file's own (Caffe's DecodeDatumToCVMatNative)."""
    chw = _png(data, color, where)
    return chw if chw is not None else _pillow(data, color, where)


def _pillow(data: bytes, color: bool | None, where: str) -> np.ndarray:
    """decode_image through Pillow: every format and conversion."""
    Image = need("PIL.Image", "decoding images")
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
            if color is None:
                color = im.mode not in ("L", "I;16", "I", "1", "LA")
            mode = "RGB" if color else "L"
            a = np.asarray(im if im.mode == mode else im.convert(mode))
    except (OSError, ValueError, SyntaxError) as e:
        raise NetdslError("E0946", f"{where}: cannot decode the image: {e}",
                          help="re-encode it as PNG or JPEG, or remove it from the data set") from None
    return np.ascontiguousarray(a[:, :, ::-1].transpose(2, 0, 1)) if color else a[None]


def _png(data: bytes, color: bool | None, where: str) -> np.ndarray | None:
    """decode_image for the PNGs most data sets hold (8-bit, non-interlaced gray, RGB or RGBA),
    through netdsl's PNG reader: three times faster than Pillow's, and compiled code where the
    prefetch thread would otherwise hold the GIL. None for what it leaves to Pillow: other PNGs,
    damaged ones (Pillow words the error) and conversions other than dropping alpha or widening
    gray to three equal channels, which Pillow does exactly so."""
    kind = colour_type(data)
    if kind is None or kind == 4 or (color is False and kind != 0):   # not a PNG; gray+alpha; colour read as gray
        return None
    try:
        hwc = decode_png(data, where)
    except NetdslError:
        return None
    if hwc.shape[2] == 1:
        return hwc.transpose(2, 0, 1) if not color else np.repeat(hwc.transpose(2, 0, 1), 3, axis=0)
    return np.ascontiguousarray(hwc[:, :, 2::-1].transpose(2, 0, 1))


def encode_image(chw: np.ndarray, kind: str) -> bytes:
    """C x H x W uint8 (BGR) as PNG or JPEG bytes (convert_imageset --encoded)."""
    Image = need("PIL.Image", "encoding images")
    hwc = chw[0] if chw.shape[0] == 1 else chw[::-1].transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="JPEG" if kind in ("jpg", "jpeg") else "PNG",
                                                    **({"quality": 95} if kind in ("jpg", "jpeg") else {}))
    return buf.getvalue()


def resize(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv::resize(INTER_LINEAR) of a C x H x W uint8 image: pixel centres aligned (src = (dst + 0.5)
    * scale - 0.5, clamped at the border), then rounded. OpenCV computes the weights in 11-bit fixed
    point, so a pixel may differ from it by 1."""
    c, h, w = chw.shape
    if (h, w) == (height, width):
        return chw

    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, fy = axis(h, height)
    x0, x1, fx = axis(w, width)
    a = chw.astype(np.float32)
    rows = a[:, y0] * (1 - fy)[None, :, None] + a[:, y1] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_datum(chw: np.ndarray | None, label: int, encoded: bytes | None = None) -> bytes:
    """A serialized Datum: raw C x H x W uint8 pixels, or encoded image bytes (shape fields 0, as
    convert_imageset --encoded writes them)."""
    d = messages()["Datum"](label=int(label))
    if encoded is not None:
        d.data, d.encoded = encoded, True
    else:
        d.channels, d.height, d.width = chw.shape
        d.data = np.ascontiguousarray(chw, np.uint8).tobytes()
    return d.SerializeToString()


def from_datum(raw: bytes, where: str, color: bool | None = None) -> tuple[np.ndarray, int]:
    """A Datum's image (C x H x W: uint8 from data, float32 from float_data) and label. color:
    force_color / force_gray for an encoded Datum (None: its own channels), as Caffe's
    DataTransformer decodes it; raw Datums ignore it, as Caffe does."""
    d = messages()["Datum"]()
    try:
        d.ParseFromString(raw)
    except DecodeError as e:
        raise NetdslError("E0947", f"{where} is not a Caffe Datum: {e}",
                          help="rebuild the database with `netdsl data convert-imageset`") from None
    if d.encoded:
        return decode_image(d.data, color, where), d.label
    shape = (d.channels, d.height, d.width)
    n = d.channels * d.height * d.width
    if d.data:
        if n == 0 or len(d.data) != n:
            raise _corrupt(where, f"{len(d.data)} bytes of pixels for a {shape[0]}x{shape[1]}x{shape[2]} image")
        return np.frombuffer(d.data, np.uint8).reshape(shape), d.label
    if n == 0 or len(d.float_data) != n:
        raise _corrupt(where, f"{len(d.float_data)} float values for a {shape[0]}x{shape[1]}x{shape[2]} image")
    return np.asarray(d.float_data, np.float32).reshape(shape), d.label


def _corrupt(where: str, what: str) -> NetdslError:
    return NetdslError("E0947", f"{where} is a corrupt Datum: {what}",
                       help="rebuild the database with `netdsl data convert-imageset`")
