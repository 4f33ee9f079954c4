"""Generate CUDA C for compiled Programs: the kernel library plus one extern "C" specialisation per
launch, with every shape and stride baked in as a compile-time constant."""
from __future__ import annotations

from .library import CUDA_LIBRARY
from .program import Launch, Program

# kind -> (kernel parameters, the library template, its template arguments in order)
KINDS = {
    "gather": ("const nd_u8* images, const nd_u8* labels, const int* seq, const int* counter, float mean, "
               "float scale, float* x, float* y", "nd_gather", ("N", "D", "WIN", "MEAN", "SCALE"),
               "images, labels, seq, counter, mean, scale, x, y"),
    "im2col": ("const float* x, float* col", "nd_im2col",
               ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW"), "x, col"),
    "col2im": ("const float* col, float* dx", "nd_col2im",
               ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW", "ACC"), "col, dx"),
    "maxpool_fwd": ("const float* x, float* y, int* mask", "nd_maxpool_fwd",
                    ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW"), "x, y, mask"),
    "maxpool_bwd": ("const float* dy, const int* mask, float* dx", "nd_maxpool_bwd",
                    ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW", "ACC"), "dy, mask, dx"),
    "avepool_fwd": ("const float* x, float* y", "nd_avepool_fwd",
                    ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW"), "x, y"),
    "avepool_bwd": ("const float* dy, float* dx", "nd_avepool_bwd",
                    ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW", "ACC"), "dy, dx"),
    "bias_grad": ("const float* dy, float* db", "nd_bias_grad", ("N", "M", "P", "ACC"), "dy, db"),
    "col_sum": ("const float* dy, float* db", "nd_col_sum", ("N", "M", "ACC"), "dy, db"),
    "relu_fwd": ("const float* x, float* y, float slope", "nd_relu_fwd", ("CNT",), "x, y, slope"),
    "relu_bwd": ("const float* dy, const float* y, float* dx, float slope", "nd_relu_bwd", ("CNT", "ACC"),
                 "dy, y, dx, slope"),
    "zero": ("float* p", "nd_zero", ("CNT",), "p"),
    "softmax_loss": ("const float* x, const float* label, float* dx, float* hist, double* accum, const int* counter, "
                     "int cap, int ignore_label, float loss_weight", "nd_softmax_loss",
                     ("N", "C", "GRAD", "ACC_GRAD", "HAS_IGNORE", "NORM", "TO_HISTORY", "ADD"),
                     "x, label, dx, hist, accum, counter, cap, ignore_label, loss_weight"),
    "accuracy": ("const float* x, const float* label, double* accum, int ignore_label", "nd_accuracy",
                 ("N", "C", "TOPK", "HAS_IGNORE"), "x, label, accum, ignore_label"),
}
GEMM_CONSTANTS = ("TA", "TB", "M", "N", "K", "R", "LDA", "LDB", "LDC", "SA", "SB", "SC", "RA", "RB",
                  "BETA", "BIAS", "ACT", "BM", "BN", "BK", "SPLITS", "KCHUNK")
LIBRARY_KERNELS = {"sgd": "nd_sgd_update", "advance": "nd_advance"}


def kernel_name(launch: Launch) -> str:
    """The symbol to look up in the compiled module."""
    return LIBRARY_KERNELS.get(launch.kind, launch.symbol)


def _bool(v) -> str:
    return "true" if v else "false"


def specialise(launch: Launch) -> str:
    """The extern "C" kernel for one launch (empty for the library's own kernels)."""
    p, sym = launch.params, launch.symbol
    if launch.kind in LIBRARY_KERNELS:
        return ""
    head = f"// {launch.note}\n"
    if launch.kind == "gemm":
        consts = ", ".join(f"{k} = {int(p[k])}" for k in GEMM_CONSTANTS)
        return (head + f"struct {sym}_g {{ static constexpr int {consts}; }};\n"
                f'extern "C" __global__ void __launch_bounds__(256) {sym}(const float* A, const float* B, float* C, '
                f"float* bias, const float* aux, float* ws, unsigned* sems, float slope) {{\n"
                f"    nd_gemm<{sym}_g>(A, B, C, bias, aux, ws, sems, slope);\n}}\n")
    sig, template, names, call = KINDS[launch.kind]
    targs = ", ".join(_bool(p[n]) if n in ("MEAN", "SCALE", "ACC", "GRAD", "ACC_GRAD", "HAS_IGNORE", "TO_HISTORY", "ADD")
                      else str(int(p[n])) for n in names)
    return (head + f'extern "C" __global__ void {sym}({sig}) {{\n'
            f"    {template}<{targs}>({call});\n}}\n")


def schedule_comment(program: Program) -> str:
    lines = [f"// program '{program.name}': {len(program.launches)} launches, arena "
             f"{program.arena_bytes / 1024:.1f} KiB"]
    for i, launch in enumerate(program.launches):
        lines.append(f"//   {i:2d} {kernel_name(launch):<34} grid {launch.grid} block {launch.block[0]}: {launch.note}")
    return "\n".join(lines)


def generate(programs: list[Program], title: str = "net") -> str:
    """The complete CUDA translation unit for these programs."""
    out = [f"// netdsl: generated CUDA for {title}. Compiled by CuPy (NVRTC) for `--graph on`;",
           "// each launch below is captured once into a CUDA graph and replayed per iteration."]
    for prog in programs:
        out.append(schedule_comment(prog))
    out.append(CUDA_LIBRARY)
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
