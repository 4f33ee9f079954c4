"""The `netdsl` command: the argument parser (subcommands from commands.py) and `main(argv) -> int`
(0 ok, 2 user error, 1 bug: never a traceback unless --debug)."""
from __future__ import annotations

import argparse
import sys
import traceback

from . import commands, memory
from .errors import EXIT_BUG, EXIT_OK, EXIT_USER, NetdslError, render_all


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a netdsl user error (exit 2), not SystemExit noise."""

    def error(self, message):
        raise NetdslError("E0000", f"{self.prog}: {message}", help=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = _Parser(prog="netdsl", description="Check, compile, train, test and time .net / Caffe prototxt nets.")
    ap.add_argument("--version", action="version", version=f"netdsl {__version__}")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    commands.add_parsers(sub)
    for name in RUNS_NETS:
        if name in sub.choices:
            sub.choices[name].add_argument(
                "--memory-limit", metavar="SIZE", default=None,
                help="refuse a net needing more memory than SIZE (8G, 512M; default: what is available; off: no check)")
    return ap


# the commands that allocate a net's blobs (or a scene): they check its memory need first
RUNS_NETS = ("train", "test", "time", "propose", "scenes", "export", "detect", "gradcheck")


def _quiet_float_warnings():
    """NumPy's overflow / invalid-value RuntimeWarnings (with NumPy's source paths) say nothing a
    user can act on: a run that diverges is stopped by netdsl's own NaN/Inf check (E0710), which
    names the layer. The CLI silences them; the Python API leaves NumPy's settings alone."""
    import numpy as np
    return np.errstate(all="ignore")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            build_parser().print_help()
            return EXIT_USER
        try:                # every run sets it: an in-process caller's earlier --memory-limit never lingers
            memory.set_limit(getattr(args, "memory_limit", None) or "auto")
        except ValueError as e:
            raise NetdslError("E0775", f"--memory-limit: {e}", help="e.g. --memory-limit 8G, or off") from None
        with _quiet_float_warnings():
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
