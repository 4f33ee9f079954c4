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


FORCED = """
force_backward: true
layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_force_backward_gives_the_inputs_a_gradient():
    """pycaffe users read net.blobs['data'].diff after backward(): with force_backward the data
    gets its gradient even though nothing below it learns; the labels never do (a loss's bottom 1)."""
    x, label = np.random.default_rng(3).standard_normal((2, 3)), np.array([0, 2])
    for forced, want in ((True, True), (False, False)):
        text = FORCED if forced else FORCED.replace("force_backward: true", "")
        net = Net(lower(check(syntax.parse(text, "t.net"), phase="TRAIN")), np, dtype=np.float64, seed=2)
        net.forward(data=x, label=label)
        net.backward()
        assert (net.blobs["data"].grad is not None) == want and net.blobs["label"].grad is None
    w = net.params["ip"][0].data

    def loss(xv):
        return float(net.forward(data=xv, label=label)["loss"])
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = 1e-6
        numeric[i] = (loss(x + d) - loss(x - d)) / 2e-6
    forced = Net(lower(check(syntax.parse(FORCED, "t.net"), phase="TRAIN")), np, dtype=np.float64, seed=2)
    assert np.array_equal(forced.params["ip"][0].data, w)
    forced.forward(data=x, label=label)
    forced.backward()
    np.testing.assert_allclose(forced.blobs["data"].grad, numeric, rtol=1e-5, atol=1e-8)


def test_memory_data_is_fed_by_forward_like_input():
    """Caffe's MemoryData (pycaffe's set_input_arrays): its tops are forward()'s arguments."""
    text = ('layer { name: "m" type: "MemoryData" top: "data" top: "label" '
            'memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }\n')
    shaped = check(syntax.parse(text, "t.net"), phase="TEST")
    assert shaped.blobs["data"] == (2, 1, 2, 2) and shaped.blobs["label"] == (2,)
    net = Net(lower(shaped), np, dtype=np.float64)
    out = net.forward(data=np.ones((2, 1, 2, 2)), label=np.zeros(2))
    assert out["fc"].shape == (2, 3)
    with pytest.raises(Exception, match="needs the net's inputs"):
        net.forward()
