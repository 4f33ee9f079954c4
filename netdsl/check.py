"""The checker's front door: file -> parsed, built and shape-inferred graph, with every diagnostic."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import graph as graph_mod
from . import shapes as shapes_mod
from .errors import Collector, Diagnostic, NetdslError
from .graph import Graph
from .registry import Shape
from .syntax import Message, parse_file


@dataclass
class Checked:
    graph: Graph
    shapes: dict[str, Shape]
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


def check(ast: Message, phase: str = "TRAIN", stages=(), level: int = 0, hints: dict | None = None,
          weights: str | None = None) -> Checked:
    """Build and shape-check one phase; raises Errors with every diagnostic when any is an error."""
    c = Collector()
    g = graph_mod.build(ast, phase.upper(), tuple(stages), level, c)
    shapes = shapes_mod.infer(g, dict(hints or {}), c)
    shapes_mod.check_param_specs(g, c)
    shapes_mod.check_shared_params(g, c)
    others = ()
    if any(shapes_mod._anchor_layer(n.layer) for n in g.nodes):     # RPN nets: see every phase's heads
        other = "TEST" if phase.upper() == "TRAIN" else "TRAIN"
        others = (graph_mod.build(ast, other, tuple(stages), level, Collector()),)
    shapes_mod.check_anchors(g, c, others)
    if weights:
        shapes_mod.check_weights(g, load_weights(weights), weights, c)
    if not c.errors:
        shapes_mod.check_usage(g, c)
    c.raise_if_errors()
    return Checked(g, shapes, sorted(c.diagnostics, key=lambda d: (d.pos.line, d.pos.column) if d.pos else (0, 0)))


def check_file(path: str, **kw) -> Checked:
    return check(parse_file(path), **kw)


def is_solver(ast: Message) -> bool:
    """A solver file sets solver fields (base_lr, net, ...) and has no layers."""
    return bool({f.name for f in ast.fields} & graph_mod.SOLVER_FIELDS) and not ast.get("layer") \
        and not ast.get("layers")


def check_path(path: str, phase: str | None = None, **kw) -> tuple[Checked, str, str]:
    """`netdsl check PATH`: a net, or a solver whose net is then checked. Returns the result, the
    net file checked and its phase. A net's phase defaults to TEST (Caffe's NetState default);
    a solver's to TRAIN (the phase its train net runs in; TEST checks its first test net)."""
    ast = parse_file(path)
    if not is_solver(ast):
        phase = (phase or "TEST").upper()
        return check(ast, phase=phase, **kw), path, phase
    from .solverfile import load_solver
    try:
        sf = load_solver(path)                  # validates the solver; locates every problem
    except NetdslError as e:
        raise _relative_paths(e) from None
    phase = (phase or "TRAIN").upper()
    if phase == "TRAIN" or not sf.test_nets:
        (net_path, inline), state = sf.train_net, sf.cfg.train_state
    else:
        (net_path, inline), state = sf.test_nets[0], (sf.cfg.test_state[0] if sf.cfg.test_state else None)
    net_path = _shown(net_path)
    key = next((k for k in ("net", "train_net", "net_param", "train_net_param") if sf.record.has(k)), "net")
    where = (f"checked as the {'train' if phase == 'TRAIN' else 'test'} net of solver {path} "
             f"(`{key}` at {sf.record.pos(key)})")
    if state is not None and not kw.get("stages") and not kw.get("level"):
        kw = {**kw, "stages": tuple(state.stage), "level": state.level}
    try:
        net_ast = inline if inline is not None else parse_file(net_path)
        return check(net_ast, phase=phase, **kw), net_path, phase
    except NetdslError as e:
        for d in e.diagnostics:
            if d.severity == "error":
                d.notes.append(where)
        raise


def _shown(path: str) -> str:
    """A path as diagnostics show it: relative to the working directory when it lies below it."""
    import os
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _relative_paths(e: NetdslError) -> NetdslError:
    """Polish load_solver's diagnostics: its "net not found" note lists absolute directories (show
    them relative to the working directory, as file names are), and a did-you-mean is said once."""
    import os
    for d in e.diagnostics:
        if d.code == "E0702" and "; did you mean" in d.message and d.help and "did you mean" in d.help:
            d.message = d.message.split("; did you mean")[0]
        if d.code == "E0704":
            dirs = [os.path.dirname(os.path.abspath(d.pos.file)) if d.pos else None, os.getcwd()]
            shown = list(dict.fromkeys(os.path.relpath(x) for x in dirs if x))
            d.notes = [f"looked in {' and '.join(shown)}" + (" (the solver's directory and the working directory)"
                                                            if len(shown) > 1 else
                                                            " (the solver's directory, the working directory)")]
    return e


def load_weights(path: str):
    """netdsl weights: an .npz of `<layer>/<i>` arrays (what `netdsl train` snapshots)."""
    import numpy as np
    if path.endswith(".caffemodel"):
        raise NetdslError("E0801", f"{path}: binary .caffemodel files are not read by netdsl",
                          help="convert the weights to .npz arrays named '<layer>/<index>'")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if not k.startswith("__")}
    except FileNotFoundError:
        raise NetdslError("E0801", f"weights file not found: {path}", help="check the path") from None
    except (OSError, ValueError) as e:
        raise NetdslError("E0802", f"cannot read weights {path}: {e}",
                          help="pass an .npz written by `netdsl train` (…_iter_N.npz)") from None
