"""The plan (plan.py) and the memory planner (memory.py): steps and param slots, need-backward
pruning, liveness of every blob, no two live blobs sharing a byte, in-place versions, and the
arena against its peak and the naive total."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from netdsl import memory, syntax
from netdsl.check import check, check_file
from netdsl.memory import Block
from netdsl.plan import lower

REPO = Path(__file__).parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

TINY = """
name: "tiny"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { name: "w" } convolution_param { num_output: 5 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        param { lr_mult: 0 } param { lr_mult: 0 } convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "conv3" type: "Convolution" bottom: "conv1" top: "conv3"
        param { name: "w2" } convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "conv2" bottom: "conv3" top: "sum" }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "side" type: "InnerProduct" bottom: "data" top: "side" inner_product_param { num_output: 2 } }
"""


def plan_of(text: str, phase: str = "TRAIN"):
    return lower(check(syntax.parse(text, "t.net"), phase=phase))


def test_steps_params_and_pruning():
    p = plan_of(TINY)
    by = {s.node.name: s for s in p.steps}
    assert [s.node.name for s in p.steps] == ["in", "conv1", "relu1", "conv2", "conv3", "sum", "ip", "loss", "side"]
    assert [slot.key for slot in p.params] == ["w", "conv1/1", "conv2/0", "conv2/1", "w2", "conv3/1", "ip/0", "ip/1",
                                               "side/0", "side/1"]
    assert [slot.frozen for slot in p.params][2:4] == [True, True]        # lr_mult 0
    assert by["conv2"].need_backward and by["conv2"].propagate == [True]  # frozen, but conv1 below learns
    assert not by["side"].need_backward                                   # reaches no loss (Caffe's pruning)
    assert by["conv1"].propagate == [False]                               # nothing below needs the data gradient
    assert by["loss"].propagate == [True, False] and by["loss"].loss_weights == [1.0]
    assert p.inputs == ["data", "label"]
    assert set(p.outputs) == {"loss", "side"}


def test_in_place_versions_are_separate_blobs():
    p = plan_of(TINY)
    blocks = {b.name: b for b in p.arena}
    relu = next(s for s in p.steps if s.node.name == "relu1")
    assert relu.node.bottoms == ["conv1"] and relu.node.tops == ["conv1#2"]
    a, b = blocks["conv1"], blocks["conv1#2"]
    assert (a.first, a.last) == (1, 2) and (b.first, b.last) == (2, 4)   # read by conv2 and conv3
    assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset   # both live at step 2


def test_forward_liveness_is_first_write_to_last_read():
    p = plan_of(TINY)
    blocks = {b.name: b for b in p.arena}
    n = len(p.steps)
    for i, s in enumerate(p.steps):
        for t in s.node.tops:
            readers = [j for j, r in enumerate(p.steps) if t in r.node.bottoms]
            want = n - 1 if t in p.outputs else max(readers, default=i)
            assert (blocks[t].first, blocks[t].last) == (i, want), t
            assert blocks[t].nbytes == 4 * math.prod(p.blob_shapes[t])


def test_training_schedule_keeps_activations_and_gradients():
    p = plan_of(TINY)
    n, blocks = len(p.steps), {b.name: b for b in p.train_arena}
    # conv1#2 is read by conv2's and conv3's backward (at 2n-1-3 and 2n-1-4) and relu1's (2n-1-2)
    assert blocks["conv1#2"].last == 2 * n - 1 - 2
    # the loss gradient exists from the start of the backward; ip's gradient from loss's backward
    # until ip's own backward
    assert blocks["d:loss"].first == n
    assert (blocks["d:ip"].first, blocks["d:ip"].last) == (2 * n - 1 - 7, 2 * n - 1 - 6)
    assert "d:data" not in blocks and "d:side" not in blocks
    assert not memory.overlaps(p.train_arena, p.train_arena_bytes)


@pytest.mark.parametrize("path", ["nets/lenet.net", "nets/rpn.net"])
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
def test_no_two_live_blobs_share_memory_and_arena_bounds(path, phase):
    p = lower(check_file(str(REPO / path), phase=phase))
    for blocks, arena, top in ((p.arena, p.arena_bytes, p.peak_bytes),
                               (p.train_arena, p.train_arena_bytes, p.train_peak_bytes)):
        assert not memory.overlaps(blocks, arena)
        assert memory.peak(blocks) == top
        assert top <= arena <= sum(memory.aligned(b.nbytes) for b in blocks)
    assert p.arena_bytes < p.naive_bytes                 # reuse pays on both sample nets
    # the peak by brute force: bytes live at each step
    live = [sum(b.nbytes for b in p.arena if b.first <= i <= b.last) for i in range(len(p.steps))]
    assert p.peak_bytes == max(live)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference is not available")
def test_googlenet_plan_reuses_memory():
    p = lower(check_file(str(REFERENCE / "caffe" / "models_bvlc_googlenet_deploy.prototxt"), phase="TEST"))
    assert not memory.overlaps(p.arena, p.arena_bytes)
    assert p.arena_bytes < p.naive_bytes / 4             # a deep net: most activations die young


def test_place_packs_disjoint_intervals_and_aligns():
    a, b, c = Block("a", 1000, 0, 1), Block("b", 1000, 2, 3), Block("c", 10, 1, 2)
    size = memory.place([a, b, c])
    assert a.offset == b.offset == 0                     # never live together: the same memory
    assert c.offset == 1024                              # after a (aligned to 256) and b
    assert size == 1024 + 256
    assert not memory.overlaps([a, b, c], size)
    never = Block("never", 4096, -1, -1)
    assert memory.place([never]) == 0 and memory.peak([never]) == 0


def test_overlaps_finds_a_bad_layout():
    a, b = Block("a", 512, 0, 2, offset=0), Block("b", 512, 1, 3, offset=256)
    assert memory.overlaps([a, b], 1024) == [(a, b)]
    b.offset = 512
    assert memory.overlaps([a, b], 1024) == []
    assert memory.overlaps([a, b], 768) == [(b, "arena")]


def test_plan_json_has_the_arena():
    j = plan_of(TINY).to_json()
    assert {"arena", "arena_bytes", "peak_bytes", "train_arena_bytes", "train_peak_bytes", "naive_bytes"} <= set(j)
    assert {e["blob"] for e in j["arena"]} >= {"data", "conv1", "conv1#2", "loss"}
    assert all(e["offset"] % 256 == 0 for e in j["arena"])
