"""Kernels written as LLVM IR and compiled by LLVM (through llvmlite, which Numba brings), for
the loops Numba's code generation does not vectorise well: explicit vector types, every shape
a constant of its kernel. The Numba drivers call a kernel through a trampoline, a function of
fixed name that takes the kernel's address as its first argument, so the drivers cache on disk
and link to it again in the next process (as blas.py's GEMMs)."""
from __future__ import annotations

import functools

import numpy as np
from numba import types, uintp

_ENGINES = []          # LLVM execution engines: the kernels' code lives as long as they do


@functools.cache
def _llvm():
    """(llvmlite.binding, the host's target machine, the vector width in bits)."""
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    features = llvm.get_host_cpu_features()
    bits = 512 if features.get("avx512f") else 256
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=features.flatten(), opt=3)
    return llvm, tm, bits


def compile_ir(ir: str, name: str) -> int:
    """The address of function `name` of the IR module `ir`, compiled for this CPU."""
    llvm, tm, _ = _llvm()
    mod = llvm.parse_assembly(ir)
    mod.verify()
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    _ENGINES.append(engine)
    return engine.get_function_address(name)


def fresh_name(prefix: str) -> str:
    """A function name no compiled kernel has yet."""
    return f"{prefix}_{len(_ENGINES)}"


def lanes(dtype) -> int:
    """Elements per vector register for `dtype` on this CPU."""
    return _llvm()[2] // (8 * np.dtype(dtype).itemsize)


def budget() -> int:
    """How many vector accumulators a kernel keeps (the registers less operands and spares)."""
    return 24 if _llvm()[2] == 512 else 12


def splat(n: int, ty: str, value: str, name: str) -> list[str]:
    """IR lines that make %name a vector of n copies of `value` (a register or a constant)."""
    return [f"  %{name}.0 = insertelement <{n} x {ty}> poison, {ty} {value}, i64 0",
            f"  %{name} = shufflevector <{n} x {ty}> %{name}.0, <{n} x {ty}> poison, <{n} x i32> zeroinitializer"]


def trampoline(name: str, params: tuple[str, ...]):
    """Register netdsl_<name>(fn, args...), which calls the kernel at address fn with args of
    the IR types `params` ("ptr", "i64" or "double"); returns it as Numba's ExternalFunction
    (pointers and fn as uintp, i64 as int64, double as float64). Raises RuntimeError where this
    LLVM cannot compile it."""
    outer = ", ".join(["i64 %fn"] + [f"{'double' if p == 'double' else 'i64'} %a{i}" for i, p in enumerate(params)])
    L = [f"define void @netdsl_{name}({outer}) {{", "  %f = inttoptr i64 %fn to ptr"]
    L += [f"  %p{i} = inttoptr i64 %a{i} to ptr" for i, p in enumerate(params) if p == "ptr"]
    inner = ", ".join(f"ptr %p{i}" if p == "ptr" else f"{p} %a{i}" for i, p in enumerate(params))
    L += [f"  call void %f({inner})", "  ret void", "}"]
    _llvm()[0].add_symbol(f"netdsl_{name}", compile_ir("\n".join(L), f"netdsl_{name}"))
    numba_types = {"ptr": uintp, "i64": types.int64, "double": types.float64}
    return types.ExternalFunction(f"netdsl_{name}", types.void(uintp, *(numba_types[p] for p in params)))


def register(name: str, params: tuple[str, ...], probe):
    """(the trampoline netdsl_<name>, None) once it and `probe(dtype)` (a kernel of each kind the
    module generates) compile for float32 and float64; or (None, why this LLVM cannot: their IR is
    written in current LLVM syntax, tested with LLVM 22), and the ops use the Numba kernels and
    GEMMs instead."""
    try:
        fn = trampoline(name, params)
        for dtype in (np.dtype(np.float32), np.dtype(np.float64)):
            probe(dtype)
    except RuntimeError as err:
        # llvmlite itself, not _llvm(): that may be what failed
        import llvmlite.binding as llvm
        return None, f"LLVM {'.'.join(map(str, llvm.llvm_version_info))} cannot compile the generated kernels ({err})"
    return fn, None
