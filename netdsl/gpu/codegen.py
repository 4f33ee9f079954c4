"""Generate CUDA C for compiled Programs: the prelude, the source of every kernel the programs use,
and one extern "C" specialisation per launch, with every shape and stride baked in as a
compile-time constant."""
from __future__ import annotations

from .kernel import PRELUDE, kernels, specialise, symbol
from .program import Program


def schedule_comment(program: Program) -> str:
    lines = [f"// program '{program.name}': {len(program.launches)} launches, arena "
             f"{program.arena_bytes / 1024:.1f} KiB"]
    for i, launch in enumerate(program.launches):
        lines.append(f"//   {i:2d} {symbol(launch):<34} grid {launch.grid} block {launch.block[0]}: {launch.note}")
    return "\n".join(lines)


def generate(programs: list[Program], title: str = "net") -> str:
    """The complete CUDA translation unit for these programs."""
    out = [f"// netdsl: generated CUDA for {title}. Compiled by CuPy (NVRTC) for `--graph on`;",
           "// each launch below is captured once into a CUDA graph and replayed per iteration."]
    for prog in programs:
        out.append(schedule_comment(prog))
    out.append(PRELUDE)
    used = {launch.kind for prog in programs for launch in prog.launches}
    out += [k.source for kind, k in kernels().items() if kind in used and k.source]
    for prog in programs:
        out.append(f"// ---------------------------------------------------------------- program {prog.name}")
        seen = set()
        for launch in prog.launches:
            if launch.symbol in seen:
                continue
            seen.add(launch.symbol)
            text = specialise(launch)
            if text:
                out.append(text)
    return "\n".join(out)


def emit_cuda(path: str, solver=None) -> str:
    """`netdsl compile FILE --emit cuda`: the train iteration (and the test step) of a net file, or of
    the net a solver file names, with the solver's update (SGD defaults without a solver)."""
    from ..check import check_file
    from ..errors import NetdslError
    from ..plan import lower
    from ..solver import SolverConfig
    from .lower import Unsupported, lower_test, lower_train, param_layout
    cfg = solver or SolverConfig(base_lr=0.01, momentum=0.9)
    try:
        train = lower(check_file(path, phase="TRAIN"), runnable=True)
        layout = param_layout(train)
        programs = [lower_train(train, layout, 1024, cfg)]
        try:
            test = lower(check_file(path, phase="TEST"), runnable=True)
            programs.append(lower_test(test, layout, 0, 100))
        except (Unsupported, NetdslError):
            pass
    except Unsupported as e:
        raise NetdslError("E0805", f"no CUDA to emit: graph mode cannot compile this net: {e}",
                          help="graph mode covers MNIST data, Convolution, Pooling, InnerProduct, ReLU, "
                               "SoftmaxWithLoss and Accuracy with the SGD solver") from None
    return generate(programs, f"net '{train.name}'")
