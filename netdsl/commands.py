"""CLI subcommands beyond `check`: compile, data, and the running commands (train, test, time, plot)."""
from __future__ import annotations

import json


def add_parsers(sub, common) -> None:
    p = sub.add_parser("compile", help="lower a net to its execution plan (or JSON, or Graphviz DOT)")
    p.add_argument("file")
    common(p)
    p.add_argument("--emit", choices=("plan", "json", "dot", "cuda"), default="plan",
                   help="cuda: the generated CUDA of the compiled train step (graph mode)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("data", help="download a dataset into the data directory (checksum-verified)")
    p.add_argument("dataset", choices=("mnist",))
    p.add_argument("--data-dir", help="where to put it (default: $NETDSL_DATA or the user cache dir)")
    p.add_argument("--force", action="store_true", help="download again even if the files are valid")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a net with a Caffe solver file")
    p.add_argument("solver")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--weights", help="initialise from these weights (.npz), copied by layer name")
    g.add_argument("--snapshot", help="resume from a <prefix>_iter_N.solverstate.npz")
    _device(p)
    p.add_argument("--seed", type=int, help="random seed (default: the solver's random_seed)")
    p.add_argument("--max-iter", type=int, help="override the solver's max_iter")
    p.add_argument("--data-dir", help="dataset directory (default: $NETDSL_DATA or the user cache dir)")
    p.add_argument("--out", help="directory for snapshots, log and metrics (default: snapshot_prefix's)")
    p.add_argument("--graph", choices=("on", "off", "auto"), default="auto",
                   help="GPU: capture the whole iteration as one CUDA graph (auto: when the net allows)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="score a trained net: averaged test outputs (accuracy, loss), or proposal "
                                    "recall for a region proposal net")
    p.add_argument("model")
    p.add_argument("--weights", required=True, help="trained weights (.npz)")
    p.add_argument("--iterations", type=int, default=50, help="test batches to average (default 50, as Caffe)")
    _device(p)
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object {output: value}")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("time", help="time forward and backward per layer, like `caffe time`")
    p.add_argument("model")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--phase", choices=("train", "test"), default="train", type=str.lower)
    _device(p)
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_time)

    from . import propose
    propose.add_parsers(sub)            # `propose` and `scenes` (region proposals, netdsl/propose.py)

    p = sub.add_parser("plot", help="plot loss, lr and test accuracy of a training run")
    p.add_argument("run", help="the run directory (or its _metrics.jsonl file)")
    p.add_argument("-o", "--output", default="curves.png")
    p.set_defaults(func=cmd_plot)


def _device(p):
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")


def cmd_compile(args) -> int:
    from .check import check_file
    from .cli import parse_shape
    from .errors import render_all
    from .plan import lower
    ch = check_file(args.file, phase=args.phase, stages=args.stage, level=args.level,
                    hints=dict(parse_shape(s) for s in args.shape))
    render_all(ch.diagnostics)
    if args.emit == "cuda":
        from .gpu.codegen import emit_cuda
        print(emit_cuda(args.file))
        return 0
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
            shape = fmt(ch.blobs[t]) if t in ch.blobs else "?"
            lines.append(f"  {q('B:' + t)} [shape=ellipse, label={q(g.display(t) + chr(10) + shape)}];")
            lines.append(f"  {q('L:' + n.name)} -> {q('B:' + t)};")
    lines.append("}")
    return "\n".join(lines)


def cmd_data(args) -> int:
    from .data.download import download_mnist
    path = download_mnist(args.data_dir, force=args.force)
    print(f"MNIST is ready in {path}")
    return 0


def cmd_train(args) -> int:
    from .backend import get_backend
    from .train import Trainer
    trainer = Trainer(args.solver, get_backend(args.device), seed=args.seed, max_iter=args.max_iter,
                      data_dir=args.data_dir, out=args.out, graph=args.graph)
    if args.weights:
        loaded = trainer.net.load(args.weights)
        trainer.log(f"Copied weights of {len(loaded)} layers from {args.weights}", echo=True)
    if args.snapshot:
        trainer.restore(args.snapshot)
    result = trainer.run()
    if result.interrupted:
        return 130
    print(f"trained {result.iterations} iterations in {result.seconds:.1f} s; weights: {result.last_snapshot}.npz")
    return 0


def test_outputs(model, weights, iterations, backend, data_dir=None, seed=0) -> dict[str, float]:
    """Average each scalar output of the TEST net over `iterations` batches."""
    from .executor import build_net
    net = build_net(model, "TEST", backend, weights=weights, seed=seed, data_dir=data_dir)
    sums: dict[str, float] = {}
    for _ in range(iterations):
        for k, v in net.forward().items():
            if v.size == 1:
                sums[k] = sums.get(k, 0.0) + float(v.reshape(-1)[0])
    return {k: v / iterations for k, v in sums.items()}


def cmd_test(args) -> int:
    from . import evaluate
    from .backend import get_backend
    if evaluate.has_proposal(args.model):       # an RPN: proposal recall over held-out scenes
        return evaluate.cmd_test_recall(args)
    means = test_outputs(args.model, args.weights, args.iterations, get_backend(args.device), args.data_dir,
                         args.seed)
    if args.json:
        print(json.dumps(means))
    else:
        for k, v in means.items():
            print(f"{k} = {v:.6g}")
    return 0


def cmd_time(args) -> int:
    from .backend import get_backend
    from .timing import render_timing, time_net
    report = time_net(args.model, args.phase.upper(), args.iterations, get_backend(args.device), args.data_dir)
    print(json.dumps(report) if args.json else render_timing(report))
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run
    path = plot_run(args.run, args.output)
    print(f"wrote {path}")
    return 0
