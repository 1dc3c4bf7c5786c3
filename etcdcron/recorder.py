"""The recorder thread (``etcdcron-recorder``): makes trigger results durable, many per round trip.

Workers queue :class:`Outcome` items; this thread takes the first that arrives plus whatever
else is already waiting (up to :data:`MAX_BATCH`) and hands the batch to the engine, which
commits it as one etcd transaction. Batching adds no delay: a lone result is committed at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from etcdcron.api import TriggerResult
from etcdcron.index import Ownership

__all__ = ["Outcome", "Recorder", "MAX_BATCH"]

log = logging.getLogger(__name__)

#: Inner transactions per etcd transaction; etcd's default --max-txn-ops is 128.
MAX_BATCH = 100

_STOP = object()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A result to record for one job version.

    ``result`` is ``None`` for a job that has nothing left to do and is to be deleted.
    """

    name: str
    token: int
    ownership: Ownership
    tick: datetime | None = None
    result: TriggerResult | None = None


class Recorder:
    def __init__(self, commit: Callable[[list[Outcome]], None],
                 logger: logging.Logger | None = None):
        self._commit = commit
        self._log = logger or log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="etcdcron-recorder", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, outcome: Outcome) -> None:
        self._queue.put(outcome)

    def stop(self) -> None:
        """Stop after committing everything queued so far."""
        self._queue.put(_STOP)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                try:
                    self._commit(batch)
                except Exception:
                    self._log.exception("etcdcron recorder: recording %d results failed", len(batch))
