"""CLI subcommands beyond `check`: compile, data, and the running commands (train, test, time, plot)."""
from __future__ import annotations

import json


def add_parsers(sub, common) -> None:
    p = sub.add_parser("compile", help="lower a net to its execution plan (or JSON, or Graphviz DOT)")
    p.add_argument("file")
    common(p)
    p.add_argument("--emit", choices=("plan", "json", "dot"), default="plan")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("data", help="download a dataset into the data directory (checksum-verified)")
    p.add_argument("dataset", choices=("mnist",))
    p.add_argument("--data-dir", help="where to put it (default: $NETDSL_DATA or the user cache dir)")
    p.add_argument("--force", action="store_true", help="download again even if the files are valid")
    p.set_defaults(func=cmd_data)


def cmd_compile(args) -> int:
    from .check import check_file
    from .cli import parse_shape
    from .errors import render_all
    from .plan import lower
    ch = check_file(args.file, phase=args.phase, stages=args.stage, level=args.level,
                    hints=dict(parse_shape(s) for s in args.shape))
    render_all(ch.diagnostics)
    if args.emit == "dot":
        print(to_dot(ch))
        return 0
    plan = lower(ch)
    print(json.dumps(plan.to_json(), indent=1) if args.emit == "json" else plan.render())
    return 0


def to_dot(ch) -> str:
    """Layers as boxes, blobs as ellipses labelled with their shapes (Caffe's draw_net style)."""
    from .registry import fmt
    g = ch.graph
    q = json.dumps
    lines = [f"digraph {q(g.name or 'net')} {{", "  rankdir=TB;", '  node [fontname="Helvetica"];']
    for n in g.nodes:
        lines.append(f"  {q('L:' + n.name)} [shape=box, style=filled, fillcolor=\"#dde8f5\", "
                     f"label={q(n.layer.type + chr(10) + n.name)}];")
        for b in n.bottoms:
            lines.append(f"  {q('B:' + b)} -> {q('L:' + n.name)};")
        for t in n.tops:
            shape = fmt(ch.shapes[t]) if t in ch.shapes else "?"
            lines.append(f"  {q('B:' + t)} [shape=ellipse, label={q(g.display(t) + chr(10) + shape)}];")
            lines.append(f"  {q('L:' + n.name)} -> {q('B:' + t)};")
    lines.append("}")
    return "\n".join(lines)


def cmd_data(args) -> int:
    from .data.download import download_mnist
    path = download_mnist(args.data_dir, force=args.force)
    print(f"MNIST is ready in {path}")
    return 0
