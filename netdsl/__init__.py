"""netdsl: a declarative network-definition compiler for Caffe-style nets.

    net = netdsl.load("nets/lenet.net", phase="test", weights="runs/lenet/lenet_iter_10000.npz")
    out = net.forward()                 # {"accuracy": ..., "loss": ...}
"""
__version__ = "0.1.0"


def load(path: str, phase: str = "train", device: str = "cpu", weights: str | None = None, *,
         seed: int = 0, data_dir: str | None = None, shapes: dict | None = None, stages=(), dtype="float32"):
    """Check, lower and instantiate a net (pycaffe's caffe.Net). `shapes` gives data-blob shapes
    that can't be known without their data ({"data": (64, 3, 227, 227)})."""
    from .executor import build_net
    return build_net(path, phase, device, weights=weights, seed=seed, data_dir=data_dir, stages=stages,
                     hints=shapes, dtype=dtype)


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
