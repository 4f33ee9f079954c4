"""Graph-mode training: choose it for a Trainer, and the solver loop over replayed CUDA graphs.

The loop keeps Caffe's order and logs (test at test_interval, display, snapshot) but runs the
iterations between two such events as one chunk of graph replays, reading the losses back once
per chunk: no host synchronisation inside a chunk.
"""
from __future__ import annotations

import math
import time

from ..errors import NetdslError
from .lower import Unsupported

GRAPH_MODES = ("on", "off", "auto")
CHUNK = 1000                     # iterations between host round trips at most (and the window)


def compile_trainer(trainer, mode: str):
    """The CompiledNet for a Trainer, or None for eager training. `mode` 'on' makes every reason
    for eager an error; 'auto' (the default) logs it and trains eagerly."""
    if mode not in GRAPH_MODES:
        raise NetdslError("E0806", f"unknown --graph mode '{mode}'", help="use --graph on, off or auto")
    if mode == "off":
        return None
    if trainer.backend.name != "gpu":
        if mode == "on":
            raise NetdslError("E0806", "--graph on needs --device gpu (the compiled step is CUDA)",
                              help="add --device gpu, or drop --graph on to train eagerly on the CPU")
        return None
    from .runtime import CompiledNet
    cfg = trainer.sf.cfg
    try:
        compiled = CompiledNet(trainer.net, trainer.solver, cfg, trainer.tests, cfg.test_iter,
                               xp=trainer.backend.xp, window=CHUNK)
    except Unsupported as e:
        if mode == "on":
            raise NetdslError("E0805", f"--graph on: graph mode cannot compile this training: {e}",
                              help="train with --graph off (eager CuPy), or change the net or solver") from None
        trainer.log(f"Graph mode unavailable ({e}); training eagerly", echo=True)
        return None
    for i, why in enumerate(compiled.test_reasons):
        if why:
            trainer.log(f"Test net #{i} runs eagerly: {why}", echo=True)
    trainer.log(f"Graph mode: {len(compiled.train.launches)} kernels per iteration in one CUDA graph "
                f"(arena {compiled.train.arena_bytes / 2**20:.2f} MiB)")
    return compiled


def train_compiled(tr, progress, start: int, t0: float) -> None:
    """Trainer's loop in graph mode: chunks of replays between tests and snapshots."""
    from ..solver import learning_rate
    cfg, step = tr.sf.cfg, tr.compiled
    while tr.iter < cfg.max_iter and not tr.stop_requested:
        tr.maybe_test()
        end = min(cfg.max_iter, tr.iter + CHUNK)
        for every in (cfg.test_interval, cfg.snapshot):
            if every:
                end = min(end, (tr.iter // every + 1) * every)
        first = tr.iter
        losses = step.train_chunk(first, end - first)
        tr.net.forward_count += end - first
        now = time.time()
        for k, loss in zip(range(first, end), losses.tolist()):
            if not math.isfinite(loss):
                tr.iter = end
                raise NetdslError("E0710", f"training diverged at iteration {k}: the loss is NaN or Inf",
                                  notes=["graph mode checks the loss once per chunk of iterations; "
                                         "rerun with --graph off to find the first layer that produced it"]
                                  + ([f"the last snapshot is {tr.last_snapshot}{tr.weights_suffix}"] if tr.last_snapshot else []),
                                  help="lower base_lr, add clip_gradients (eager), or check the input scaling")
            tr.losses.append(loss)
            if cfg.display and k % cfg.display == 0:
                smoothed = sum(tr.losses) / len(tr.losses)
                tr.display(k, smoothed, learning_rate(cfg, k), (end - start) / max(now - t0, 1e-9))
        tr.iter = end
        progress.update(tr.iter, sum(tr.losses) / max(len(tr.losses), 1), learning_rate(cfg, tr.iter - 1), start)
        if cfg.snapshot and tr.iter % cfg.snapshot == 0:
            progress.clear()
            tr.snapshot()
