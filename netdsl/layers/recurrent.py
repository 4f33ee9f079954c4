"""Layers: Caffe's recurrent layers, RNN and LSTM (RecurrentLayer: T x N x ... inputs, the `cont`
sequence-continuation bottom, an optional static input, expose_hidden)."""
from __future__ import annotations
