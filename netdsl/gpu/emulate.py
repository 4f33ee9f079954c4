"""Run compiled Programs with NumPy: the CPU oracle of the GPU step.

Every kernel's description (gpu/kernel.py) carries a NumPy twin with the same semantics (addressing
included: GEMM operands are strided views of the flat buffers, bounds-checked); this runs them over
one byte array laid out exactly as the device arena, so a liveness or aliasing mistake in the
planner shows up on the CPU.
The tests compare this against the eager executor, and the CUDA kernels against this.
"""
from __future__ import annotations

import numpy as np

from .kernel import F32, kernels
from .program import Program, Ref


class Memory:
    """The device's buffers on the host: the arena plus named persistent buffers."""

    def __init__(self, arena_bytes: int, buffers: dict[str, np.ndarray]):
        self.arena = np.zeros(max(arena_bytes, 256), np.uint8)
        self.buffers = buffers

    def resolve(self, program: Program, ref: Ref | None):
        if ref is None:
            return None
        if ref.space == "arena":
            t = program.tensors[ref.name]
            dtype = np.int32 if t.dtype == "i32" else F32
            return self.arena[t.offset:t.offset + t.nbytes].view(dtype)
        buf = self.buffers[ref.space]
        end = ref.offset + ref.count if ref.count else len(buf)
        assert end <= len(buf), f"{ref} runs past buffer {ref.space} ({len(buf)})"
        return buf[ref.offset:end]


def run(program: Program, mem: Memory) -> None:
    table = kernels()
    for launch in program.launches:
        args = [mem.resolve(program, a) if isinstance(a, Ref) or a is None else a for a in launch.args]
        table[launch.kind].twin(launch.params, *args)
