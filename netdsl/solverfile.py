"""Solver files: parse a Caffe SolverParameter (.prototxt / .net) into a SolverConfig, locating
every problem, and find the nets it trains and tests."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass

from .errors import Collector, NetdslError
from .graph import NET_STATE, net_schema
from .schema import F, Msg, Record
from .solver import SolverConfig, validate
from .syntax import Message, parse_file

_ENUMS = {"solver_mode": ("CPU", "GPU"), "snapshot_format": ("BINARYPROTO", "HDF5"),
          "solver_type": ("SGD", "NESTEROV", "ADAGRAD", "RMSPROP", "ADADELTA", "ADAM")}


def solver_schema() -> Msg:
    """SolverParameter's schema, derived from SolverConfig's fields and their types."""
    hints = typing.get_type_hints(SolverConfig)
    fields = {}
    for f in dataclasses.fields(SolverConfig):
        t = hints[f.name]
        origin = typing.get_origin(t)
        args = [a for a in typing.get_args(t) if a is not type(None)]
        repeated = origin is list
        base = args[0] if args else t
        if f.name in ("net_param", "train_net_param", "test_net_param"):
            base = net_schema()
        elif f.name in ("train_state", "test_state"):
            base = NET_STATE
        if f.name in _ENUMS:
            fields[f.name] = F("enum", f.default, choices=_ENUMS[f.name])
        else:
            default = None if repeated or base not in (int, float, bool, str) else f.default
            fields[f.name] = F(base, default, repeated=repeated)
    return Msg("SolverParameter", fields)


@dataclass
class SolverFile:
    path: str
    cfg: SolverConfig
    record: Record
    train_net: tuple[str, Message | None]            # (path, inline AST or None)
    test_nets: list[tuple[str, Message | None]]


def load_solver(path: str) -> SolverFile:
    ast = parse_file(path)
    c = Collector()
    if ast.get("layer") and not ast.get("base_lr"):
        raise NetdslError("E0701", f"{path} is a net, not a solver", ast.fields[0].pos,
                          help="pass a solver file (base_lr, max_iter, net: ...), e.g. nets/lenet_solver.net")
    rec = solver_schema().coerce(ast, c)
    c.raise_if_errors()
    values = {f.name: getattr(rec, f.name) for f in dataclasses.fields(SolverConfig)}
    for key in ("net_param", "train_net_param"):
        values[key] = rec._ast.get(key)[0].value if rec.has(key) else None
    values["test_net_param"] = [f.value for f in ast.get("test_net_param")]
    cfg = SolverConfig(**values)
    for problem in validate(cfg):
        name, _, msg = problem.partition(": ")
        c.error("E0702", f"solver: {problem}", rec.pos(name) if rec.has(name) else ast.fields[0].pos,
                help=_solver_help(name, msg))
    c.raise_if_errors()
    train = _resolve_train(path, cfg, rec, ast, c)
    tests = _resolve_tests(path, cfg, train, c)
    c.raise_if_errors()
    return SolverFile(path, cfg, rec, train, tests)


def _solver_help(name: str, msg: str) -> str:
    if "did you mean" in msg:
        return msg[msg.index("did you mean"):]
    return {"stepsize": "set `stepsize: N` (iterations between lr drops)",
            "test_iter": "give one test_iter per test net (e.g. `test_iter: 100`)"}.get(name, f"fix `{name}`")


def resolve_path(base_file: str, rel: str) -> str | None:
    """Net paths are tried relative to the solver file, then the working directory (Caffe's rule)."""
    for cand in (os.path.join(os.path.dirname(os.path.abspath(base_file)), rel), rel):
        if os.path.exists(cand):
            return cand
    return None


def _resolve_train(path, cfg, rec, ast, c) -> tuple[str, Message | None]:
    given = [k for k in ("net", "train_net", "net_param", "train_net_param") if rec.has(k)]
    if len(given) != 1:
        c.error("E0703", "the solver must name exactly one train net" + (f", got {', '.join(given)}" if given else ""),
                ast.fields[0].pos if ast.fields else None,
                help='add `net: "my.net"` (a path relative to the solver file)' if not given else
                     f"keep one of {', '.join(given)}")
        return ("", None)
    key = given[0]
    if key.endswith("_param"):
        return (path, getattr(cfg, key))
    rel = getattr(cfg, key)
    found = resolve_path(path, rel)
    if found is None:
        c.error("E0704", f"the solver's {key} '{rel}' does not exist", rec.pos(key),
                notes=[f"looked in {os.path.dirname(os.path.abspath(path))} and {os.getcwd()}"],
                help="give a path relative to the solver file or the working directory")
        return ("", None)
    return (found, None)


def _resolve_tests(path, cfg, train, c) -> list[tuple[str, Message | None]]:
    tests = []
    for rel in cfg.test_net:
        found = resolve_path(path, rel)
        if found is None:
            c.error("E0704", f"the solver's test_net '{rel}' does not exist", None,
                    help="give a path relative to the solver file or the working directory")
        tests.append((found or "", None))
    tests += [(path, m) for m in cfg.test_net_param]
    if not cfg.train_net and not cfg.train_net_param:
        # Caffe's generic net (net / net_param): each test_iter beyond the test nets named tests it
        # once more in its TEST phase (with its own test_state, if given)
        tests += [train] * max(len(cfg.test_iter) - len(tests), 0)
    return tests
