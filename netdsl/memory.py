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


# -- the memory budget: refuse a net that cannot fit before allocating it --------------------

_limit: int | None | str = "auto"          # set by the CLI's --memory-limit; "auto": what is available


def set_limit(value: int | str | None) -> None:
    """The process-wide budget: bytes, a size like "8G", "auto" (available memory, the default)
    or "off"/None (no check)."""
    global _limit
    _limit = parse_size(value)


def parse_size(value: int | str | None) -> int | None | str:
    """8G, 512M, 1.5GiB, 1000000 -> bytes; "auto" stays "auto"; "off", 0 and None -> None."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value or None
    text = str(value).strip().lower()
    if text in ("auto", "off", "none", "0"):
        return None if text != "auto" else "auto"
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.rstrip("ib").rstrip("kmgt")
    unit = text[len(number):].rstrip("ib")
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a memory size: {value!r} (e.g. 8G, 512M, auto or off)") from None
    if not size > 0:
        raise ValueError(f"not a memory size: {value!r} (must be positive)")
    return int(size)


def available_bytes() -> int | None:
    """Memory this process can still take: Linux's MemAvailable, capped by the cgroup (container)
    limit less its current use; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f, open(usage) as g:
                cap = f.read().strip()
                if cap.isdigit() and int(cap) < 1 << 60:
                    found.append(int(cap) - int(g.read().strip()))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def require(need: int, what: str, notes=(), limit: int | str | None = "default", hint: str = "") -> None:
    """Refuse (E0775) to allocate `need` bytes for `what` when they exceed the budget: the
    --memory-limit / memory_limit given, else the memory available now; "off" skips the check."""
    from .errors import NetdslError
    from .summary import human_bytes
    try:
        limit = _limit if limit == "default" else parse_size(limit)
    except ValueError as e:
        raise NetdslError("E0775", str(e), help="e.g. --memory-limit 8G, or off to skip the check") from None
    if limit is None:
        return
    budget, source = (available_bytes(), "the memory available now") if limit == "auto" else (limit, "the memory limit")
    if budget is not None and need > budget:
        raise NetdslError("E0775", f"{what} needs about {human_bytes(need)}, more than {source} ({human_bytes(budget)})",
                          notes=list(notes), help=(f"{hint}; or " if hint else "") + "make it smaller (batch, image "
                          "size); --memory-limit SIZE (or off) in the CLI, memory_limit= in the API, overrides the check")
