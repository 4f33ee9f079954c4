"""The executor (executor.py): a checked graph is a value, and every Net built from it owns its run
state (params, RNG streams, data cursors), so nets never interfere."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from netdsl import syntax
from netdsl.check import check
from netdsl.executor import Net
from netdsl.plan import lower

NET = """
name: "stateful"
layer { name: "noise" type: "DummyData" top: "noise"
        dummy_data_param { shape { dim: 4 dim: 6 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "noise" top: "sum" }
layer { name: "drop" type: "Dropout" bottom: "sum" top: "drop" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip" type: "InnerProduct" bottom: "drop" top: "ip" inner_product_param { num_output: 3
        weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "t" type: "Input" top: "target" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


def _inputs():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((4, 6)), "target": rng.standard_normal((4, 3))}


def test_two_nets_from_one_checked_graph_do_not_interfere():
    shaped = check(syntax.parse(NET, "t.net"), phase="TRAIN")
    layers_before = [copy.copy(vars(n.layer)) for n in shaped.graph.nodes]
    a = Net(lower(shaped), np, dtype=np.float64, seed=1)
    b = Net(lower(shaped), np, dtype=np.float64, seed=1)
    first = a.forward(**_inputs())["loss"].copy()
    for _ in range(3):                        # a moves on: its RNG streams advance, its params learn
        a.forward(**_inputs())
        a.backward()
        for p in a.learnable:
            p.data -= 0.1 * p.grad
    assert np.array_equal(b.forward(**_inputs())["loss"], first)     # b starts where a started
    assert not np.array_equal(a.forward(**_inputs())["loss"], first)
    # nothing was written onto the layer objects the two nets share
    assert [vars(n.layer) for n in shaped.graph.nodes] == layers_before


def test_same_seed_same_stream_and_forward_count_advances_it():
    shaped = check(syntax.parse(NET, "t.net"), phase="TRAIN")
    plan = lower(shaped)
    a, b = Net(plan, np, dtype=np.float64, seed=7), Net(plan, np, dtype=np.float64, seed=7)
    ya = [a.forward(**_inputs())["loss"].copy() for _ in range(2)]
    yb = [b.forward(**_inputs())["loss"].copy() for _ in range(2)]
    assert np.array_equal(ya[0], yb[0]) and np.array_equal(ya[1], yb[1])
    assert not np.array_equal(ya[0], ya[1])                           # a new Dropout mask and noise each forward
    c = Net(plan, np, dtype=np.float64, seed=8)
    assert not np.array_equal(c.forward(**_inputs())["loss"], ya[0])


def test_shaped_graph_is_immutable():
    shaped = check(syntax.parse(NET, "t.net"), phase="TRAIN")
    node = shaped.graph.nodes[-1]
    with pytest.raises(TypeError):
        shaped.blobs["loss"] = (1,)
    assert shaped.nodes[node].tops == ((),) and shaped.params(shaped.graph.nodes[4]) == ((3, 6), (3,))
