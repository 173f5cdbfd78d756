"""Ordered process-parallel map for the shard converters (VOC and COCO ``--workers``).

The converters write shards from one process, in input order; only the per-image work (reading, checking,
decoding, rendering masks, encoding PNGs) goes to worker processes. :class:`OrderedPool` returns the results
in the order of the inputs whatever the workers' timing, so the shards are byte-identical for any number of
workers.
"""

from __future__ import annotations

import gc
import multiprocessing
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from puzzlecam.errors import RunError

# Items sent to a worker at a time, and chunks in flight per worker (bounds the results held in memory).
CHUNK_ITEMS = 8
CHUNKS_PER_WORKER = 4


def _apply_chunk(function: Callable, chunk: Sequence) -> list:
    return [function(item) for item in chunk]


class OrderedPool:
    """``function`` of every item, in order: here (``workers`` <= 1), or in ``workers`` processes with a bounded
    number of chunks in flight. ``function`` must be picklable (a module-level function or a partial of one).

    Create it before any other thread starts (a progress bar's): with fork the workers are all started in the
    constructor, so no child can inherit a lock held by another thread.
    """

    def __init__(self, workers: int, function: Callable):
        self.workers, self.function = workers, function
        self.executor = None
        if workers <= 1:
            return
        # fork: the workers need nothing but the converter's module; elsewhere spawn (fork is unsafe on macOS).
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        gc.freeze()  # the children's garbage collector leaves the parent's objects (shared pages) alone
        try:
            self.executor = ProcessPoolExecutor(workers, mp_context=context)
            self.executor.submit(int).result()  # with fork, every worker starts at the first submit
        finally:
            gc.unfreeze()

    def results(self, items: Sequence) -> Iterator:
        if self.executor is None:
            for item in items:
                yield self.function(item)
            return
        pending: deque = deque()
        try:
            for i in range(0, len(items), CHUNK_ITEMS):
                pending.append(self.executor.submit(_apply_chunk, self.function, items[i : i + CHUNK_ITEMS]))
                if len(pending) >= self.workers * CHUNKS_PER_WORKER:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool as e:
            raise RunError(
                f"a --workers process died while converting images (out of memory? killed?); nothing was written: {e}"
            ) from None

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
