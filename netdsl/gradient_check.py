"""Numerical gradient check of a user's net (`netdsl gradcheck`, `netdsl.gradcheck`), layer by
layer as Caffe's GradientChecker checks one layer in its tests.

The net runs once in float64 (Input tops random, data layers reading their data) so that every
layer sees the bottoms it meets in the net. Then each layer that backpropagates is checked on its
own (in a net without a loss, a deploy net, every layer with a backward, every bottom Caffe's
force_backward would reach, and every top): with R_i a fixed random tensor for each top the net
sends a gradient to, the objective
f = sum_i sum(top_i * R_i) has the analytic gradient layer.backward(R), which is compared with
central differences (f(x + eps) - f(x - eps)) / 2 eps at every coordinate of small blobs and
`samples` random coordinates of large ones, for each bottom that needs a gradient and each learned
param. A coordinate passes when |analytic - numeric| <= tol * max(1, |analytic|, |numeric|)
(Caffe's test: threshold * max(|a|, |n|, 1)); a miss is retried at eps / 10, where a smooth
function's truncation error is 100 times smaller.

Kinks: Caffe's checker skips coordinates within kink_range of a kink the test names (ReLU's 0).
A layer here does not name its kinks, so they are found numerically: a coordinate that misses at
both steps, whose one-sided slopes (f(x) - f(x - h)) / h and (f(x + h) - f(x)) / h at h = eps / 10
still differ by more than the tolerance and by at least half their gap at eps, with the analytic
gradient between them, has a kink (ReLU at 0, a max-pooling tie) within eps / 10 and is counted
as skipped, not failed. A smooth function's one-sided slopes differ by O(h f''), closing 10-fold
from eps to eps / 10, so a wrong gradient is not excused that way."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import Diagnostic, NetdslError
from .registry import RunState

DEFAULT_EPS, DEFAULT_TOL, DEFAULT_SAMPLES = 1e-5, 1e-5, 40


def central_difference(f, arr: np.ndarray, index, eps: float) -> tuple[float, float]:
    """f(arr with arr[index] + eps) and f(... - eps); arr is restored."""
    old = arr[index]
    arr[index] = old + eps
    up = f()
    arr[index] = old - eps
    down = f()
    arr[index] = old
    return up, down


def numeric_grad(f, arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of arr (changed in place,
    then restored)."""
    g = np.zeros_like(arr)
    for index in np.ndindex(*arr.shape):
        up, down = central_difference(f, arr, index, eps)
        g[index] = (up - down) / (2 * eps)
    return g


@dataclass
class BlobCheck:
    """One checked blob of one layer: a bottom (what = "bottom 'x'") or a param ("param 0")."""
    layer: str
    type: str
    what: str
    size: int
    checked: int = 0
    kinks: int = 0
    failed: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: tuple = ()                  # (index, analytic, numeric) of the largest error

    @property
    def ok(self) -> bool:
        return self.failed == 0


@dataclass
class GradCheck:
    """The report: one BlobCheck per checked blob, in layer order."""
    net: str
    eps: float
    tol: float
    rows: list[BlobCheck] = field(default_factory=list)
    positions: dict = field(default_factory=dict)    # layer name -> its Pos in the file

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def render(self) -> str:
        cols = ("layer", "type", "blob", "checked", "kinks", "max abs err", "max rel err", "result")
        table = [[r.layer, r.type, r.what, f"{r.checked} of {r.size}", str(r.kinks), f"{r.max_abs:.3g}",
                  f"{r.max_rel:.3g}", "ok" if r.ok else "FAIL"] for r in self.rows]
        widths = [max(len(c), *(len(t[k]) for t in table)) for k, c in enumerate(cols)]

        def line(cells):
            return "  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))
        bad = [r for r in self.rows if not r.ok]
        return "\n".join([f"gradient check of '{self.net}' in float64 (eps {self.eps:g}, tol {self.tol:g})",
                          line(cols), *map(line, table),
                          f"{len(self.rows) - len(bad)} of {len(self.rows)} blobs pass"
                          + (f"; {len({r.layer for r in bad})} layer(s) fail" if bad else "")])

    def diagnostics(self) -> list[Diagnostic]:
        """A located error per failing blob."""
        out = []
        for r in self.rows:
            if r.ok:
                continue
            index, a, n = r.worst
            out.append(Diagnostic(
                "E0743", f"gradient check failed: {r.type} '{r.layer}' {r.what}: {r.failed} of {r.checked} "
                f"coordinates differ (max relative error {r.max_rel:.3g})", self.positions.get(r.layer),
                notes=[f"at {r.what} index {index}: backward gives {a:.6g}, central differences {n:.6g}"],
                help="the layer's backward does not match its forward; check the backward formula for this blob"))
        return out


def gradcheck(source, *, shapes: dict | None = None, layers=None, eps: float = DEFAULT_EPS,
              tol: float = DEFAULT_TOL, samples: int = DEFAULT_SAMPLES, seed: int = 0, phase: str = "TRAIN",
              stages=(), data_dir: str | None = None) -> GradCheck:
    """Check every backpropagating layer of a net (or only `layers`, names) against central
    differences; see the module docstring. Returns the report (`.ok`, `.render()`)."""
    from .executor import RunContext, build_net
    if not eps > 0 or not tol > 0 or samples < 1:
        raise NetdslError("E0741", f"gradcheck: eps {eps:g}, tol {tol:g} and samples {samples} must be positive",
                          help="e.g. --eps 1e-5 --tol 1e-5 --samples 40")
    net = build_net(source, phase, "cpu", seed=seed, data_dir=data_dir, stages=stages, hints=shapes,
                    dtype=np.float64)
    steps = net.plan.steps
    names = [s.node.name for s in steps]
    if layers:
        unknown = [n for n in layers if n not in names]
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], names, 1)
            raise NetdslError("E0740", f"gradcheck --layers: no layer '{unknown[0]}' in the {phase} net",
                              help=f"did you mean '{close[0]}'?" if close else f"the layers: {', '.join(names)}")
    rng = np.random.default_rng(seed)
    net.forward(**_random_inputs(net, rng))
    net.backward()
    lossless = not net.grads           # a deploy net: every layer and top, as Caffe's force_backward
    report = GradCheck(net.plan.name or str(source), eps, tol,
                       positions={s.node.name: s.layer.spec.pos for s in steps})
    ctx = RunContext(data_dir, seed)
    for i, s in enumerate(steps):
        layer = s.layer
        if not (s.need_backward or lossless) or layer.no_backward or (layers and s.node.name not in layers):
            continue
        propagate = [layer.allow_force_backward(k) for k in range(len(s.node.bottoms))] if lossless \
            else list(s.propagate)
        bottoms = [np.array(net.values[b]) for b in s.node.bottoms]
        params = [np.array(p.data) for p in net.step_params[i]]
        learn = [not p.frozen and not layer.frozen_params for p in net.step_params[i]]
        top_shapes = [net.plan.blob_shapes[t] for t in s.node.tops]

        def run(bottoms=bottoms, params=params, layer=layer, i=i, top_shapes=top_shapes):
            if not layer.stateful:
                return layer.forward(np, bottoms, params)
            state = RunState(top_shapes, layer.open(ctx))
            state.rng = np.random.default_rng([seed, i])       # the same Dropout mask on every call
            return layer.forward(np, bottoms, params, state)

        tops, saved = run()
        R = [rng.standard_normal(np.shape(t)) if lossless or t_name in net.grads else np.zeros(np.shape(t))
             for t, t_name in zip(tops, s.node.tops)]

        def f(run=run, R=R):
            return sum(float((np.asarray(t) * r).sum()) for t, r in zip(run()[0], R))

        f0 = f()
        dbottoms, dparams = layer.backward(np, saved, R, params, propagate)
        blobs = [(f"bottom '{u}'", bottoms[k], dbottoms[k]) for k, u in enumerate(layer.spec.bottoms)
                 if propagate[k] and dbottoms[k] is not None]
        blobs += [(f"param {j}", params[j], dparams[j]) for j in range(len(params))
                  if learn[j] and j < len(dparams) and dparams[j] is not None]
        for what, arr, grad in blobs:
            report.rows.append(_check_blob(BlobCheck(s.node.name, layer.type, what, arr.size), f, f0, arr,
                                           np.asarray(grad, np.float64).reshape(arr.shape), eps, tol, samples, rng))
    if not report.rows:
        raise NetdslError("E0742", f"gradcheck: nothing to check in the {phase} net" +
                          (f" among {', '.join(layers)}" if layers else ""),
                          help="the layers checked are those that backpropagate (with learned params or a bottom "
                               "that needs a gradient; in a net without a loss, every layer that has a backward)")
    return report


def _check_blob(row: BlobCheck, f, f0: float, arr, grad, eps, tol, samples, rng) -> BlobCheck:
    flat = range(arr.size) if arr.size <= samples else sorted(rng.choice(arr.size, samples, replace=False))
    worst = -1.0
    for k in flat:
        index = np.unravel_index(int(k), arr.shape)
        analytic = float(grad[index])
        verdict, numeric = _coordinate(f, f0, arr, index, analytic, eps, tol)
        row.checked += 1
        if verdict == "kink":
            row.kinks += 1
            continue
        row.failed += verdict == "fail"
        err = abs(analytic - numeric)
        row.max_abs = max(row.max_abs, err)
        row.max_rel = max(row.max_rel, err / max(abs(analytic), abs(numeric), 1e-12) if err else 0.0)
        if err / max(1.0, abs(analytic), abs(numeric)) > worst:
            worst = err / max(1.0, abs(analytic), abs(numeric))
            row.worst = (tuple(int(v) for v in index), analytic, numeric)
    return row


def _coordinate(f, f0, arr, index, analytic, eps, tol) -> tuple[str, float]:
    """("pass" | "fail" | "kink", the numeric derivative) of one coordinate. A miss at eps is
    retried at eps / 10: truncation error shrinks there (a pass), a smooth function's one-sided
    slopes close in 10-fold, while at a kink within eps / 10 they stay apart by the jump in slope,
    with the analytic gradient (one side's slope) between them."""
    slopes = []
    for h in (eps, eps / 10):
        up, down = central_difference(f, arr, index, h)
        numeric = (up - down) / (2 * h)
        scale = max(1.0, abs(analytic), abs(numeric))
        if abs(analytic - numeric) <= tol * scale:
            return "pass", numeric
        slopes.append(((f0 - down) / h, (up - f0) / h))
    (l1, r1), (l2, r2) = slopes
    gap = abs(l2 - r2)
    if gap > tol * scale and gap > 0.5 * abs(l1 - r1) and \
            min(l2, r2) - tol * scale <= analytic <= max(l2, r2) + tol * scale:
        return "kink", numeric
    return "fail", numeric


def _random_inputs(net, rng) -> dict:
    """Random values for the net's Input tops: standard normal, except what a loss reads as labels
    (random class indices of its scores' axis 1, or distributions over it for soft labels)."""
    plan = net.plan
    labels = {}
    for s in plan.steps:
        for k, b in enumerate(s.node.bottoms[1:], 1):
            if not s.layer.allow_force_backward(k):
                labels[b] = tuple(plan.blob_shapes[s.node.bottoms[0]])
    out = {}
    for name in plan.inputs:
        shape = tuple(plan.blob_shapes[name])
        scores = labels.get(name)
        if scores is None:
            out[name.split("#")[0]] = rng.standard_normal(shape)
        elif shape == scores:
            t = rng.uniform(0.05, 1, shape)
            out[name.split("#")[0]] = t / t.sum(axis=1, keepdims=True)
        else:
            out[name.split("#")[0]] = rng.integers(0, scores[1] if len(scores) > 1 else 1, shape).astype(np.float64)
    return out
