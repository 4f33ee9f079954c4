"""How fast is `netdsl check`? Two numbers, each the median of N runs:

- warm: checking GoogLeNet's deploy prototxt (36 KB, 143 layers) in-process, parse included,
  after one warm-up run (goal: < 50 ms);
- cold: `python -m netdsl check nets/lenet.net` as a fresh process, interpreter start-up and
  imports included (goal: < 400 ms), next to a bare `python -c pass` for reference;
- throughput: parse and check of generated nets of 1 and `--large` MB (a chain of Convolution +
  ReLU layers), in MB/s, to show the cost per MB stays flat as nets grow (issue 14).

    python benchmarks/check_speed.py [--runs N] [--large MB]
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


def chain_net(megabytes: float) -> str:
    """A valid net of about `megabytes` MB: Input, then Convolution + ReLU pairs."""
    lines = ['layer { name: "in" type: "Input" top: "b0" input_param { shape { dim: 1 dim: 8 dim: 16 dim: 16 } } }']
    size, k = len(lines[0]), 0
    while size < megabytes * 1e6:
        k += 1
        for line in (f'layer {{ name: "conv{k}" type: "Convolution" bottom: "b{k - 1}" top: "b{k}"\n'
                     f'  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 weight_filler {{ type: "xavier" }} }} }}',
                     f'layer {{ name: "relu{k}" type: "ReLU" bottom: "b{k}" top: "b{k}" }}'):
            lines.append(line)
            size += len(line) + 1
    return "\n".join(lines)


def throughput(megabytes: float) -> tuple[float, float]:
    """(parse MB/s, parse + check MB/s) for a generated net of `megabytes` MB, in-process."""
    sys.path.insert(0, str(REPO))
    from netdsl.check import check
    from netdsl.syntax import parse
    text = chain_net(megabytes)
    t0 = time.perf_counter()
    ast = parse(text, "<generated>")
    t1 = time.perf_counter()
    check(ast, phase="TEST")
    t2 = time.perf_counter()
    mb = len(text) / 1e6
    return mb / (t1 - t0), mb / (t2 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--large", type=float, default=5.0, help="size in MB of the large generated net")
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
    for mb in (1.0, args.large):
        p, c = throughput(mb)
        print(f"generated {mb:g} MB net: parse {p:.2f} MB/s, parse + check {c:.2f} MB/s")


if __name__ == "__main__":
    main()
