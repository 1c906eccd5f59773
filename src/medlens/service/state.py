"""The service's state and life cycle: what the endpoints share, opened in the app's lifespan.

:class:`ServiceState` loads the model (:class:`~medlens.inference.Predictor`), opens the audit trail and its
group-commit writer (:class:`~medlens.service.committer.GroupCommitter`), the API keys and the rate limiter, and
starts the model runner (:class:`~medlens.service.batching.MicroBatcher`, or one forward pass per request with
``batching=False``). :class:`InputCache` holds recent inputs for heat maps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch

import medlens
from medlens.service.committer import GroupCommitter
from medlens.service.metrics import ServiceMetrics
from medlens.service.settings import ServiceSettings
from medlens.service.uploads import DecodeGate

log = logging.getLogger(__name__)

#: recent inputs kept in memory for heat maps
INPUT_CACHE_SIZE = 256


@dataclass
class HeldInput:
    """A recent prediction's input, kept for its heat map."""

    image: torch.Tensor  # uint8 (1, 1, S, S): the network input
    display: np.ndarray  # uint8 (H, W): the upload, longest side <= uploads.DISPLAY_MAX_SIDE
    target: int  # the class of the label shown
    cam: np.ndarray | None = None  # computed on the first heat-map request


class InputCache:
    """A thread-safe LRU of :class:`HeldInput` by prediction id, bounded in entries (and so in memory)."""

    def __init__(self, capacity: int = INPUT_CACHE_SIZE):
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, HeldInput] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, value: HeldInput) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: str) -> HeldInput | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class ServiceState:
    """Everything the endpoints share: settings, model, audit trail and its writer, keys, limiter, runner,
    metrics and the input cache. ``app.state.service`` of the app :func:`~medlens.service.app.create_app` makes.

    :meth:`start` / :meth:`stop` are reference-counted, so the app can be started by more than one lifespan
    at once (a test client and a fuzzer on the same app) and is shut down when the last one ends.
    """

    def __init__(self, run_dir: Path, settings: ServiceSettings, *, batching: bool, device: str,
                 torch_threads: int | None, workers: int | None, cache_size: int, backend: str = "torch"):
        self.run_dir = run_dir
        self.backend = backend
        self.settings = settings
        self.batching = batching
        self.device = device
        self.torch_threads = torch_threads
        self.workers = workers
        self.metrics = ServiceMetrics()
        self.inputs = InputCache(cache_size)
        # decodes in flight share one memory budget (medlens.service.uploads: a bound on the peak, not a rate)
        self.decode_gate = DecodeGate(settings.max_decode_bytes, settings.max_concurrent_decodes)
        self.predictor: Any = None
        self.audit: Any = None
        self.keys: Any = None
        self.limiter: Any = None
        self.anonymous: Any = None  # limits.AnonymousTraffic: requests without a valid key (per address)
        self.readiness: Any = None  # health.ReadinessProbe: can the audit trail commit? (/readyz)
        self.runner: Any = None
        self.lock: Any = None
        self.methods: list[str] = []
        self.ready = False
        # Audit rows go through one writer thread that commits every row waiting in one transaction (group
        # commit): one fsync for many requests, and no writers colliding inside SQLite's busy handler (which
        # sleeps up to 100 ms a try). Each request is still answered only after its own row is committed.
        self.audit_writer: GroupCommitter | None = None
        self._users = 0
        self._start_lock = threading.Lock()
        self._restore: list[Callable[[], None]] = []

    # -- life cycle

    def start(self) -> None:
        with self._start_lock:
            self._users += 1
            if self._users > 1:
                return
            try:
                self._start()
            except BaseException:
                self._users -= 1
                self._close()
                raise

    def _start(self) -> None:
        from medlens.inference import Predictor
        from medlens.service.audit import AuditLog
        from medlens.service.auth import KeyStore, RateLimiter
        from medlens.service.batching import DirectRunner, MicroBatcher, ModelLock, default_workers
        from medlens.service.db import create_engine
        from medlens.service.health import ReadinessProbe
        from medlens.service.limits import AnonymousTraffic
        from medlens.uncertainty import available_methods

        threads = 1 if self.torch_threads is None else self.torch_threads
        if threads > 0 and threads != torch.get_num_threads():
            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            self._restore.append(lambda: torch.set_num_threads(previous_threads))
        self._quiet_dicom_validation()
        self._raise_pillow_limit()
        started = time.perf_counter()
        self.predictor = Predictor.from_run(self.run_dir, device=self.device, backend=self.backend)
        card = self.predictor.card
        self.methods = available_methods(self.predictor.model)
        engine = create_engine(self.settings.database_url, pool_size=self.settings.db_pool_size)
        self.audit = AuditLog(engine, hash_key=self.settings.audit_key)
        self.audit_writer = GroupCommitter(self.audit)
        self.keys = KeyStore(engine, quick=True)  # keys answered on the event loop where possible (.keycache)
        self.limiter = RateLimiter(self.settings.rate_limit_per_minute)
        self.anonymous = AnonymousTraffic(self.settings, self.audit, self._model_fields)
        self.readiness = ReadinessProbe(engine)
        self.lock = ModelLock()
        workers = self.workers or (1 if self.predictor.device.type == "cuda" else default_workers())
        if self.batching:
            self.runner = MicroBatcher(self._predict, max_size=self.settings.batch_max_size,
                                       max_wait_ms=self.settings.batch_max_wait_ms, workers=workers,
                                       threads=threads or None, lock=self.lock, on_batch=self.metrics.observe_batch)
        else:
            self.runner = DirectRunner(self._predict, workers=workers, threads=threads or None, lock=self.lock,
                                       on_batch=self.metrics.observe_batch)
        self.runner.start()
        self.metrics.set_model(card.model_id, card.weights_sha256, medlens.__version__)
        self.ready = True
        log.info("serving %s (%s) on %s (%s backend) with %s; %d model workers x %d torch threads; model loaded in "
                 "%.1f s; settings %s", card.model_id, self.run_dir, self.predictor.device, self.backend,
                 "micro-batching" if self.batching else "one forward pass per request", workers,
                 torch.get_num_threads(), time.perf_counter() - started, json.dumps(self.settings.public_dict()))

    def _quiet_dicom_validation(self) -> None:
        """pydicom's reading-validation warnings quote element values (a patient's name, say): off while serving."""
        from pydicom import config

        previous = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE

        def restore() -> None:
            config.settings.reading_validation_mode = previous

        self._restore.append(restore)

    def _raise_pillow_limit(self) -> None:
        """Our pixel limit is checked from the header first; Pillow's own (lower) bomb check must not refuse
        an image we accept. Raised only, never lowered."""
        from PIL import Image

        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None and previous < self.settings.max_image_pixels:
            Image.MAX_IMAGE_PIXELS = self.settings.max_image_pixels

            def restore() -> None:
                Image.MAX_IMAGE_PIXELS = previous

            self._restore.append(restore)

    def stop(self) -> None:
        with self._start_lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                self._close()

    def _close(self) -> None:
        self.ready = False
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.stop()
        anonymous, self.anonymous = self.anonymous, None
        if anonymous is not None:  # the summary rows of what it counted since the last full minute
            anonymous.close()
        writer, self.audit_writer = self.audit_writer, None
        if writer is not None:
            writer.close()
        if self.keys is not None:  # stops its cache's listener (the engine is the audit trail's, disposed below)
            self.keys.close()
        if self.audit is not None:
            self.audit.engine.dispose()
        while self._restore:
            self._restore.pop()()

    # -- model calls

    def _predict(self, images: torch.Tensor, method: str) -> dict[str, np.ndarray]:
        out = self.predictor.predict_and_score(images, method)  # + the learned in-domain score (NaN: none)
        if "refer" not in out:  # no referral policy for this method in the card
            out["refer"] = np.full(len(images), -1, dtype=np.int64)
        return out

    def _model_fields(self) -> dict[str, Any]:
        """The model fields every audit row carries (for rows written outside a request)."""
        card = self.card
        return {"model_id": card.model_id if card else None,
                "policy_hash": (card.policy_hash or None) if card else None,
                "weights_sha256": (card.weights_sha256 or None) if card else None}

    @property
    def card(self) -> Any:
        return None if self.predictor is None else self.predictor.card


def lifespan(state: ServiceState) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: :meth:`ServiceState.start` (model, database, batcher, audit writer) before the first
    request, :meth:`ServiceState.stop` after the last; both on a worker thread (they block)."""

    @contextlib.asynccontextmanager
    async def run(_app: Any) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(state.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.stop)

    return run
