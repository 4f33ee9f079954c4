"""The CLI's subcommands: check, compile, data, and the running commands (train, test, time,
plot; propose and scenes in propose.py). cli.py parses and dispatches to them."""
from __future__ import annotations

import json

from .errors import EXIT_OK, EXIT_USER, NetdslError, render_all


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


def net_options(p, phase_default="test"):
    """The options that choose and shape one phase of a net (check, compile)."""
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


def add_parsers(sub) -> None:
    p = sub.add_parser("check", help="parse and shape-check a net (or a solver's train net); print a summary table")
    p.add_argument("file")
    net_options(p)
    p.add_argument("--weights", help="check these weights (.npz) against the net's param shapes")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--werror", action="store_true", help="fail (exit 2) on warnings too")
    # the phase defaults to TEST for a net and TRAIN for a solver (see check.check_path)
    p.set_defaults(func=cmd_check, phase=None)
    next(a for a in p._actions if a.dest == "phase").help = \
        "which phase's net to build (default: test for a net, as Caffe's NetState; train for a solver)"


    p = sub.add_parser("compile", help="lower a net to its execution plan (or JSON, or Graphviz DOT)")
    p.add_argument("file")
    net_options(p)
    p.add_argument("--emit", choices=("plan", "json", "dot", "cuda"), default="plan",
                   help="cuda: the generated CUDA of the compiled train step (graph mode)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("convert", help="convert weights between Caffe's .caffemodel and netdsl's .npz")
    p.add_argument("input", help="a .caffemodel (V1 or V2) or .npz")
    p.add_argument("output", help="the file to write: .caffemodel or .npz, by its suffix")
    p.add_argument("--net", help="a net file: check the weights against it, and take the layer types from it")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("upgrade", help="rewrite a V1 net file (or an old solver file) in the current format")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="write here (default: print to stdout)")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("export", help="export a net's TEST phase (and its weights) to ONNX, with Caffe's semantics")
    p.add_argument("file")
    p.add_argument("--weights", help="the trained weights (.caffemodel or .npz); without them the fillers' values")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="the ONNX opset (13 or later; default 17)")
    p.add_argument("--batch", help="the batch size of every input: N, or `dynamic` (default: the net's)")
    p.add_argument("--outputs", help="cut the graph at these blobs (comma-separated; default: the blobs nothing reads)")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="fold BatchNorm (and the Scale after it) into the Convolution before it")
    p.add_argument("--shape", action="append", default=[], metavar="BLOB=D1,D2,...",
                   help="the shape of a data blob that can't be known without its data (repeatable)")
    p.add_argument("--verify", action="store_true",
                   help="run the model with onnxruntime on random input and compare with netdsl's forward")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="download MNIST; make LMDBs, mean files and exports for the data layers")
    tools = p.add_subparsers(dest="dataset", required=True, metavar="{mnist,convert-imageset,compute-mean,export-mnist}")
    p = tools.add_parser("mnist", help="download MNIST into the data directory (checksum-verified)")
    p.add_argument("--data-dir", help="where to put it (default: $NETDSL_DATA or the user cache dir)")
    p.add_argument("--force", action="store_true", help="download again even if the files are valid")
    p.set_defaults(func=cmd_data)
    p = tools.add_parser("convert-imageset", help="images + a `path label` list file -> an LMDB of Datums (Caffe's "
                         "convert_imageset)")
    p.add_argument("root", help="prepended to each path of the list (as written: end it with /)")
    p.add_argument("list", help="the list file: `path label` per line")
    p.add_argument("out_db", help="the LMDB directory to create")
    p.add_argument("--resize", metavar="H,W", help="resize every image to H x W")
    p.add_argument("--shuffle", action="store_true", help="shuffle the lines (by --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gray", action="store_true", help="store gray images (1 channel)")
    p.add_argument("--encoded", action="store_true", help="store encoded images instead of raw pixels")
    p.add_argument("--encode-type", choices=("png", "jpg"), default="png", help="with --encoded (default png)")
    p.set_defaults(func=cmd_data_tool)
    p = tools.add_parser("compute-mean", help="the mean image of an LMDB -> mean.binaryproto (compute_image_mean)")
    p.add_argument("db")
    p.add_argument("-o", "--output", required=True, help="the .binaryproto to write")
    p.set_defaults(func=cmd_data_tool)
    p = tools.add_parser("export-mnist", help="MNIST as a PNG folder + list files, an LMDB, or HDF5 files")
    p.add_argument("out", help="the directory to write into")
    p.add_argument("--format", choices=("png", "lmdb", "hdf5"), required=True)
    p.add_argument("--limit", type=int, help="only the first N images of each split")
    p.add_argument("--color", action="store_true", help="digits tinted at random on 32x32 colour canvases (3 channels)")
    p.add_argument("--data-dir", help="where MNIST is (default: $NETDSL_DATA or the user cache dir)")
    p.set_defaults(func=cmd_data_tool)

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
    p.add_argument("--procs", type=int, help="data-parallel training on N processes of this machine (runs mpiexec "
                                             "-n N; see docs/distributed.md)")
    p.add_argument("--step-timeout", type=float, default=600.0,
                   help="several ranks: seconds a rank waits for the others before stopping them all (default 600)")
    p.add_argument("--debug-info", action="store_true",
                   help="as the solver's debug_info: true: Caffe's per-layer data/diff lines on display iterations")
    _cpu_kernels(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="score a trained net: averaged test outputs (accuracy, loss), proposal "
                                    "recall for a region proposal net, or mAP@0.5 for a detector")
    p.add_argument("model")
    p.add_argument("--weights", required=True, help="trained weights (.npz)")
    p.add_argument("--iterations", type=int, default=50, help="test batches to average (default 50, as Caffe)")
    _device(p)
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object {output: value}")
    p.add_argument("--stage", action="append", default=[], help="a NetState stage of the TEST net (repeatable)")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("time", help="time forward and backward per layer, like `caffe time`")
    p.add_argument("model")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--phase", choices=("train", "test"), default="train", type=str.lower)
    _device(p)
    p.add_argument("--data-dir")
    p.add_argument("--json", action="store_true")
    _cpu_kernels(p)
    p.set_defaults(func=cmd_time)

    p = sub.add_parser("gradcheck", help="check every layer's backward against central differences, in float64")
    p.add_argument("model")
    p.add_argument("--shape", action="append", default=[], metavar="BLOB=D1,D2,...",
                   help="the shape of a data blob that can't be known without its data (repeatable)")
    p.add_argument("--layers", help="check only these layers (comma-separated names)")
    p.add_argument("--eps", type=float, default=1e-5, help="the central-difference step (default 1e-5)")
    p.add_argument("--tol", type=float, default=1e-5, help="the tolerance, relative to max(1, |gradient|) "
                                                           "(default 1e-5)")
    p.add_argument("--samples", type=int, default=40, help="coordinates checked per large blob (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=("train", "test"), default="train", type=str.lower)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_gradcheck)

    from . import propose
    propose.add_parsers(sub)            # `propose` and `scenes` (region proposals, netdsl/propose.py)
    from . import detect
    detect.add_parsers(sub)             # `detect` (draw a detector's boxes, netdsl/detect.py)

    p = sub.add_parser("plot", help="plot loss, lr and test accuracy of a training run")
    p.add_argument("run", help="the run directory (or its _metrics.jsonl file)")
    p.add_argument("-o", "--output", default="curves.png")
    p.set_defaults(func=cmd_plot)


def _cpu_kernels(p) -> None:
    """The CPU path's options (train and time run the same kernels with the same threads)."""
    p.add_argument("--cpu-kernels", choices=("compiled", "numpy"), default="compiled",
                   help="CPU: compiled (Numba) kernels over preallocated buffers, or the NumPy layers")
    p.add_argument("--threads", type=int, help="CPU: threads for the kernels and BLAS (default: the available cores)")


def _device(p):
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")


def cmd_compile(args) -> int:
    from .check import check_file
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


def cmd_convert(args) -> int:
    from .executor import save_npz
    from .weights import read_weights, write_caffemodel
    w = read_weights(args.input)
    types, name = dict(w.types), ""
    if args.net:
        from .check import check_path
        ch, _, _ = check_path(args.net, weights=args.input)
        types.update({n.name: n.layer.type for n in ch.graph.nodes})
        name = ch.graph.name
    if args.output.endswith(".caffemodel"):
        partial = [n for n, blobs in w.layers.items() if any(b is None for b in blobs)]
        if partial:
            raise NetdslError("E0807", f"{args.input} gives only some blobs of layer '{partial[0]}': a .caffemodel "
                              "holds every blob of a layer", help="write .npz instead, or add the missing blobs")
        write_caffemodel(args.output, {n: (types.get(n, ""), blobs) for n, blobs in w.layers.items()}, name)
    elif args.output.endswith(".npz"):
        save_npz(args.output, w.arrays())
    else:
        raise NetdslError("E0807", f"cannot tell the format to write from '{args.output}'",
                          help="name the output .caffemodel or .npz")
    n = sum(len(b) for b in w.layers.values())
    print(f"wrote {args.output}: {len(w.layers)} layers, {n} blobs")
    return EXIT_OK


def cmd_upgrade(args) -> int:
    """As Caffe's upgrade_net_proto_text / upgrade_solver_proto_text: the file in today's format."""
    import sys

    from .check import is_solver
    from .files import write_atomic
    from .syntax import parse_file
    from .upgrade import is_v1_net, print_text, upgrade_net, upgrade_solver
    ast = parse_file(args.file)
    if is_v1_net(ast):
        new, what = upgrade_net(ast), f"V1 net: {len(ast.get('layers'))} layers upgraded"
    elif is_solver(ast) and ast.get("solver_type"):
        new, what = upgrade_solver(ast), "solver: solver_type upgraded to type"
    else:
        new, what = ast, "already in the current format; written unchanged"
    text = print_text(new) + "\n"
    if args.output:
        write_atomic(args.output, lambda f: f.write(text.encode()))
        print(f"{args.file}: {what}; wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        print(f"{args.file}: {what}", file=sys.stderr)
    return EXIT_OK


def cmd_export(args) -> int:
    from .onnx_export import export, require_onnx, verify
    require_onnx(runtime=args.verify)
    batch = args.batch
    if batch is not None and batch != "dynamic":
        if not batch.isdigit() or int(batch) <= 0:
            raise NetdslError("E0812", f"--batch {batch!r} is not a positive integer or 'dynamic'",
                              help="e.g. --batch 1 or --batch dynamic")
        batch = int(batch)
    model, net = export(args.file, args.output, weights=args.weights, opset=args.opset, batch=batch, outputs=args.outputs,
                        fold_batchnorm=args.fold_batchnorm, shapes=dict(parse_shape(s) for s in args.shape))
    g = model.graph
    print(f"wrote {args.output}: opset {args.opset}, {len(g.node)} nodes, inputs {', '.join(i.name for i in g.input)}; "
          f"outputs {', '.join(o.name for o in g.output)}")
    if args.verify:
        errs = verify(args.output, net)
        for name, err in errs.items():
            print(f"verify: {name}: largest relative difference {err:.3g} (onnxruntime vs netdsl)")
        print(f"verify: largest relative difference {max(errs.values(), default=0.0):.3g}")
    return EXIT_OK


def cmd_data(args) -> int:
    from .data.download import download_mnist
    path = download_mnist(args.data_dir, force=args.force)
    print(f"MNIST is ready in {path}")
    return 0


def cmd_data_tool(args) -> int:
    from .data import tools
    if args.dataset == "convert-imageset":
        size = None
        if args.resize:
            try:
                size = tuple(int(v) for v in args.resize.split(","))
            except ValueError:
                size = ()
            if len(size) != 2 or min(size) <= 0:
                raise NetdslError("E0951", f"--resize {args.resize!r} is not H,W", help="e.g. --resize 256,256")
        n = tools.convert_imageset(args.root, args.list, args.out_db, size, args.shuffle, args.gray,
                                   args.encode_type if args.encoded else None, args.seed)
        print(f"wrote {n} records to {args.out_db}")
    elif args.dataset == "compute-mean":
        mean = tools.compute_mean(args.db, args.output)
        print(f"wrote the {'x'.join(map(str, mean.shape[1:]))} mean to {args.output}")
    else:
        for path in tools.export_mnist(args.out, args.format, args.data_dir, args.limit, color=args.color):
            print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from . import distributed
    from .backend import get_backend
    from .train import Trainer
    if args.procs not in (None, 1) or distributed.launched_ranks() > 1:
        return distributed.cmd_train(args)
    trainer = Trainer(args.solver, get_backend(args.device), seed=args.seed, max_iter=args.max_iter,
                      data_dir=args.data_dir, out=args.out, graph=args.graph, debug_info=args.debug_info,
                      cpu_kernels=args.cpu_kernels, threads=args.threads)
    if args.weights:
        trainer.log(str(trainer.net.load(args.weights)), echo=True)
    if args.snapshot:
        trainer.restore(args.snapshot)
    result = trainer.run()
    if result.interrupted:
        return 130
    print(f"trained {result.iterations} iterations in {result.seconds:.1f} s; weights: {result.last_snapshot}{trainer.weights_suffix}")
    return 0


def test_outputs(model, weights, iterations, backend, data_dir=None, seed=0, stages=()) -> dict[str, float]:
    """Average each scalar output of the TEST net over `iterations` batches; for a net whose loss
    classifies every pixel, also the IoU figures pooled over them (evaluate.PixelConfusion)."""
    from .evaluate import PixelConfusion
    from .executor import build_net
    net = build_net(model, "TEST", backend, weights=weights, seed=seed, data_dir=data_dir, stages=stages)
    pixels = PixelConfusion.for_net(net)
    sums: dict[str, float] = {}
    for _ in range(iterations):
        for k, v in net.forward().items():
            if v.size == 1:
                sums[k] = sums.get(k, 0.0) + float(v.reshape(-1)[0])
        if pixels:
            pixels.add_net(net)
    return {k: v / iterations for k, v in sums.items()} | (pixels.result() if pixels else {})


def cmd_test(args) -> int:
    from . import detect, evaluate
    from .backend import get_backend
    if args.iterations < 1:
        raise NetdslError("E0000", f"--iterations must be at least 1, got {args.iterations}",
                          help="e.g. --iterations 50 (Caffe's default)")
    if detect.has_detections(args.model):       # a detector (SSD, Faster R-CNN): mAP over held-out scenes
        return evaluate.cmd_test_map(args)
    if evaluate.has_proposal(args.model):       # an RPN: proposal recall over held-out scenes
        return evaluate.cmd_test_recall(args)
    # a tagging net (MultiLabelDecode given the labels) adds multi-label metrics to its outputs
    score = evaluate.evaluate_tags if evaluate.has_tag_decoder(args.model, args.stage) else test_outputs
    means = score(args.model, args.weights, args.iterations, get_backend(args.device), args.data_dir, args.seed,
                  args.stage)
    if args.json:
        print(json.dumps(means))
    else:
        for k, v in means.items():
            print(f"{k} = {v:.6g}")
    return 0


def cmd_gradcheck(args) -> int:
    from .gradient_check import gradcheck
    layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers else None
    report = gradcheck(args.model, shapes=dict(parse_shape(s) for s in args.shape), layers=layers, eps=args.eps,
                       tol=args.tol, samples=args.samples, seed=args.seed, phase=args.phase.upper(),
                       data_dir=args.data_dir)
    print(report.render())
    render_all(report.diagnostics())
    return EXIT_OK if report.ok else EXIT_USER


def cmd_time(args) -> int:
    from .backend import get_backend
    from .timing import render_timing, time_net
    report = time_net(args.model, args.phase.upper(), args.iterations, get_backend(args.device), args.data_dir,
                      args.cpu_kernels, args.threads)
    print(json.dumps(report) if args.json else render_timing(report))
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run
    path = plot_run(args.run, args.output)
    print(f"wrote {path}")
    return 0
