"""Layers: Caffe's element-wise neuron layers beyond ReLU/Sigmoid/TanH (PReLU, ELU, AbsVal, Power,
Exp, Log, BNLL, Threshold, Clip)."""
from __future__ import annotations
