"""The memory planner: buffers live over intervals of a schedule are placed in one arena, each at
the lowest aligned offset that overlaps no buffer live at the same time. One planner for every
schedule: the CPU plan's forward and training schedules (plan.py) and the GPU step's launches
(gpu/program.py)."""
from __future__ import annotations

from dataclasses import dataclass

ALIGN = 256                      # bytes; every buffer starts on this boundary


@dataclass
class Block:
    """A buffer of `nbytes` live from schedule position `first` to `last` (inclusive); `offset`
    is set by `place`. (gpu/program.Tensor has the same fields and is placed the same way.)"""
    name: str
    nbytes: int
    first: int
    last: int
    offset: int = -1


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def place(blocks) -> int:
    """Place every block with first >= 0 (largest first, ties by name, so the layout is
    deterministic) at the lowest aligned offset free over its whole interval. Blocks never live
    (first < 0) get offset 0 and no memory. Returns the arena size in bytes."""
    placed = []
    for b in sorted(blocks, key=lambda b: (-b.nbytes, b.name)):
        if b.first < 0:
            b.offset = 0
            continue
        busy = sorted((p.offset, p.offset + aligned(p.nbytes)) for p in placed
                      if not (p.last < b.first or b.last < p.first))
        offset = 0
        for lo, hi in busy:
            if offset + aligned(b.nbytes) <= lo:
                break
            offset = max(offset, hi)
        b.offset = offset
        placed.append(b)
    return max((p.offset + aligned(p.nbytes) for p in placed), default=0)


def peak(blocks) -> int:
    """The most bytes live at one schedule position (a lower bound on any arena)."""
    events: dict[int, int] = {}
    for b in blocks:
        if b.first >= 0:
            events[b.first] = events.get(b.first, 0) + b.nbytes
            events[b.last + 1] = events.get(b.last + 1, 0) - b.nbytes
    live = top = 0
    for t in sorted(events):
        live += events[t]
        top = max(top, live)
    return top


def overlaps(blocks, arena_bytes: int) -> list[tuple]:
    """Pairs of blocks live at the same time that share a byte, or that leave the arena (none in a
    correct layout; the tests assert it)."""
    live = [b for b in blocks if b.first >= 0]
    bad = [(b, "arena") for b in live if b.offset % ALIGN or b.offset + b.nbytes > arena_bytes]
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if not (a.last < b.first or b.last < a.first) and \
                    a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes:
                bad.append((a, b))
    return bad
