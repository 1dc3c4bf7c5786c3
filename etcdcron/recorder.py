"""The recorder threads (``etcdcron-recorder``, ``-1``, ``-2``): make trigger results durable, many
per round trip.

Workers queue :class:`Outcome` items; a recorder thread takes the first that arrives plus
whatever else is already waiting (up to :data:`MAX_BATCH`) and hands the batch to the engine,
which commits it as one etcd transaction. Batching adds no delay: a lone result is committed at
once. In a burst (a full batch taken and :data:`BACKLOG` more waiting), up to :data:`THREADS - 1`
more threads take batches too, so that several transactions are in flight (etcd's round trip,
not the CPU, bounds one of them); otherwise one thread keeps the batches large. A job has one
outcome in flight at a time, so one job's outcomes never race each other.

An outcome that etcd refused (or that could not be written for any other reason) comes back
with :meth:`Recorder.retry_later` and joins a later batch once its delay has passed.

Before each batch the recorder calls ``hold``, which may wait a little: the engine holds results
back (bounded) while triggers that fell due at the same time still wait for a worker, so that
recording them does not slow down firing the rest.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from datetime import datetime

from etcdcron.api import TriggerResult
from etcdcron.index import Ownership
from etcdcron.supervise import Loop

__all__ = ["Outcome", "Recorder", "MAX_BATCH"]

log = logging.getLogger(__name__)

#: Inner transactions per etcd transaction; etcd's default --max-txn-ops is 128.
MAX_BATCH = 100
#: Recorder threads, so many transactions in flight at once.
THREADS = 3
#: Outcomes waiting that make a backlog: then the helper threads take batches too.
BACKLOG = 4 * MAX_BATCH

_STOP = object()
_WAKE = object()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A result to record for one job version.

    ``result`` is ``None`` for a job that has nothing left to do and is to be deleted, or,
    with ``refresh``, for a job whose counter is to be read again before it is armed (another
    replica's trigger of it was just recorded).
    """

    name: str
    token: int
    ownership: Ownership
    tick: datetime | None = None
    result: TriggerResult | None = None
    refresh: bool = False
    run: int | None = None  #: the delivery this result is for (None: no delivery)
    #: ``(latest tick skipped, ticks skipped)``: the job's catch-up policy skipped instead
    skip: tuple[datetime, int] | None = None


class Recorder:
    """Batches outcomes for ``commit``, which must never raise for one bad outcome; if it raises
    anyway, the whole batch is offered to ``commit`` again after a backoff."""

    def __init__(self, commit: Callable[[list[Outcome]], None],
                 logger: logging.Logger | None = None, threads: int = THREADS,
                 hold: Callable[[], None] | None = None):
        self._commit = commit
        self._hold = hold
        self._log = logger or log
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # Outcome, _WAKE or _STOP
        self._stopped = threading.Event()
        # Guards _later: outcomes to try again, (monotonic due time, seq, outcome).
        self._lock = threading.Lock()
        self._later: list[tuple[float, int, Outcome]] = []
        self._seq = itertools.count()
        # Set while a backlog of full batches waits: the helper threads take batches then.
        self._backlog = threading.Event()
        self.loops = [Loop("etcdcron-recorder" + (f"-{i}" if i else ""),
                           self._loop if i == 0 else self._help,
                           stopping=self._stopped.is_set, wait=self._stopped.wait,
                           logger=self._log)
                      for i in range(threads)]
        self.loop = self.loops[0]
        self.thread = self.loop.thread

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def put(self, outcome: Outcome) -> None:
        self._queue.put(outcome)

    def retry_later(self, outcome: Outcome, delay: float) -> None:
        """Offer ``outcome`` to the engine again in ``delay`` seconds."""
        with self._lock:
            heapq.heappush(self._later, (time.monotonic() + delay, next(self._seq), outcome))
        self._queue.put(_WAKE)  # so that a thread waiting for work sees the new deadline

    def stop(self) -> None:
        """Stop after committing everything queued so far (outcomes waiting to be retried are
        dropped: their session is ending)."""
        self._stopped.set()
        self._backlog.set()
        self._queue.put(_STOP)

    def _next_batch(self) -> list[Outcome]:
        with self._lock:
            timeout = max(0.0, self._later[0][0] - time.monotonic()) if self._later else None
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            batch = []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        with self._lock:
            while self._later and self._later[0][0] <= now and len(batch) < MAX_BATCH:
                batch.append(heapq.heappop(self._later)[2])
        return [item for item in batch if item is not _WAKE]

    def _loop(self, loop: Loop) -> None:
        stopping = False
        while not stopping:
            batch = self._next_batch()
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if len(batch) >= MAX_BATCH and self._queue.qsize() >= BACKLOG:
                self._backlog.set()
            if batch:
                self._commit_or_retry(batch)
                loop.progress()

    def _help(self, loop: Loop) -> None:
        """A helper thread: takes full batches while a backlog lasts."""
        while not self._stopped.is_set():
            self._backlog.wait()
            if self._stopped.is_set():
                return
            batch: list[Outcome] = []
            while len(batch) < MAX_BATCH and self._queue.qsize():
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # the main thread's to see
                    break
                if item is not _WAKE:
                    batch.append(item)
            if self._queue.qsize() < BACKLOG:
                self._backlog.clear()
            if batch:
                self._commit_or_retry(batch)
                loop.progress()

    def _commit_or_retry(self, batch: list[Outcome]) -> None:
        if self._hold is not None:
            self._hold()
        try:
            self._commit(batch)
        except BaseException:
            for outcome in batch:
                self.retry_later(outcome, 0.0)
            raise
