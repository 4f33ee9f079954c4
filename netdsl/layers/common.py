"""Layers: Caffe's remaining common layers (Bias, Embed, Tile, Reduction, ArgMax, MVN, SPP, Filter,
BatchReindex, Parameter, Im2col)."""
from __future__ import annotations
