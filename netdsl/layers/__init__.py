"""The layer catalogue: importing this package registers every layer type."""
from . import activation, conv, data, dense, loss, norm, rpn, tensor  # noqa: F401
