"""Running the model for the service: micro-batching (the default) or one forward pass per request.

Why batch. On a CPU a convolutional network's cost per image falls steeply with the batch size (one pass
over the weights serves many images, and the matrix kernels run at a better arithmetic intensity). A server
that runs one forward pass per request therefore saturates early; one that gathers the requests waiting at
the same moment into one batch gets more images through the same cores as the load grows.

Design (:class:`MicroBatcher`):

- Request handlers (coroutines on the event loop) call ``await batcher.submit(image, method)``: the
  preprocessed image (uint8 ``(1, 1, S, S)``) and an :class:`asyncio.Future` of the loop it runs on go
  onto a thread-safe queue; the coroutine then awaits the future, so the event loop stays free.
- A worker thread takes the first item (blocking), then keeps collecting until it holds ``max_size``
  items or ``max_wait_ms`` have passed since that first item. While it runs a batch, new requests queue
  up, so the next batch is larger when the load is higher: the wait bounds the added latency at low load
  and batches form by themselves at high load.
- There are ``workers`` such threads (the service uses one per CPU core, each model call on one torch
  thread). Only one of them collects at a time, so batches are not split between them: while one runs
  its batch, the next one gathers the following batch. On a CPU this beats one multi-threaded call at a
  time: the cores never wait for each other inside an operator, and no OpenMP thread spins idle between
  batches (idle spinning takes the CPU that decoding the next uploads needs).
- The items are grouped by uncertainty method (``softmax`` / ``mc`` / ``tta`` / ``ensemble``); each group
  is one ``predict(images, method)`` call (``Predictor.predict_with_uncertainty``), whose per-image results
  resolve the futures through ``loop.call_soon_threadsafe``. A failing call fails only its group's futures.
- A request that gave up (its future was cancelled, e.g. by the request timeout) is dropped before its
  batch runs, and a late result for it is discarded.

:class:`DirectRunner` has the same interface without batching: each request runs its own forward pass on a
thread pool (``medlens serve --no-batching``, the baseline the load test compares against).

Both take a :class:`ModelLock` around model use: plain forward passes share it (they may run at once), while
work that changes the model's state for a moment (MC dropout switches dropout on, Grad-CAM hooks a layer)
takes it exclusively.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: predict(images (N, 1, S, S) uint8, method) -> {name: array of N values}
PredictFn = Callable[[torch.Tensor, str], dict[str, np.ndarray]]
#: on_batch(size, method, seconds): called after every model call (metrics)
BatchHook = Callable[[int, str, float], None]

#: uncertainty methods whose passes change the model's state (MC dropout turns dropout layers on)
EXCLUSIVE_METHODS = frozenset({"mc"})


class ModelLock:
    """A readers-writer lock for one model: many shared holders, or one exclusive holder.

    Writers are preferred: once an exclusive holder waits, new shared holders wait behind it, so a heat map
    is not starved by a stream of predictions.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    def for_method(self, method: str) -> contextlib.AbstractContextManager[None]:
        """The lock a prediction with ``method`` needs."""
        return self.exclusive() if method in EXCLUSIVE_METHODS else self.shared()


def split_results(out: dict[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    """``{name: array of n}`` -> n dicts ``{name: value}`` of plain Python scalars."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, values in out.items():
        arr = np.asarray(values)
        if arr.shape[:1] != (n,):
            raise ValueError(f"result '{name}' has shape {arr.shape}, expected ({n}, ...)")
        for i in range(n):
            rows[i][name] = arr[i].item() if arr[i].ndim == 0 else arr[i].tolist()
    return rows


@dataclass
class RunnerStats:
    """Counters of a runner, for tests and the load test (the metrics endpoint has the same numbers)."""

    requests: int = 0  # images submitted
    batches: int = 0  # model calls
    images: int = 0  # images that went through a model call
    dropped: int = 0  # items whose request had given up before their batch ran
    sizes: list[int] = field(default_factory=list)  # size of each model call (the last 10,000)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_request(self) -> None:
        with self._lock:
            self.requests += 1

    def add_dropped(self, n: int) -> None:
        with self._lock:
            self.dropped += n

    def add_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.images += size
            self.sizes.append(size)
            if len(self.sizes) > 10_000:
                del self.sizes[:5_000]


@dataclass
class _Item:
    image: torch.Tensor
    method: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    """Runs on the future's loop: set the outcome unless the request has given up meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def default_workers() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class MicroBatcher:
    """Gathers concurrent requests into batched model calls on worker threads (see the module docstring).

    ``predict(images, method)`` is the batched model call, ``max_size`` the most images per call and
    ``max_wait_ms`` how long the first image of a batch waits for company; ``workers`` model calls may run
    at once (default 1), each on ``threads`` torch threads (None: torch's setting). ``lock`` (a
    :class:`ModelLock`) is held around each call; ``on_batch(size, method, seconds)`` is called after each.
    Use :meth:`start` and :meth:`stop` (the service's lifespan does), or the object as a context manager.
    """

    def __init__(self, predict: PredictFn, *, max_size: int = 16, max_wait_ms: float = 5.0, workers: int = 1,
                 threads: int | None = None, lock: ModelLock | None = None, on_batch: BatchHook | None = None):
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.predict = predict
        self.max_size = int(max_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.workers = int(workers)
        self.threads = threads
        self.lock = lock or ModelLock()
        self.on_batch = on_batch
        self.stats = RunnerStats()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._collecting = threading.Lock()  # one worker gathers a batch at a time

    # -- life cycle

    def start(self) -> MicroBatcher:
        """Start the worker threads (daemons: they never keep the process alive)."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, name=f"medlens-batcher-{k}", daemon=True)
                             for k in range(self.workers)]
            for thread in self._threads:
                thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then end the worker threads."""
        threads, self._threads = self._threads, []
        if not threads:
            return
        for _ in threads:  # one stop marker per worker, behind the work already queued
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("a batching worker did not stop within %.0f s", timeout)
        self._drain()  # anything submitted behind the stop markers

    def __enter__(self) -> MicroBatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    # -- the request side

    async def submit(self, image: torch.Tensor, method: str) -> dict[str, Any]:
        """Queue one preprocessed image (``(1, 1, S, S)`` or ``(1, S, S)``); its results when its batch ran."""
        if not self.running:
            raise RuntimeError("the batching workers are not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        image = image if image.ndim == 4 else image.unsqueeze(0)
        self.stats.add_request()
        self._queue.put(_Item(image, method, loop, future))
        return await future

    # -- the worker thread

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        """The first item plus whatever arrives within the wait, up to ``max_size``; and whether to stop."""
        items = [first]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_size:
            try:  # take what is already queued without waiting, then wait out the rest of the window
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    def _run(self) -> None:
        _set_threads(self.threads)
        while True:
            with self._collecting:
                first = self._queue.get()
                if first is None:
                    return
                items, stop = self._collect(first)
            self._run_batch(items)
            if stop:  # this worker took its stop marker while collecting
                return

    def _drain(self) -> None:
        """After the workers ended: run what is still queued (accepted requests get their answer)."""
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                rest.append(item)
        for start in range(0, len(rest), self.max_size):
            self._run_batch(rest[start : start + self.max_size])

    def _run_batch(self, items: list[_Item]) -> None:
        live = [i for i in items if not i.future.done()]  # done = cancelled: the request gave up
        if len(live) < len(items):
            self.stats.add_dropped(len(items) - len(live))
        groups: dict[str, list[_Item]] = {}
        for item in live:
            groups.setdefault(item.method, []).append(item)
        for method, group in groups.items():
            started = time.perf_counter()
            try:
                images = torch.cat([i.image for i in group])
                with self.lock.for_method(method):
                    out = self.predict(images, method)
                rows = split_results(out, len(group))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests, never lost
                for item in group:
                    self._deliver(item, error=exc)
                continue
            finally:
                self.stats.add_batch(len(group))
            for item, row in zip(group, rows, strict=True):
                self._deliver(item, value=row)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(group), method, time.perf_counter() - started)
                except Exception:  # noqa: BLE001 - metrics must never break predictions
                    log.exception("batch hook failed")

    @staticmethod
    def _deliver(item: _Item, value: Any = None, error: BaseException | None = None) -> None:
        try:
            item.loop.call_soon_threadsafe(_resolve, item.future, value, error)
        except RuntimeError:  # the request's event loop has closed: nobody is waiting any more
            pass


def _set_threads(threads: int | None) -> None:
    """Torch's intra-op thread count for the calling thread (OpenMP keeps one per thread), if given."""
    if threads:
        torch.set_num_threads(threads)


class DirectRunner:
    """No batching: each request runs its own ``predict(image, method)`` on a thread pool.

    Same interface as :class:`MicroBatcher` (``start``, ``stop``, ``submit``, ``stats``). ``workers``
    bounds the forward passes running at once (default: the number of CPUs available to the process), each
    on ``threads`` torch threads (None: torch's setting).
    """

    def __init__(self, predict: PredictFn, *, workers: int | None = None, threads: int | None = None,
                 lock: ModelLock | None = None, on_batch: BatchHook | None = None):
        self.predict = predict
        self.workers = workers or default_workers()
        self.threads = threads
        self.lock = lock or ModelLock()
        self.on_batch = on_batch
        self.stats = RunnerStats()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def start(self) -> DirectRunner:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="medlens-predict",
                                                               initializer=_set_threads, initargs=(self.threads,))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)

    def __enter__(self) -> DirectRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._pool is not None

    def _call(self, image: torch.Tensor, method: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            with self.lock.for_method(method):
                out = self.predict(image, method)
        finally:
            self.stats.add_batch(1)
        if self.on_batch is not None:
            try:
                self.on_batch(1, method, time.perf_counter() - started)
            except Exception:  # noqa: BLE001
                log.exception("batch hook failed")
        return split_results(out, 1)[0]

    async def submit(self, image: torch.Tensor, method: str) -> dict[str, Any]:
        if self._pool is None:
            raise RuntimeError("the prediction pool is not running")
        image = image if image.ndim == 4 else image.unsqueeze(0)
        self.stats.add_request()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, image, method)
