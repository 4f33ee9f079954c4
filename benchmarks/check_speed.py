"""How fast is `netdsl check`? Two numbers, each the median of N runs:

- warm: checking GoogLeNet's deploy prototxt (36 KB, 143 layers) in-process, parse included,
  after one warm-up run (goal: < 50 ms);
- cold: `python -m netdsl check nets/lenet.net` as a fresh process, interpreter start-up and
  imports included (goal: < 400 ms), next to a bare `python -c pass` for reference.

    python benchmarks/check_speed.py [--runs N]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOOGLENET = REPO.parent / "shared" / "reference" / "caffe" / "models_bvlc_googlenet_deploy.prototxt"
LENET = REPO / "nets" / "lenet.net"


def warm(path: Path, runs: int) -> float:
    sys.path.insert(0, str(REPO))
    from netdsl.check import check_path
    check_path(str(path))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        check_path(str(path))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cold(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    if GOOGLENET.exists():
        w = warm(GOOGLENET, args.runs)
        print(f"warm check, GoogLeNet deploy:       {w * 1e3:7.1f} ms  (goal < 50 ms{', met' if w < 0.05 else ', MISSED'})")
    else:
        print(f"warm check: {GOOGLENET} not found, skipped")
    base = cold([sys.executable, "-c", "pass"], args.runs)
    c = cold([sys.executable, "-m", "netdsl", "check", str(LENET)], args.runs)
    print(f"cold CLI, netdsl check nets/lenet.net: {c * 1e3:7.1f} ms  (goal < 400 ms{', met' if c < 0.4 else ', MISSED'})")
    print(f"  of which a bare `python -c pass`:    {base * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
