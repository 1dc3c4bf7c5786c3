"""Worker threads (``etcdcron-worker-N``): the only threads that call the user's trigger.

A fixed pool takes ``(name, token)`` items from a queue and runs them; a stop sentinel is passed
from worker to worker. :func:`to_result` turns whatever a trigger returned into a
:class:`~etcdcron.TriggerResult`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable

from etcdcron._pb import api_pb2
from etcdcron.api import TriggerResult
from etcdcron.supervise import Loop

__all__ = ["WorkerPool", "to_result"]

log = logging.getLogger(__name__)

_STOP = object()


def to_result(value: object) -> TriggerResult:
    """The :class:`TriggerResult` a trigger's return value stands for.

    ``None`` and ``True`` mean SUCCESS, ``False`` FAILED; a ``TriggerResult``, its integer, or a
    ``TriggerResponse`` message is taken as it is.

    :raises TypeError: for anything else.
    """
    if value is None or value is True:
        return TriggerResult.SUCCESS
    if value is False:
        return TriggerResult.FAILED
    if isinstance(value, api_pb2.TriggerResponse):
        value = value.result
    if isinstance(value, int) and value in TriggerResult._value2member_map_:
        return TriggerResult(value)
    raise TypeError(
        f"trigger returned {value!r}; expected a TriggerResult, True, False, None or a Future"
    )


class WorkerPool:
    """``size`` threads running ``run(name, token)`` for each submitted item.

    Anything ``run`` raises for one item (``BaseException`` included) is logged with the job's
    name, and the worker goes on with the next item.
    """

    def __init__(self, size: int, run: Callable[[str, int], None],
                 logger: logging.Logger | None = None):
        self._run = run
        self._log = logger or log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self.loops = [
            Loop(f"etcdcron-worker-{i}", self._loop, stopping=self._stopped.is_set,
                 wait=self._stopped.wait, logger=self._log)
            for i in range(size)
        ]
        self.threads = [loop.thread for loop in self.loops]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def submit(self, items: Iterable[tuple[str, int]]) -> None:
        for item in items:
            self._queue.put(item)

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(_STOP)

    def _loop(self, loop: Loop) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.put(_STOP)
                return
            try:
                self._run(*item)
            except BaseException as exc:  # noqa: BLE001 - the worker goes on with the next job
                self._log.error("etcdcron worker failed running job %r", item[0], exc_info=exc)
            loop.progress()
