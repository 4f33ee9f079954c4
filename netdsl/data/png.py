"""A minimal PNG reader and writer (8-bit, non-interlaced) on zlib and struct; the row filters
are undone by a compiled kernel (unfilter.py). ImageData and Data decode PNGs with it first
(images.decode_image), Pillow taking what it lacks."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from netdsl.errors import NetdslError
from netdsl.files import write_atomic

# Error codes of this module:
#   E0913 cannot read the file, or it is not a PNG    E0915 the PNG is corrupt
#   E0914 the PNG uses a feature this reader lacks     E0916 cannot write the PNG
#   E0917 the PNG is larger than MAX_PIXELS

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 178_956_970          # Pillow's decompression-bomb limit (2 x 89,478,485): a 13,000^2 image
# colour type -> samples per pixel (3, palette, is expanded to RGB or RGBA after decoding)
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_COLOUR_NAMES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_CONVERT_HELP = ("convert it to an 8-bit, non-interlaced grayscale, RGB or RGBA PNG, e.g. "
                 "`convert in.png -depth 8 -interlace none out.png` (ImageMagick)")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 image, (H, W) grayscale or (H, W, 1|3|4), as a PNG (filter 0 on every row),
    atomically: through a temp file in the same directory."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"write_png needs a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    colour = {1: 0, 3: 2, 4: 6}.get(image.shape[-1]) if image.ndim == 3 else None
    if colour is None or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"write_png needs shape (H, W) or (H, W, 1|3|4), got {image.shape}")
    h, w, _ = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, -1)], axis=1)
    png = (_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))
    try:
        write_atomic(path, lambda f: f.write(png))
    except OSError as e:
        raise NetdslError("E0916", f"cannot write PNG {path}: {e.strerror or e}",
                          help="check that the directory exists and is writable") from None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def colour_type(data: bytes) -> int | None:
    """The colour type a PNG's header declares (0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA),
    None when `data` does not start like a PNG."""
    return data[25] if data.startswith(_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 25 else None


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG file (grayscale, grayscale+alpha, RGB, RGBA or palette)
    into uint8 (H, W, C): C = 1, 2, 3 or 4; palette images come back as RGB (RGBA with tRNS)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NetdslError("E0913", f"cannot read image {path}: {e.strerror or e}",
                          help="check the path and the file's permissions") from None
    return decode_png(data, path)


def decode_png(data: bytes, where: str | os.PathLike) -> np.ndarray:
    """read_png on a file's bytes; `where` names it in errors."""
    if not data.startswith(_SIGNATURE):
        raise NetdslError("E0913", f"{where} is not a PNG file (no PNG signature)",
                          notes=[f"it starts with {data[:8]!r}"],
                          help="give a PNG image, or convert the file to PNG first")
    chunks = _chunks(data, where)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise _corrupt(where, "the first chunk is not a 13-byte IHDR")
    w, h, depth, colour, compression, filter_method, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1])
    if colour not in _CHANNELS or depth != 8:
        kind = _COLOUR_NAMES.get(colour, f"colour type {colour}")
        raise NetdslError("E0914", f"{where}: {depth}-bit {kind} PNGs are not supported",
                          notes=["supported: 8-bit grayscale, grayscale+alpha, RGB, RGBA, palette"],
                          help=_CONVERT_HELP)
    if interlace != 0:
        raise NetdslError("E0914", f"{where}: interlaced (Adam7) PNGs are not supported",
                          help=_CONVERT_HELP)
    if compression != 0 or filter_method != 0 or w == 0 or h == 0:
        raise _corrupt(where, f"invalid IHDR (size {w}x{h}, compression {compression}, "
                              f"filter method {filter_method})")
    bpp = _CHANNELS[colour]
    if w * h > MAX_PIXELS:
        raise NetdslError("E0917", f"{where} is {w}x{h} pixels, more than this reader's limit of {MAX_PIXELS:,}",
                          notes=["the size is read from the PNG header; nothing was decompressed"],
                          help="downscale the image first (e.g. `convert in.png -resize 4000x4000 out.png`)")
    size = h * (1 + w * bpp)
    inflate = zlib.decompressobj()
    try:                      # inflate no more than the header's size promises (a zlib bomb stops there)
        raw = inflate.decompress(b"".join(d for kind, d in chunks if kind == b"IDAT"), size + 1)
    except zlib.error as e:
        raise _corrupt(where, f"the image data does not decompress ({e})") from None
    if len(raw) != size:
        raise _corrupt(where, f"the image data is {len(raw)} bytes, expected {size}")
    if not inflate.eof:
        raise _corrupt(where, "the image data's zlib stream is truncated (its checksum is missing)")
    from .unfilter import unfilter
    pixels = np.empty((h, w * bpp), np.uint8)
    bad = unfilter(np.frombuffer(raw, np.uint8).reshape(h, 1 + w * bpp), bpp, pixels)
    if bad >= 0:
        raise _corrupt(where, f"row {bad} has filter type {raw[bad * (1 + w * bpp)]}; PNG defines 0..4")
    pixels = pixels.reshape(h, w, bpp)
    return _expand_palette(pixels[:, :, 0], chunks, where) if colour == 3 else pixels


def _chunks(data: bytes, path) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk up to IEND, checking lengths and CRCs."""
    out, at, end = [], len(_SIGNATURE), len(data)
    while at < end:
        if at + 12 > end:
            raise _corrupt(path, f"truncated chunk header at byte {at}")
        length, kind = _HEAD.unpack_from(data, at)
        if at + 12 + length > end:
            raise _corrupt(path, f"chunk {kind!r} at byte {at} is truncated")
        body = data[at + 8:at + 8 + length]
        if zlib.crc32(body, zlib.crc32(kind)) != _CRC.unpack_from(data, at + 8 + length)[0]:
            raise _corrupt(path, f"CRC mismatch in chunk {kind!r} at byte {at}")
        if kind == b"IEND":
            break
        out.append((kind, body))
        at += 12 + length
    return out


_HEAD, _CRC = struct.Struct(">I4s"), struct.Struct(">I")


def _expand_palette(index: np.ndarray, chunks, path) -> np.ndarray:
    plte = next((d for kind, d in chunks if kind == b"PLTE"), None)
    if plte is None or len(plte) % 3 or not plte:
        raise _corrupt(path, "a palette image without a valid PLTE chunk")
    palette = np.frombuffer(plte, np.uint8).reshape(-1, 3)
    trns = next((d for kind, d in chunks if kind == b"tRNS"), None)
    if trns is not None:
        # Entries beyond tRNS's length are opaque (PNG spec §11.3.2.1).
        alpha = np.full(len(palette), 255, np.uint8)
        alpha[:min(len(trns), len(palette))] = np.frombuffer(trns, np.uint8)[:len(palette)]
        palette = np.concatenate([palette, alpha[:, None]], axis=1)
    if index.max() >= len(palette):
        raise _corrupt(path, f"pixel index {int(index.max())} is past the "
                             f"{len(palette)}-entry palette")
    return palette[index]


def _corrupt(path, what: str) -> NetdslError:
    return NetdslError("E0915", f"{path} is a corrupt PNG: {what}",
                       help="re-export or re-download the image; the file is damaged or truncated")
