"""Compiled-step IR: tensors, kernel launches, the device arena planner and GEMM tiling.

A Program is the ordered list of kernel launches of one step (a training iteration, or one test
batch). Arena tensors are laid out by liveness over that list (first to last launch that touches
them), so activations, saved masks, columns and gradients reuse memory as the plan allows.
Persistent buffers (params, grads, history, datasets, counters) live outside the arena.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..memory import overlaps, place

THREADS = 256                    # the block size of every kernel except the tiny ones
SMS = 132                        # H100 SXM; only steers tiling heuristics, never correctness
DTYPES = {"f32": 4, "i32": 4}


class Unsupported(Exception):
    """Why graph mode cannot run a plan; the message names the layer or setting."""


@dataclass
class Tensor:
    """A buffer in the arena: `count` elements of `dtype`, live from launch `first` to `last`."""
    name: str
    count: int
    dtype: str = "f32"
    first: int = -1
    last: int = -1
    offset: int = -1             # bytes into the arena

    @property
    def nbytes(self) -> int:
        return self.count * DTYPES[self.dtype]


@dataclass(frozen=True)
class Ref:
    """A kernel pointer argument: an arena tensor, or element `offset` of a persistent buffer."""
    space: str                   # "arena" or the persistent buffer's name
    name: str = ""               # the arena tensor's name
    offset: int = 0              # elements (persistent buffers)
    count: int = 0               # elements the kernel may touch (persistent buffers; for checks)


@dataclass
class Launch:
    kind: str                    # which library template (see codegen / emulate)
    symbol: str                  # the extern "C" kernel name
    params: dict                 # compile-time constants baked into the specialisation
    args: list                   # Ref | None | scalar, in the kernel's signature order
    grid: tuple
    block: tuple
    note: str = ""               # what it does, for --emit cuda and error messages


@dataclass
class Program:
    name: str
    launches: list[Launch]
    tensors: dict[str, Tensor]
    outputs: list[str] = field(default_factory=list)     # test programs: accumulator names in order
    sems: int = 0                # split-K tickets the GEMMs need
    data: list = field(default_factory=list)             # (data layer, split) per gather
    window: int = 1              # rows of the batch-index window (iterations ahead)
    counter: int = 0             # which device counter this program advances
    arena_bytes: int = 0

    def refs(self, launch: Launch):
        return [a for a in launch.args if isinstance(a, Ref)]


def plan_arena(program: Program) -> int:
    """Compute every arena tensor's live range from the launches (first to last launch that
    touches it), then place them with the memory planner. Returns the arena size in bytes (also
    stored on the program)."""
    for t in program.tensors.values():
        t.first, t.last = -1, -1
    for i, launch in enumerate(program.launches):
        for r in program.refs(launch):
            if r.space != "arena":
                continue
            t = program.tensors[r.name]
            t.first = i if t.first < 0 else t.first
            t.last = i
    program.arena_bytes = place(program.tensors.values())
    return program.arena_bytes


def check_arena(program: Program) -> None:
    """Assert that no two tensors live at the same time share a byte (used by the tests)."""
    bad = overlaps(program.tensors.values(), program.arena_bytes)
    assert not bad, bad


# ------------------------------------------------------------------------------------ GEMM tiling

TILES = ((64, 64), (32, 64), (64, 32), (32, 32))


@dataclass(frozen=True)
class Tiling:
    bm: int
    bn: int
    bk: int
    splits: int
    kchunk: int
    grid: tuple


def choose_tiling(m: int, n: int, kt: int, batch: int, sms: int = SMS) -> Tiling:
    """Pick a tile (BM x BN x BK) and a split of the reduction for an M x N x KT GEMM repeated
    `batch` times, by a cost model in cycles: each k-tile of a block costs the larger of its
    instructions (times the warps sharing its SM, over 4 schedulers) and a global load's latency
    (the next tile is prefetched while this one is multiplied); a split GEMM adds the last block's
    serial sum of the partial tiles from L2. A model, not a search on the device."""
    bk = 8 if kt <= 32 else 16
    best = None
    for bm, bn in TILES:
        tm, tn = bm // 16, bn // 16
        tiles = math.ceil(m / bm) * math.ceil(n / bn) * batch
        for splits in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            kchunk = math.ceil(math.ceil(kt / splits) / bk) * bk
            real = math.ceil(kt / kchunk)
            if real < splits and splits > 1:
                break
            blocks = tiles * real
            warps = 8 * min(8, math.ceil(blocks / sms))          # resident warps per SM
            waves = math.ceil(blocks / (sms * 8))
            per_ktile = max(bk * (tm * tn + tm + tn + 1) * warps / 4, 600)
            reduce = tm * tn * math.ceil(real / 8) * 300 + 1000 if real > 1 else 0
            cost = waves * (kchunk // bk * per_ktile + reduce)
            key = (cost, real, -bm * bn)
            if best is None or key < best[0]:
                best = (key, Tiling(bm, bn, bk, real, kchunk, (math.ceil(n / bn), math.ceil(m / bm), batch * real)))
    return best[1]
