"""netdsl: a declarative network-definition compiler for Caffe-style nets."""
__version__ = "0.1.0"
