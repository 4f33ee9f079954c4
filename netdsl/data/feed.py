"""A data layer's batch stream: batch k is a pure function of (seed, k), made ahead of time on a
background thread (Caffe's prefetch queue), with k the cursor that snapshots save.

Items are visited epoch by epoch: epoch e is a permutation of the n items drawn from (seed, e) when
shuffling, else 0..n-1; the stream starts `skip` items in (Caffe's rand_skip) and batch k is items
skip + k*B .. skip + (k+1)*B - 1 of it, wrapping into the next epoch as Caffe's cursors do. The
random parts of the transform (crop offsets, mirror) of batch k draw from their own stream
(seed, k), so what a batch holds does not depend on whether, or how far ahead, it was prefetched,
and a resumed run reads bit for bit the batches the uninterrupted run would have read."""
from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable

import numpy as np


class BatchFeed:
    """make(indices, rng) -> the tops of one batch. prefetch: batches made ahead (0: made on demand)."""

    def __init__(self, make: Callable, n: int, batch_size: int, seed: int, shuffle: bool = False,
                 skip: int = 0, prefetch: int = 4):
        self.make, self.n, self.batch_size, self.seed = make, n, batch_size, seed
        self.shuffle, self.skip, self.prefetch = shuffle, skip, prefetch
        self._orders: dict[int, np.ndarray] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.cursor = 0

    # -- the stream -------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                                   else np.arange(self.n))
        return self._orders[epoch]

    def indices(self, k: int) -> np.ndarray:
        """The item indices of batch k."""
        j = self.skip + k * self.batch_size + np.arange(self.batch_size)
        epochs, pos = np.divmod(j, self.n)
        return np.concatenate([self.order(int(e))[pos[epochs == e]] for e in np.unique(epochs)])

    def batch(self, k: int) -> list:
        return self.make(self.indices(k), np.random.default_rng([self.seed, k, 1]))

    # -- the cursor (snapshots) -------------------------------------------------------------
    def state(self) -> dict:
        return {"batch": self.cursor}

    def load_state(self, state: dict) -> None:
        self.close()
        self.cursor = int(state["batch"])

    def next(self) -> list:
        """The tops of the batch at the cursor; the cursor moves on only when it was made."""
        if self.prefetch <= 0:
            out = self.batch(self.cursor)
        else:
            if self._thread is None:
                self._start()
            out = self._queue.get()
            if isinstance(out, BaseException):
                self.close()
                raise out
        self.cursor += 1
        return out

    # -- prefetching ------------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=_prefetch, args=(weakref.ref(self), self.cursor, self._queue, self._stop),
                                        name="netdsl-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread (what it made ahead is dropped; the cursor is kept)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def _prefetch(feed_ref, k: int, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: batches k, k+1, ... into q until stopped, an error (handed over, never
    kept: the consumer raises it), or the feed's owner is gone (the thread holds the feed only
    while it makes a batch, so a dropped Net frees its feed and this thread ends)."""
    while not stop.is_set():
        feed = feed_ref()
        if feed is None:
            return
        try:
            item = feed.batch(k)
        except BaseException as e:
            item = e
        del feed
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                if feed_ref() is None:
                    return
        if isinstance(item, BaseException):
            return
        k += 1
