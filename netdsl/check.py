"""The checker's front door: file -> parsed, built and shape-inferred graph, with every diagnostic."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import graph as graph_mod, shapes as shapes_mod
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
    if weights:
        shapes_mod.check_weights(g, load_weights(weights), weights, c)
    if not c.errors:
        shapes_mod.check_usage(g, c)
    c.raise_if_errors()
    return Checked(g, shapes, sorted(c.diagnostics, key=lambda d: (d.pos.line, d.pos.column) if d.pos else (0, 0)))


def check_file(path: str, **kw) -> Checked:
    return check(parse_file(path), **kw)


def load_weights(path: str) -> dict[str, np.ndarray]:
    """netdsl weights: an .npz of `<layer>/<i>` arrays (what `netdsl train` snapshots)."""
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
