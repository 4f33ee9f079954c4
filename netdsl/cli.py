"""The `netdsl` command: argparse subcommands; `main(argv) -> int` (0 ok, 2 user error, 1 bug)."""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from .errors import NetdslError, render_all

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a netdsl user error (exit 2), not SystemExit noise."""

    def error(self, message):
        raise NetdslError("E0000", f"{self.prog}: {message}", help=f"see `{self.prog} --help`")


def parse_shape(text: str) -> tuple[str, tuple]:
    name, eq, dims = text.partition("=")
    try:
        if not eq or not name:
            raise ValueError
        shape = tuple(None if d.strip() == "?" else int(d) for d in dims.split(","))
        if any(d is not None and d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise NetdslError("E0504", f"--shape {text!r} is not BLOB=D1,D2,...", help="e.g. --shape data=64,3,227,227 "
                          "(positive integers; ? for a dimension known only at run time)") from None
    return name, shape


def _common(p, phase_default="test"):
    p.add_argument("--phase", choices=("train", "test"), default=phase_default, type=str.lower,
                   help=f"which phase's net to build (default: {phase_default}, as Caffe's NetState)")
    p.add_argument("--stage", action="append", default=[], help="a NetState stage (repeatable)")
    p.add_argument("--level", type=int, default=0, help="the NetState level")
    p.add_argument("--shape", action="append", default=[], metavar="BLOB=D1,D2,...",
                   help="the shape of a data blob that can't be known without its data (repeatable)")


def cmd_check(args) -> int:
    from .check import check_path
    from .summary import render_table, to_json
    net, phase = args.file, args.phase or "test"
    try:
        hints = dict(parse_shape(s) for s in args.shape)
        ch, net, phase = check_path(args.file, phase=args.phase, stages=args.stage, level=args.level,
                                    hints=hints, weights=args.weights)
    except NetdslError as e:
        if args.json:
            print(json.dumps(to_json(None, net, phase, e.diagnostics), indent=1))
        else:
            render_all(e.diagnostics)
        return EXIT_USER
    diagnostics = ch.diagnostics
    fail = bool(args.werror and ch.warnings)
    if fail:
        diagnostics = [_as_error(d) for d in diagnostics]
    if args.json:
        out = to_json(ch, net, phase, diagnostics)
        out["ok"] = not fail
        print(json.dumps(out, indent=1))
    else:
        render_all(diagnostics)
        if not fail:
            print(render_table(ch))
    return EXIT_USER if fail else EXIT_OK


def _as_error(d):
    """--werror: a warning becomes an error (same code, a note saying why)."""
    from dataclasses import replace
    if d.severity != "warning":
        return d
    return replace(d, severity="error", notes=list(d.notes) + ["this warning is an error because of --werror"])


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = _Parser(prog="netdsl", description="Check, compile, train, test and time .net / Caffe prototxt nets.")
    ap.add_argument("--version", action="version", version=f"netdsl {__version__}")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("check", help="parse and shape-check a net (or a solver's train net); print a summary table")
    p.add_argument("file")
    _common(p)
    p.add_argument("--weights", help="check these weights (.npz) against the net's param shapes")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--werror", action="store_true", help="fail (exit 2) on warnings too")
    # the phase defaults to TEST for a net and TRAIN for a solver (see check.check_path)
    p.set_defaults(func=cmd_check, phase=None)
    next(a for a in p._actions if a.dest == "phase").help = \
        "which phase's net to build (default: test for a net, as Caffe's NetState; train for a solver)"

    from . import commands
    commands.add_parsers(sub, _common)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return EXIT_USER
        return args.func(args)
    except NetdslError as e:
        if debug:
            traceback.print_exc()
        render_all(e.diagnostics)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug in netdsl, never the user's fault
        if debug:
            traceback.print_exc()
        else:
            print(f"netdsl: internal error: {type(e).__name__}: {e}\n"
                  "this is a bug in netdsl; rerun with --debug for a traceback and report it", file=sys.stderr)
        return EXIT_BUG
