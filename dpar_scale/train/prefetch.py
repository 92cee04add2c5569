"""Batches built ahead of the step that trains on them (data.num_workers background threads).

A step's batches are a pure function of the training cursor (train/batches.py), but the next step's cursor is
known only once the current step's sample ids are (packed micro-batches consume a varying number of images). So
the work is split in two: one planner thread walks the cursor ahead — it plans a step (its sample ids; in packed
mode that reads entropies and applies the patch rule), hands the build (gathering codes, patch rule, layouts,
pinning) to the worker pool, and moves the cursor on — and keeps at most data.prefetch_steps steps ahead, keyed
by the cursor they start at. The training loop asks for the cursor it is at; if that is not the one the planner
is on (the first step, after a resume), the pipeline restarts there. Same batches as building them in the loop:
the same functions of the same cursor, only earlier.

Threads, not processes: the heavy parts (memory-mapped reads, numpy/torch ops) release the GIL, and the batches
need not be pickled. Errors raised while planning or building reach the training loop when it asks for that step.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Prefetcher:
    def __init__(self, plan: Callable[[int], Any], build: Callable[[Any], Any], advance: Callable[[Any], int],
                 workers: int, depth: int):
        """`plan(cursor) -> plan`, `build(plan) -> batches`, `advance(plan) -> the next step's cursor`.
        `workers` 0: everything happens in `get`, when asked."""
        self.plan_fn, self.build_fn, self.advance = plan, build, advance
        self.workers, self.depth = workers, depth
        self._pool: ThreadPoolExecutor | None = None  # started with the planner, ended by close
        self._planner: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.starts = 0  # times the planner (re)started at a cursor: 1 for a run that never jumps

    def get(self, cursor: int) -> tuple[Any, Any, float]:
        """(plan, batches, seconds waited) of the step starting at `cursor`."""
        t0 = time.perf_counter()
        if self.workers == 0:
            plan = self.plan_fn(cursor)
            return plan, self.build_fn(plan), time.perf_counter() - t0
        if self._planner is None:
            self._start(cursor)
        start, plan, built = self._queue.get()
        if start != cursor:  # the loop moved elsewhere (resume): plan again from there
            self._halt()
            self._start(cursor)
            start, plan, built = self._queue.get()
        if isinstance(plan, BaseException):
            self._halt()
            raise plan
        batches = built.result()
        return plan, batches, time.perf_counter() - t0

    def close(self) -> None:
        self._halt()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None  # a later `get` starts again

    # ------------------------------------------------------------------------------------------- planner
    def _start(self, cursor: int) -> None:
        self.starts += 1
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dpar-batches")
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._planner = threading.Thread(target=self._plan_ahead, args=(cursor, self._stop, self._queue),
                                         name="dpar-batch-planner", daemon=True)
        self._planner.start()

    def _halt(self) -> None:
        if self._planner is None:
            return
        self._stop.set()
        while self._planner.is_alive():  # unblock a planner waiting to put into the full queue
            try:
                _, _, built = self._queue.get(timeout=0.05)
                if isinstance(built, Future):
                    built.cancel()
            except queue.Empty:
                pass
        self._planner = None

    def _plan_ahead(self, cursor: int, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                plan = self.plan_fn(cursor)
                item = (cursor, plan, self._pool.submit(self.build_fn, plan))
            except BaseException as error:  # handed to the loop, raised when it asks for this step
                item, plan = (cursor, error, None), None
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if plan is None:
                return
            cursor = self.advance(plan)
