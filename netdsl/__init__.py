"""netdsl: a declarative network-definition compiler for Caffe-style nets.

    net = netdsl.load("nets/lenet.net", phase="test", weights="runs/lenet/lenet_iter_10000.npz")
    out = net.forward()                 # {"accuracy": ..., "loss": ...}
"""
__version__ = "0.1.0"


def load(path: str, phase: str = "train", device: str = "cpu", weights: str | None = None, *,
         seed: int = 0, data_dir: str | None = None, shapes: dict | None = None, stages=(), dtype="float32",
         memory_limit: int | str | None = "auto"):
    """Check, lower and instantiate a net (pycaffe's caffe.Net). `shapes` gives data-blob shapes
    that can't be known without their data ({"data": (64, 3, 227, 227)}). A net that would need
    more memory than is available is refused before allocating (NetdslError E0775);
    `memory_limit` sets the budget instead: bytes, "8G", or "off"."""
    import os

    from .errors import NetdslError
    from .executor import build_net
    if not isinstance(path, (str, os.PathLike)):
        raise NetdslError("E0003", f"netdsl.load needs the path of a net file, got {type(path).__name__}",
                          help='e.g. netdsl.load("nets/lenet.net", phase="test")')
    return build_net(os.fspath(path), phase, device, weights=weights, seed=seed, data_dir=data_dir, stages=stages,
                     hints=shapes, dtype=dtype, memory_limit=memory_limit)


def export_onnx(path, output=None, **kw):
    """The TEST phase of a net as an onnx.ModelProto (written to `output` when given); keyword
    options as netdsl.onnx_export.export_onnx. Needs `pip install "netdsl[onnx]"`."""
    from .onnx_export import export_onnx
    return export_onnx(path, output, **kw)


def gradcheck(path, **kw):
    """Check each layer's backward in a net against central differences in float64; the report
    (`.ok`, `.rows`, `.render()`). Keyword options as netdsl.gradient_check.gradcheck."""
    from .gradient_check import gradcheck
    return gradcheck(path, **kw)
