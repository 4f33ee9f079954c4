"""The `netdsl` command: the argument parser (subcommands from commands.py) and `main(argv) -> int`
(0 ok, 2 user error, 1 bug: never a traceback unless --debug)."""
from __future__ import annotations

import argparse
import sys
import traceback

from . import commands
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
