"""PNG's row filters undone (PNG spec §9: 0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth), compiled with
Numba: Average and Paeth depend on the byte just reconstructed, so the loop is byte by byte, which
only a compiled loop makes cheap. nogil: the data layers' prefetch thread decodes beside the net."""
from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def unfilter(rows, bpp, out):
    """rows (H, 1 + S): each row's filter type, then its S filtered bytes; out (H, S) the pixels'
    bytes. Returns -1, or the first row whose filter type is not 0..4 (out is then incomplete)."""
    h, s = out.shape
    for y in range(h):
        kind = rows[y, 0]
        if kind > 4:
            return y
        for i in range(s):
            a = int(out[y, i - bpp]) if i >= bpp else 0
            b = int(out[y - 1, i]) if y > 0 else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) >> 1
            else:
                c = int(out[y - 1, i - bpp]) if y > 0 and i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[y, i] = (int(rows[y, 1 + i]) + pred) & 0xFF
    return -1
