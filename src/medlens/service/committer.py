"""Group commit for the audit trail (:class:`GroupCommitter`) and the withheld version of a row.

Split from :mod:`medlens.service.audit` (the table and its reads): this is the one writer thread of a server
process, and the place where a row's fate (written as answered, or withheld) is decided; see docs/AUDIT.md.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import OperationalError

from medlens.service.audit import AuditLog

_log = logging.getLogger("medlens.service.audit")


class GroupCommitter:
    """Group commit for the audit trail: one writer thread, one transaction for every row waiting.

    A durable commit (an fsync) costs milliseconds however many rows it holds. Requests hand their prepared row
    to :meth:`submit` and wait on the returned future; the writer takes everything queued, writes it with
    :meth:`AuditLog.insert_rows` in one transaction, and resolves each future only after that commit. So a
    request is still answered only once its own row is durable, while 16 concurrent requests share a commit
    instead of queueing for 16. No deliberate wait: a batch is what arrived during the previous commit. If
    a batch fails on a row (a constraint), its rows are retried one by one, so one bad row fails only its own
    request; if the database itself fails (locked, unreachable, disk full) the whole batch fails at once.

    Withheld answers (the audit row's truth; see docs/AUDIT.md): a row is submitted with a deadline, after which
    its request answers 503 instead of the prediction. The row's fate is decided exactly once, under a lock,
    between the request and this writer: the writer *claims* a row before it writes it (then the request waits
    for that one transaction's outcome, which the database's lock timeout bounds), or the request *withdraws* it
    first (then the writer never writes it, and a withheld version takes its place: status 503, the reason, no
    prediction). A row claimed after its deadline is written in its withheld version. When the database fails,
    the failed rows' requests answer 503 and their withheld versions wait in memory and are written with the
    next commit that succeeds (or at shutdown). So no row ever says 200 for an answer the client did not get,
    and ``GET /v1/predictions/{id}`` (2xx rows only) never serves a withheld prediction.
    """

    WITHDRAWN, CLAIMED, QUEUED = "withdrawn", "claimed", "queued"

    def __init__(self, audit: AuditLog, *, max_rows: int = 256):
        import queue
        import threading

        self.audit = audit
        self.max_rows = max_rows
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fate = threading.Lock()  # decides, once per row, claimed (by the writer) or withdrawn (by its request)
        self._deferred: list[dict[str, Any]] = []  # withheld rows waiting for the database to come back
        self._stop = object()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="medlens-audit-writer", daemon=True)
        self._thread.start()
        self.commits = 0
        self.rows = 0

    def submit(self, row: dict[str, Any], *, deadline: float | None = None):
        """Queue a prepared row; the ``concurrent.futures.Future`` resolves to True/False (inserted / duplicate)
        after the commit that holds it, to :data:`WITHHELD` when the row was written in its withheld version
        (claimed after ``deadline``, a ``time.monotonic()`` value), or to the exception that stopped it."""
        from concurrent.futures import Future

        future: Future = Future()
        future.audit_state = self.QUEUED
        future.audit_deadline = deadline
        if self._closed:
            future.set_exception(RuntimeError("the audit writer has stopped"))
            return future
        self._queue.put((row, future))
        return future

    def withdraw(self, future, reason: str) -> bool:
        """The request of a submitted row gives up waiting: if the writer has not claimed the row yet, it never
        will, its withheld version (status 503, ``reason``) is queued instead, and this returns True. False when
        the row is already being written: then the request must wait for that transaction's outcome."""
        with self._fate:
            if future.audit_state != self.QUEUED:
                return False
            future.audit_state = self.WITHDRAWN
        future.audit_withheld_reason = reason
        return True

    def _claim(self, batch: list) -> list:
        """Claim the rows of ``batch`` for writing (under the fate lock); withdrawn rows become their withheld
        versions, rows past their deadline too (their requests will answer 503)."""
        import time as _time

        now = _time.monotonic()
        out = []
        with self._fate:
            for row, future in batch:
                if future.audit_state == self.WITHDRAWN:
                    out.append((withheld_row(row, getattr(future, "audit_withheld_reason", "")), None))
                    continue
                future.audit_state = self.CLAIMED
                if future.audit_deadline is not None and now > future.audit_deadline:
                    row = withheld_row(row, "the audit trail did not record the answer in time, so it was "
                                            "withheld (503)")
                    future.audit_withheld = True
                out.append((row, future))
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread; rows submitted after this fail at once."""
        self._closed = True
        self._queue.put(self._stop)
        self._thread.join(timeout)

    def _run(self) -> None:
        import queue

        stopping = False
        while not stopping:
            try:  # withheld rows waiting for the database: try again every few seconds even when idle
                item = self._queue.get(timeout=DEFERRED_RETRY_S) if self._deferred else self._queue.get()
            except queue.Empty:
                item = None
            stopping = item is self._stop
            batch = [] if stopping or item is None else [item]
            while len(batch) < self.max_rows:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is self._stop:
                    stopping = True
                    continue
                batch.append(more)
            if batch or self._deferred:
                batch = self._claim(batch)
                try:
                    self._write(batch)
                except BaseException as exc:  # noqa: BLE001 - never let the writer die with requests waiting
                    for _, future in batch:
                        if future is not None:
                            _resolve(future, exc=exc)
        leftover = []
        while True:  # anything that raced past the stop marker: refuse it rather than leave it waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is self._stop:
                continue
            with self._fate:
                withdrawn = item[1].audit_state == self.WITHDRAWN
            if withdrawn:  # its client already got 503: its withheld version is still owed to the trail
                leftover.append(withheld_row(item[0], getattr(item[1], "audit_withheld_reason", "")))
            else:
                _resolve(item[1], exc=RuntimeError("the audit writer has stopped"))
        if leftover or self._deferred:
            try:
                self._write([(row, None) for row in leftover])
            except Exception as exc:  # noqa: BLE001 - shutting down: say what could not be written
                _log.error("%d withheld audit rows could not be written at shutdown (%s)",
                           len(leftover) + len(self._deferred), type(exc).__name__)
            if self._deferred:
                _log.error("%d withheld audit rows could not be written at shutdown: the database is failing",
                           len(self._deferred))

    def _write(self, batch: list) -> None:
        deferred, self._deferred = self._deferred, []
        batch = [(row, None) for row in deferred] + batch
        try:
            results = self.audit.insert_rows([row for row, _ in batch])
        except OperationalError as exc:  # the database, not a row: every request here answers 503
            _log.warning("audit batch of %d rows failed (%s: %s); their answers are withheld and recorded as "
                         "such once the database is back", len(batch), type(exc).__name__,
                         str(exc).splitlines()[0][:200] if str(exc) else "")
            for row, future in batch:
                self._deferred.append(row if future is None or row.get("status") == WITHHELD_STATUS else
                                      withheld_row(row, "the audit trail could not be written ("
                                                        f"{type(exc).__name__}), so the answer was withheld (503)"))
                if future is not None:
                    _resolve(future, exc=exc)
            return
        except Exception as exc:  # noqa: BLE001 - isolate the failing row: retry each in its own transaction
            _log.warning("audit batch of %d rows failed (%s: %s); retrying row by row", len(batch),
                         type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            for row, future in batch:
                try:
                    inserted = self.audit.insert_rows([row])[0]
                    if future is not None:
                        _resolve(future, result=WITHHELD if getattr(future, "audit_withheld", False) else inserted)
                except Exception as exc2:  # noqa: BLE001 - handed to the waiting request
                    if future is not None:
                        _resolve(future, exc=exc2)
            return
        self.commits += 1
        self.rows += len(batch)
        for (_, future), inserted in zip(batch, results, strict=True):
            if future is not None:
                _resolve(future, result=WITHHELD if getattr(future, "audit_withheld", False) else inserted)


#: seconds between attempts to write withheld rows while the database is failing
DEFERRED_RETRY_S = 2.0
#: what a row's future resolves to when the row was written in its withheld version
WITHHELD = "withheld"
WITHHELD_STATUS = 503


def withheld_row(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """The withheld version of a prepared row: the client got 503, not the answer, so the row says 503 and why,
    and holds no prediction (it must never be served later)."""
    return {**row, "status": WITHHELD_STATUS, "output": None, "error": reason or "the answer was withheld (503)",
            "in_domain": None, "domain_score": None, "domain_reason": None}


def _resolve(future, *, result: Any = None, exc: BaseException | None = None) -> None:
    """Settle a future unless its request gave up (cancelled): the row is written either way."""
    from concurrent.futures import InvalidStateError

    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the call
        pass
