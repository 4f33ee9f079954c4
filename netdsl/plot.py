"""Plot: loss, lr and test-output curves of a training run from its metrics file, and with
debug_info each layer's param gradient (mean |diff|) over the iterations."""
from __future__ import annotations

import glob
import json
import os

from .errors import NetdslError


def read_metrics(run: str) -> tuple[str, list[dict]]:
    path = run
    if os.path.isdir(run):
        found = sorted(glob.glob(os.path.join(run, "*_metrics.jsonl")))
        if not found:
            raise NetdslError("E0720", f"no *_metrics.jsonl in {run}",
                              help="pass the --out directory of a `netdsl train` run")
        path = found[0]
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise NetdslError("E0720", f"cannot read {path}: {e}", help="pass a run directory or its metrics file") from None
    except json.JSONDecodeError as e:
        raise NetdslError("E0721", f"{path}: not a metrics file ({e})", help="pass a *_metrics.jsonl file") from None
    return path, rows


def plot_run(run: str, output: str) -> str:
    path, rows = read_metrics(run)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NetdslError("E0722", "plotting needs matplotlib, which is not installed",
                          help='pip install "netdsl[plot]"  (or: pip install matplotlib)') from None
    train = [r for r in rows if r.get("kind") == "train"]
    test = [r for r in rows if r.get("kind") == "test"]
    keys = sorted({k for r in test for k in r if k not in ("kind", "net", "iter")})
    debug = [r for r in rows if r.get("kind") == "debug"]      # debug_info: per-layer gradients
    grads = sorted({k for r in debug for k in r.get("param_diff", {})})
    n = 2 + bool(keys) + bool(grads)
    fig, axes = plt.subplots(n, 1, figsize=(8, 3 * n), sharex=True)
    axes[0].plot([r["iter"] for r in train], [r["loss"] for r in train], label="train loss (smoothed)")
    for k in keys:
        if "loss" in k:
            axes[0].plot([r["iter"] for r in test if k in r], [r[k] for r in test if k in r], "o-", label=f"test {k}")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot([r["iter"] for r in train], [r["lr"] for r in train], color="tab:orange")
    axes[1].set_ylabel("lr")
    if keys:
        for k in keys:
            if "loss" not in k:
                axes[2].plot([r["iter"] for r in test if k in r], [r[k] for r in test if k in r], "o-", label=k)
        axes[2].legend()
        axes[2].set_ylabel("test outputs")
    if grads:
        ax = axes[2 + bool(keys)]
        for k in grads:
            ax.plot([r["iter"] for r in debug if k in r.get("param_diff", {})],
                    [r["param_diff"][k] for r in debug if k in r.get("param_diff", {})], label=k)
        ax.set_yscale("log")
        ax.set_ylabel("mean |param diff|")
        ax.legend(fontsize="small", ncol=2)
    axes[-1].set_xlabel("iteration")
    fig.suptitle(os.path.basename(path))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    return output
