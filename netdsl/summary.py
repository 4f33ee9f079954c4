"""The checked net as a table (torchinfo-style) and as the stable `check --json` object."""
from __future__ import annotations

import math

from .registry import fmt
from .shapes import ShapedGraph


def _count(shape) -> int | None:
    return None if any(d is None for d in shape) else math.prod(shape)


def layer_rows(ch: ShapedGraph) -> list[dict]:
    g, rows = ch.graph, []
    for node in g.nodes:
        layer = node.layer
        pshapes = [list(s) for s in ch.params(node)]
        counts = [_count(s) for s in ch.params(node)]
        rows.append({
            "name": layer.name, "type": layer.type,
            "bottoms": [g.display(b) for b in node.bottoms], "tops": list(layer.spec.tops),
            "top_shapes": {u: list(ch.blobs[t]) if t in ch.blobs else None
                           for u, t in zip(layer.spec.tops, node.tops)},
            "param_shapes": pshapes,
            "params": sum(c for c in counts if c is not None),
            "macs": _macs(ch, node),
        })
    return rows


def _macs(ch: ShapedGraph, node) -> int:
    shapes = ch.nodes.get(node)
    try:
        m = node.layer.macs(list(shapes.bottoms), list(shapes.tops)) if shapes is not None else 0
    except TypeError:          # an unknown (data-dependent) dimension
        return 0
    return int(m or 0)


def totals(ch: ShapedGraph) -> dict:
    g = ch.graph
    seen, trainable, frozen, unknown = set(), 0, 0, []
    for node in g.nodes:
        for i, s in enumerate(ch.params(node)):
            spec = node.param_specs[i] if i < len(node.param_specs) else None
            key = spec.name if spec is not None and spec.name else (node.name, i)
            n = _count(s)
            if n is None and node.name not in unknown:
                unknown.append(node.name)          # its size needs a dim known only at run time
            if key in seen or n is None:
                continue
            seen.add(key)
            if node.layer.frozen_params or (spec is not None and spec.lr_mult == 0):
                frozen += n
            else:
                trainable += n
    macs = sum(_macs(ch, n) for n in g.nodes)
    batch = next((s[0] for n in g.nodes if n.layer.is_data for t in n.tops
                  if (s := ch.blobs.get(t)) and s and s[0]), 1)
    act = {}
    for t, s in ch.blobs.items():
        n = _count(s)
        if n is not None:
            act[g.display(t)] = max(act.get(g.display(t), 0), n)
    return {"trainable_params": trainable, "frozen_params": frozen, "total_params": trainable + frozen,
            "params_unknown": unknown,
            "macs_per_batch": macs, "macs_per_sample": macs // batch if batch else macs, "batch": batch,
            "activation_bytes": 4 * sum(act.values())}


def to_json(ch: ShapedGraph | None, net: str, phase: str, diagnostics) -> dict:
    rows = layer_rows(ch) if ch else []
    t = totals(ch) if ch else {"total_params": 0, "macs_per_batch": 0}
    return {"ok": ch is not None and not any(d.severity == "error" for d in diagnostics),
            "net": net, "phase": phase.lower(), "layers": rows, "total_params": t["total_params"],
            "params_unknown": t.get("params_unknown", []), "total_macs": t["macs_per_batch"],
            "diagnostics": [d.to_json() for d in diagnostics]}


def _names(layers: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in layers[:4])
    return shown + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")


def human(n: float, unit: str = "") -> str:
    for k, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= k:
            return f"{n / k:.2f}{s}{unit}"
    return f"{int(n)}{unit}"


def human_bytes(n: float) -> str:
    for k, s in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= k:
            return f"{n / k:.2f} {s}"
    return f"{int(n)} B"


def render_table(ch: ShapedGraph) -> str:
    rows = layer_rows(ch)
    head = ("layer", "type", "bottoms -> tops", "output shape", "param shapes", "params", "MACs")
    body = []
    for r in rows:
        shapes = ", ".join(fmt(tuple(s)) if s is not None else "?" for s in r["top_shapes"].values()) or "-"
        body.append((r["name"], r["type"], f"{', '.join(r['bottoms']) or '-'} -> {', '.join(r['tops']) or '-'}",
                     shapes, ", ".join(fmt(tuple(s)) for s in r["param_shapes"]) or "-",
                     f"{r['params']:,}" if r["params"] else "-", human(r["macs"]) if r["macs"] else "-"))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    right = {5, 6}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    rule = "-" * len(line(head))
    t = totals(ch)
    g = ch.graph
    out = [f"net '{g.name or g.file}', phase {g.phase}: {len(rows)} layers", rule, line(head), rule]
    out += [line(b) for b in body]
    out += [rule,
            f"params: {t['total_params']:,} ({t['trainable_params']:,} trainable, {t['frozen_params']:,} frozen)"
            + (f", a lower bound: the params of {_names(t['params_unknown'])} depend on dims known only at run time"
               if t["params_unknown"] else ""),
            f"multiply-adds: {human(t['macs_per_sample'])} per sample, {human(t['macs_per_batch'])} per batch "
            f"of {t['batch']}",
            f"activation memory: {human_bytes(t['activation_bytes'])} per batch (float32)"]
    return "\n".join(out)
