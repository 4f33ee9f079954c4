"""Caffe's `debug_info: true`: per layer and per iteration, the mean absolute value of every top's
data on the forward pass, of every bottom's and param's diff on the backward pass, and of every
param's data and update at the update, in Caffe's words (net.cpp's InputDebugInfo,
ForwardDebugInfo, BackwardDebugInfo, UpdateDebugInfo and Backward's norms line), so that existing
habits of reading Caffe logs apply. As in Caffe's Solver::Step, the lines are printed on display
iterations only. The same numbers go to the metrics file as one {"kind": "debug"} record per
iteration, which `netdsl plot` charts per layer.

Two differences, both because netdsl's Net has no Split layers: a blob read by several layers shows
its summed diff (Caffe shows each split's share, then the sum at the Split layer), and a
param's backward diff is read after the whole backward pass."""
from __future__ import annotations

import json
import math

from .backend import to_host


def mean_abs(a) -> float:
    """Caffe's asum / count."""
    return float(abs(to_host(a)).sum()) / max(1, a.size)


def _g(v: float) -> str:
    """A float as C++'s ostream prints it (6 significant digits, %g)."""
    return f"{v:.6g}"


class DebugInfo:
    """The debug lines of one Net, written through `log` and `metrics` (train.Loggers)."""

    def __init__(self, net, log, metrics):
        self.net, self.log, self.metrics = net, log, metrics
        self.names = _param_names(net)
        self.record: dict = {}

    def _line(self, section: str, key: str, value: float, text: str) -> None:
        self.record.setdefault(section, {})[key] = value
        self.log("    " + text)

    def forward(self) -> None:
        """After a forward: Caffe's [Forward] lines, inputs first, then each layer's tops and params."""
        net = self.net
        steps = net.plan.steps
        for s in steps:
            if s.layer.fed_by_caller:
                for u, t in zip(s.layer.spec.tops, s.node.tops):
                    v = mean_abs(net.values[t])
                    self._line("data", f"input {u}", v, f"[Forward] Input {u} data: {_g(v)}")
        for i, s in enumerate(steps):
            name = s.node.name
            for u, t in zip(s.layer.spec.tops, s.node.tops):
                if t in net.values:
                    v = mean_abs(net.values[t])
                    self._line("data", f"{name} {u}", v, f"[Forward] Layer {name}, top blob {u} data: {_g(v)}")
            for j, p in enumerate(net.step_params[i]):
                v = mean_abs(p.data)
                shown = self.names[i][j]
                self._line("param_data", f"{name} {shown}", v,
                           f"[Forward] Layer {name}, param blob {shown} data: {_g(v)}")

    def backward(self) -> None:
        """After a backward: each layer's bottom diffs and param diffs, last layer first, then
        the L1 and L2 norms of all params' data and diff (Caffe logs that line at ERROR)."""
        net = self.net
        for i in range(len(net.plan.steps) - 1, -1, -1):
            s = net.plan.steps[i]
            if not s.need_backward or not any(t in net.grads for t in s.node.tops):
                continue
            name = s.node.name
            for u, b, prop in zip(s.layer.spec.bottoms, s.node.bottoms, s.propagate):
                if prop and b in net.grads:
                    v = mean_abs(net.grads[b])
                    self._line("diff", f"{name} {u}", v, f"[Backward] Layer {name}, bottom blob {u} diff: {_g(v)}")
            for j, p in enumerate(net.step_params[i]):
                if p.lr_mult:                      # Caffe's param_propagate_down
                    v = mean_abs(p.grad)
                    self._line("param_diff", f"{name} {self.names[i][j]}", v,
                               f"[Backward] Layer {name}, param blob {j} diff: {_g(v)}")
        owned = list(net.slots.values())
        l1 = [sum(float(abs(to_host(getattr(p, k))).sum()) for p in owned) for k in ("data", "grad")]
        l2 = [math.sqrt(sum(float((to_host(getattr(p, k)).astype("float64") ** 2).sum()) for p in owned))
              for k in ("data", "grad")]
        self.log(f"    [Backward] All net params (data, diff): L1 norm = ({_g(l1[0])}, {_g(l1[1])}); "
                 f"L2 norm = ({_g(l2[0])}, {_g(l2[1])})")

    def before_update(self) -> None:
        """Before the solver step: each learnable param's data (Caffe logs the data it updates)."""
        self._before = {p.name: mean_abs(p.data) for p in self.net.learnable}

    def after_update(self, iteration: int) -> None:
        """After the solver step (p.grad now holds the update applied): Caffe's [Update] lines, the
        sharing layers' first, then the owners'; and the iteration's metrics record."""
        net, owners = self.net, {}
        rows = []
        for i, s in enumerate(net.plan.steps):
            for j, p in enumerate(net.step_params[i]):
                if p.frozen:
                    continue
                label = (s.node.name, self.names[i][j])
                rows.append((label, p, owners.setdefault(p.name, label)))
        for (layer, shown), p, (owner, owner_shown) in rows:
            if (layer, shown) != (owner, owner_shown):
                self.log(f"    [Update] Layer {layer}, param blob {shown} (owned by layer {owner}, param "
                         f"{owner_shown}) diff: {_g(mean_abs(p.grad))}")
        for (layer, shown), p, owner in rows:
            if (layer, shown) == owner:
                data, diff = self._before[p.name], mean_abs(p.grad)
                self.record.setdefault("update", {})[f"{layer} {shown}"] = diff
                self.log(f"    [Update] Layer {layer}, param {shown} data: {_g(data)}; diff: {_g(diff)}")
        self.metrics(json.dumps({"kind": "debug", "iter": iteration, **self.record}))
        self.record = {}


def _param_names(net) -> list[list[str]]:
    """Caffe's param_display_names_ per step: the ParamSpec name if given, else the index."""
    out = []
    for s, ps in zip(net.plan.steps, net.step_params):
        specs = s.layer.spec.record.param if s.layer.spec.record.has("param") else []
        out.append([(specs[j].name if j < len(specs) and specs[j].name else str(j)) for j in range(len(ps))])
    return out
