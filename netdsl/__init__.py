"""netdsl: a declarative network-definition compiler for Caffe-style nets.

    net = netdsl.load("nets/lenet.net", phase="test", weights="runs/lenet/lenet_iter_10000.npz")
    out = net.forward()                 # {"accuracy": ..., "loss": ...}
"""
__version__ = "0.1.0"


def load(path: str, phase: str = "train", device: str = "cpu", weights: str | None = None, *,
         seed: int = 0, data_dir: str | None = None, shapes: dict | None = None, stages=(), dtype="float32"):
    """Check, lower and instantiate a net (pycaffe's caffe.Net). `shapes` gives data-blob shapes
    that can't be known without their data ({"data": (64, 3, 227, 227)})."""
    from .backend import get_backend
    from .check import check_file
    from .executor import Net
    from .plan import lower
    plan = lower(check_file(path, phase=phase.upper(), stages=stages, hints=shapes), runnable=True)
    net = Net(plan, get_backend(device).xp, dtype=dtype, seed=seed, data_dir=data_dir)
    if weights:
        net.load(weights)
    return net
