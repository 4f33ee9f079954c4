"""ONNX export (`netdsl export`, `netdsl.export_onnx`): the TEST phase of a net as an ONNX model that
keeps Caffe's semantics. The net is built as every command builds it (build_net: weights copied by
layer name, fillers otherwise); the driver walks the plan and asks each layer for its nodes through
the `to_onnx(ex, step)` hook (the mapping lives with the layer class); `ex` is the Exporter below.
Losses, Accuracy and Silence are dropped, data layers' tops become the graph's inputs.
Only this module and the command import onnx (and onnxruntime for --verify)."""
from __future__ import annotations

import os

import numpy as np

from .errors import NetdslError

MIN_OPSET = 13          # Softmax on one axis, Split/Unsqueeze/Slice sizes as inputs
DEFAULT_OPSET = 17
EXTERNAL_BYTES = (1 << 30) + (1 << 29)  # over 1.5 GiB of weights: external data (a protobuf stops at 2 GiB)


def require_onnx(runtime: bool = False):
    """onnx (and onnxruntime), or a NetdslError saying how to install them."""
    try:
        import onnx
        if runtime:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        raise NetdslError("E0811", f"ONNX export needs the `{e.name or 'onnx'}` package, which is not installed",
                          help='install it with: pip install "netdsl[onnx]" (onnx and onnxruntime)') from None
    return onnx


def unsupported(layer, why: str = "") -> NetdslError:
    """The located error for a layer (or a configuration of it) that has no ONNX mapping."""
    tops = ", ".join(dict.fromkeys(b.split("#")[0] for b in layer.spec.bottoms)) or "an earlier blob"
    return NetdslError("E0810", f"{layer.type} layer '{layer.name}' cannot be exported to ONNX" + (f": {why}" if why else ""),
                       layer.spec.pos, help=f"export the net up to the blobs before it, e.g. `--outputs {tops}`, "
                                            "and run the rest outside ONNX")


class Exporter:
    """What a layer's `to_onnx(ex, step)` works with: tensor names of its blobs, their shapes (from the
    plan), its params (folded where --fold-batchnorm applies), and node and initializer makers."""

    def __init__(self, net, opset: int):
        self.net, self.plan, self.opset = net, net.plan, opset
        self.nodes, self.inits, self.tensors = [], [], {}
        self.alias: dict[str, str] = {}        # blob version -> the version whose tensor carries it (folded)
        self.folded: dict[int, list] = {}      # step index -> its params after folding
        self._names: set[str] = set()
        self._node_names: set[str] = set()
        self._consts: dict = {}
        self._index = {id(s): i for i, s in enumerate(self.plan.steps)}
        self.step = None

    # -- names and shapes ------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def name(self, version: str) -> str:
        return self.tensors[self.alias.get(version, version)]

    def bottoms(self, step) -> list[str]:
        return [self.name(b) for b in step.node.bottoms]

    def tops(self, step) -> list[str]:
        return [self.name(t) for t in step.node.tops]

    def shape(self, version: str) -> tuple:
        return tuple(self.plan.blob_shapes[version])

    def in_shape(self, step, i: int = 0) -> tuple:
        return self.shape(step.node.bottoms[i])

    def out_shape(self, step, i: int = 0) -> tuple:
        return self.shape(step.node.tops[i])

    def params(self, step) -> list[np.ndarray]:
        i = self._index[id(step)]
        if i in self.folded:
            return self.folded[i]
        from .backend import to_host
        return [np.asarray(to_host(p.data)) for p in self.net.step_params[i]]

    # -- graph pieces -----------------------------------------------------------------------------
    def add_initializer(self, name: str, array, dtype=np.float32) -> str:
        name = self.fresh(name)
        self.inits.append((name, np.asarray(array, dtype=dtype)))    # made into TensorProtos once, in the model
        return name

    def const(self, suffix: str, array) -> str:
        """A float32 initializer named after the current layer ("conv1/W")."""
        return self.add_initializer(f"{self.step.layer.name}/{suffix}", array)

    def scalar(self, value: float) -> str:
        key = ("f", float(value))
        if key not in self._consts:
            self._consts[key] = self.add_initializer(f"const_{len(self._consts)}", np.float32(value))
        return self._consts[key]

    def ints(self, values) -> str:
        """An int64 1-D initializer (shapes, axes, sizes), shared between nodes that use the same one."""
        key = ("i", tuple(int(v) for v in values))
        if key not in self._consts:
            self._consts[key] = self.add_initializer(f"const_{len(self._consts)}", np.array(key[1], np.int64), np.int64)
        return self._consts[key]

    def tmp(self, suffix: str) -> str:
        return self.fresh(f"{self.step.layer.name}/{suffix}")

    def add_node(self, op: str, inputs, outputs=None, name: str | None = None, **attrs):
        """One node of the current layer (named after it, its source position as doc_string). `outputs`:
        tensor names, or None for one fresh tensor. Returns the output name (or names)."""
        from onnx import helper
        layer = self.step.layer
        outputs = [self.tmp(op.lower())] if outputs is None else [outputs] if isinstance(outputs, str) else list(outputs)
        base = name or layer.name
        node_name, k = base, 1
        while node_name in self._node_names:
            k += 1
            node_name = f"{base}/{k}"
        self._node_names.add(node_name)
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=node_name, doc_string=str(layer.spec.pos),
                                           **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def chain(self, step, x: str, ops) -> str:
        """Apply ops in turn, [(op, extra inputs, attrs)], None entries skipped; the last writes the
        step's top (an Identity when nothing is left)."""
        ops = [o for o in ops if o is not None] or [("Identity", [], {})]
        for k, (op, extra, *attrs) in enumerate(ops):
            last = k == len(ops) - 1
            x = self.add_node(op, [x, *extra], self.tops(step) if last else None, **(attrs[0] if attrs else {}))
        return x

    def along(self, a, axis: int, ndim: int, rank: int | None = None, suffix: str = "b") -> str:
        """`a` (an array, or a tensor name of rank `rank`) placed at `axis` of an ndim-D blob, shaped for
        ONNX's trailing broadcast (Caffe's Scale, Bias, PReLU)."""
        if isinstance(a, np.ndarray):
            return self.const(suffix, a.reshape(a.shape + (1,) * (ndim - axis - a.ndim)))
        trailing = ndim - axis - rank
        return self.add_node("Unsqueeze", [a, self.ints(range(rank, rank + trailing))]) if trailing > 0 else a

    def constant_like(self, x: str, value: float, outputs) -> str:
        return self.constant_like_shape(self.add_node("Shape", [x]), value, outputs)

    def constant_like_shape(self, shape: str, value: float, outputs=None) -> str:
        """A float tensor of the (int64 tensor) shape, every element `value`."""
        from onnx import numpy_helper
        return self.add_node("ConstantOfShape", [shape], outputs,
                             value=numpy_helper.from_array(np.array([value], np.float32)))

    def reduce(self, op: str, x: str, axes, outputs=None) -> str:
        """A Reduce* node keeping dims: its axes an attribute before opset 18, an input from 18 on."""
        if self.opset >= 18:
            return self.add_node(op, [x, self.ints(axes)], outputs, keepdims=1)
        return self.add_node(op, [x], outputs, axes=list(axes), keepdims=1)

    def dims_then(self, x: str, tail) -> str:
        """An int64 shape: the first two dims of tensor x (N and C, batch-size free) and then `tail`."""
        lead = self.add_node("Slice", [self.add_node("Shape", [x]), self.ints([0]), self.ints([2])])
        return self.add_node("Concat", [lead, self.ints(tail)], axis=0)

    def unsupported(self, step, why: str = "") -> NetdslError:
        return unsupported(step.layer, why)


# ---------------------------------------------------------------------------------------------- driver

def _dropped(layer) -> bool:
    """Training-only layers: losses, Accuracy and Silence (sinks)."""
    return layer.is_loss or layer.is_sink


def _prepare(source, weights, batch, shapes):
    """Build the TEST net, with the batch given to every data blob (hints) when batch is an int."""
    from .check import check
    from .executor import build_net
    from .syntax import parse_file
    hints = dict(shapes or {})
    if isinstance(batch, int) and not isinstance(batch, bool):
        if batch <= 0:
            raise NetdslError("E0812", f"--batch must be positive, got {batch}", help="e.g. --batch 1 or --batch dynamic")
        ch = check(parse_file(source), phase="TEST", hints=hints)
        for n in ch.graph.nodes:
            if n.layer.is_data:
                for u, t in zip(n.layer.spec.tops, n.tops):
                    shape = ch.blobs.get(t)
                    if shape:
                        hints[u] = (batch,) + tuple(shape[1:])
    elif batch not in (None, "dynamic"):
        raise NetdslError("E0812", f"--batch must be a positive integer or 'dynamic', got {batch!r}",
                          help="e.g. --batch 8 or --batch dynamic")
    return build_net(source, "TEST", weights=weights, hints=hints or None)


def _select(plan, outputs):
    """(steps to export, graph input versions, output versions): training-only layers dropped, then
    only what the outputs need."""
    kept = [s for s in plan.steps if not _dropped(s.layer)]
    producer = {t: s for s in kept for t in s.node.tops}
    if outputs:
        last = {}
        for s in kept:
            for t in s.node.tops:
                last[t.split("#")[0]] = t
        missing = [o for o in outputs if o not in last]
        if missing:
            raise NetdslError("E0812", f"--outputs names {', '.join(repr(m) for m in missing)}, not a blob of the TEST net",
                              help=f"name blobs of the net, e.g. {', '.join(list(last)[-6:])}")
        outs = [last[o] for o in outputs]
    else:
        read = {b for s in kept for b in s.node.bottoms}
        outs = [t for s in kept if not s.layer.is_data for t in s.node.tops if t not in read]
    need, todo = set(), list(outs)
    while todo:
        v = todo.pop()
        s = producer.get(v)
        if s is not None and id(s) not in need:
            need.add(id(s))
            todo.extend(s.node.bottoms)
    steps = [s for s in kept if id(s) in need]
    inputs = [t for s in steps if s.layer.is_data for t in s.node.tops
              if any(t in o.node.bottoms for o in steps) or t in outs]
    return [s for s in steps if not s.layer.is_data], inputs, outs


def _fold(ex, steps, outs) -> set:
    """--fold-batchnorm: a BatchNorm (and the Scale after it) whose input is read by it alone, from
    a layer that can absorb a per-channel affine map (Convolution), folds into that layer's params.
    Returns the ids of the steps folded away."""
    consumers: dict[str, list] = {}
    for s in steps:
        for b in s.node.bottoms:
            consumers.setdefault(b, []).append(s)
    gone = set()
    for s in steps:
        fold = getattr(s.layer, "onnx_fold", None)
        if fold is None or id(s) in gone:
            continue
        top, mul, add, chain = s.node.tops[0], None, None, []
        while top not in outs and len(consumers.get(top, [])) == 1:
            nxt = consumers[top][0]
            affine_of = getattr(nxt.layer, "onnx_affine", None)
            affine = affine_of(ex, nxt) if affine_of and len(nxt.node.bottoms) == 1 else None
            if affine is None or len(ex.shape(top)) < 2:
                break
            m, a = (np.asarray(v, np.float64) for v in affine)
            mul, add = (m, a) if mul is None else (mul * m, add * m + a)
            chain.append(nxt)
            top = nxt.node.tops[0]
        if chain:
            ex.step = s
            ex.folded[ex._index[id(s)]] = [np.asarray(p, np.float32) for p in fold(ex.params(s), mul, add)]
            for t in [s.node.tops[0]] + [c.node.tops[0] for c in chain[:-1]]:
                ex.alias[t] = top
            gone.update(id(c) for c in chain)
    return gone


def _name_tensors(ex, steps, inputs, outs) -> None:
    """Blob versions to tensor names: graph inputs and the last version of each blob keep the net's
    name; earlier versions of an in-place chain get `<blob>_<k>` (conv1, conv1#2 -> conv1_1, conv1)."""
    versions = list(dict.fromkeys(list(inputs) + [ex.alias.get(t, t) for s in steps for t in s.node.tops]))
    last = {}
    for v in versions:
        last[v.split("#")[0]] = v
    ex._names.update(last)                      # every blob's own name is reserved for it
    taken = set()
    for v in inputs:
        ex.tensors[v] = v.split("#")[0]
        taken.add(ex.tensors[v])
    for user, v in last.items():
        if v not in ex.tensors:
            ex.tensors[v] = user if user not in taken else ex.fresh(f"{user}_{_version(v)}")
    for v in versions:
        if v not in ex.tensors:
            ex.tensors[v] = ex.fresh(f"{v.split('#')[0]}_{_version(v)}")


def _version(v: str) -> int:
    return int(v.split("#")[1]) if "#" in v else 1


def _value_info(name, shape, batch_dim):
    from onnx import TensorProto, helper
    dims = [batch_dim if (i == 0 and batch_dim) else d for i, d in enumerate(shape)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def export_onnx(path_or_net_file, output=None, *, weights=None, opset: int = DEFAULT_OPSET, batch=None, outputs=None,
                fold_batchnorm: bool = False, shapes=None):
    """The TEST phase of a net as an onnx.ModelProto, written to `output` when given (external data
    beside it for models over 1.5 GiB). `batch`: None (the net's shapes), an int (every data blob's
    first dim), or "dynamic" (a symbolic N). `outputs`: blob names to cut the graph at (default: the
    blobs nothing reads). `fold_batchnorm`: fold BatchNorm/Scale into the Convolution before them.
    `shapes`: {blob: shape} for data blobs whose shape the net does not say (as --shape)."""
    return export(path_or_net_file, output, weights=weights, opset=opset, batch=batch, outputs=outputs,
                  fold_batchnorm=fold_batchnorm, shapes=shapes)[0]


def export(path_or_net_file, output=None, *, weights=None, opset: int = DEFAULT_OPSET, batch=None, outputs=None,
           fold_batchnorm: bool = False, shapes=None):
    """export_onnx, returning (model, the netdsl Net it was made from). `path_or_net_file` may also
    be a built Net (its shapes and weights as they are)."""
    onnx = require_onnx()
    from onnx import helper

    from . import __version__
    from .executor import Net
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise NetdslError("E0812", f"--opset {opset} is not supported",
                          help=f"use an opset from {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (default {DEFAULT_OPSET})")
    if isinstance(outputs, str):
        outputs = [o.strip() for o in outputs.split(",") if o.strip()]
    net = path_or_net_file if isinstance(path_or_net_file, Net) else _prepare(path_or_net_file, weights, batch, shapes)
    source = os.fspath(path_or_net_file) if path_or_net_file is not net else \
        next((s.layer.spec.pos.file for s in net.plan.steps if s.layer.spec.pos), net.plan.name)
    ex = Exporter(net, opset)
    steps, inputs, outs = _select(net.plan, outputs)
    gone = _fold(ex, steps, outs) if fold_batchnorm else set()
    steps = [s for s in steps if id(s) not in gone]
    _name_tensors(ex, steps, inputs, outs)
    for s in steps:
        ex.step = s
        s.layer.to_onnx(ex, s)
    in_batch = {ex.shape(v)[0] for v in inputs if ex.shape(v)}
    dyn = "N" if batch == "dynamic" else None
    graph_inputs = [_value_info(ex.name(v), ex.shape(v), dyn) for v in inputs]
    graph_outputs = [_value_info(ex.name(v), ex.shape(v), dyn if ex.shape(v) and ex.shape(v)[0] in in_batch else None)
                     for v in outs]
    graph = helper.make_graph(ex.nodes, net.plan.name or "net", graph_inputs, graph_outputs)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="netdsl", producer_version=__version__,
                              ir_version=helper.find_min_ir_version_for(opsets))
    for name, a in ex.inits:                    # written straight into the model: one copy of the weights
        t = model.graph.initializer.add()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(a.shape)
        t.raw_data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    helper.set_model_props(model, {"source": source, "netdsl_version": __version__})
    model.doc_string = f"{source} (TEST phase), exported by netdsl {__version__}"
    if output is not None:
        save(model, output)
    return model, net


def save(model, output: str) -> None:
    onnx = require_onnx()
    from .files import write_atomic
    size = sum(t.ByteSize() for t in model.graph.initializer)
    try:
        if size > EXTERNAL_BYTES:
            from onnx.external_data_helper import load_external_data_for_model
            onnx.save_model(model, output, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(output) + ".data", size_threshold=1024)
            load_external_data_for_model(model, os.path.dirname(os.path.abspath(output)))   # saving moved it out
        else:
            write_atomic(output, lambda f: f.write(model.SerializeToString()))
    except OSError as e:
        raise NetdslError("E0812", f"cannot write {output}: {e.strerror or e}", help="check the path") from None


def verify(model, net, rng=None, inputs: dict | None = None) -> dict[str, float]:
    """Run the model (a ModelProto, a path or an onnxruntime session) with onnxruntime and the net's
    layers with netdsl on the same input (random, uniform in [-1, 1), unless given); each output's
    largest |difference| over its largest |value|."""
    require_onnx(runtime=True)
    import onnxruntime as ort
    rng = rng or np.random.default_rng(0)
    if isinstance(model, ort.InferenceSession):
        sess = model
    else:
        data = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    plan, last = net.plan, {}
    for s in plan.steps:
        for t in s.node.tops:
            last[t.split("#")[0]] = t
    feeds = dict(inputs or {})
    for i in sess.get_inputs():
        if i.name not in feeds:
            feeds[i.name] = rng.uniform(-1, 1, plan.blob_shapes[last[i.name]]).astype(np.float32)
    values = {}
    for k, s in enumerate(plan.steps):          # Net.forward, with every data layer's tops fed
        if s.layer.is_data:
            values.update({t: feeds[t.split("#")[0]] for t in s.node.tops if t.split("#")[0] in feeds})
            continue
        if _dropped(s.layer) or not all(b in values for b in s.node.bottoms):
            continue
        args = [np, [values[b] for b in s.node.bottoms], [p.data for p in net.step_params[k]]]
        if net.states[k] is not None:
            net.states[k].rng = np.random.default_rng([net.seed, k, 0])
            args.append(net.states[k])
        tops, _ = s.layer.forward(*args)
        values.update(zip(s.node.tops, tops))
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for n, got in zip(names, sess.run(names, feeds)):
        want = values[last[n]]
        scale = max(float(np.abs(want).max()), 1e-30) if want.size else 1.0
        out[n] = float(np.abs(got.reshape(want.shape) - want).max()) / scale if want.size else 0.0
    return out
