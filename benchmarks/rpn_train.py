"""RPN on digit scenes, end to end on the CPU: train nets/rpn_solver.net, then measure proposal
recall over held-out scenes and inference speed.

Trains with `netdsl train`'s Trainer (same log, snapshots), then runs the TEST net (MNIST *test*
digits, run seed 0: the scenes `netdsl test nets/rpn.net --iterations N` scores) and reports
recall at IoU 0.5 and 0.7 for the top 50/100/300 proposals, training time, ms per scene and
proposals per second (forward pass + Proposal layer, one scene at a time).

    python benchmarks/rpn_train.py                    # the full run (about 20 min on 2 cores)
    python benchmarks/rpn_train.py --max-iter 2000 --scenes 100     # a quick look
    python benchmarks/rpn_train.py --weights runs/rpn_bench/rpn_iter_N.npz   # evaluate only

BLAS threads default to 1 (--threads): on the shared 2-core machine, 2 OpenBLAS threads made an
iteration of this net ~8x slower (251 ms vs 32 ms), because the small GEMMs spin-wait on a busy core.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", default=str(ROOT / "nets" / "rpn_solver.net"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "rpn_bench"))
    ap.add_argument("--max-iter", type=int, help="override the solver's max_iter")
    ap.add_argument("--budget-min", type=float, default=25.0,
                    help="stop training (with a snapshot) after this many minutes (default 25)")
    ap.add_argument("--scenes", type=int, default=500, help="held-out scenes to score (default 500)")
    ap.add_argument("--weights", help="skip training; evaluate these weights")
    ap.add_argument("--threads", default="1", help="BLAS threads (default 1, see the docstring)")
    ap.add_argument("--seed", type=int, help="training seed (default: the solver's random_seed)")
    args = ap.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = args.threads          # before numpy is imported

    os.environ.setdefault("NETDSL_DATA", str(ROOT.parent / "shared" / "data"))
    import numpy as np

    from netdsl.backend import CPU
    from netdsl.evaluate import evaluate_recall, format_recall
    from netdsl.solverfile import load_solver
    from netdsl.train import Trainer

    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "numpy": np.__version__, "blas_threads": args.threads},
              "date": time.strftime("%Y-%m-%d")}
    model = str(Path(load_solver(args.solver).train_net[0]))
    weights = args.weights
    if weights is None:
        trainer = Trainer(args.solver, CPU, seed=args.seed, max_iter=args.max_iter, out=args.out, progress=False)
        timer = threading.Timer(args.budget_min * 60, lambda: setattr(trainer, "stop_requested", True))
        timer.daemon = True
        timer.start()
        result = trainer.run()
        timer.cancel()
        weights = result.last_snapshot + ".npz"
        report["train"] = {"iterations": result.iterations, "seconds": round(result.seconds, 1),
                           "ms_per_iteration": round(1e3 * result.seconds / max(result.iterations, 1), 2),
                           "stopped_by_budget": result.interrupted, "seed": trainer.seed,
                           "final_loss": _last_loss(trainer.prefix + "_metrics.jsonl")}
        print(f"trained {result.iterations} iterations in {result.seconds:.0f} s "
              f"({report['train']['ms_per_iteration']} ms/iteration); weights {weights}", flush=True)
    report["weights"] = weights
    r = evaluate_recall(model, weights, args.scenes, CPU, seed=0)
    report["recall"] = {k: round(v, 4) for k, v in r.items() if k.startswith("recall@")}
    report["eval"] = {"scenes": r["scenes"], "gt_boxes": r["gt_boxes"],
                      "proposals_per_scene": r["proposals_per_scene"],
                      "ms_per_scene": round(r["ms_per_scene"], 2),
                      "proposals_per_second": round(r["proposals_per_second"], 1)}
    print(format_recall(r))
    goal = r["recall@300/iou0.7"]
    print(f"goal recall@300/iou0.7 >= 0.90: {'met' if goal >= 0.90 else 'NOT met'} ({goal:.4f})")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report))
    return 0


def _last_loss(metrics: str):
    try:
        with open(metrics, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    except OSError:
        return None
    rows = [r for r in rows if r.get("kind") == "train"]
    return rows[-1]["loss"] if rows else None


if __name__ == "__main__":
    sys.exit(main())
