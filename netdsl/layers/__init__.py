"""The layer catalogue: importing this package registers every layer type."""
from . import activation, common, conv, data, dense, forks, loss, multibox, neuron, norm, readers, recurrent, rpn, ssd, tensor  # noqa: F401
