"""Worker threads (``etcdcron-worker-N``): the only threads that call the user's trigger.

A fixed pool takes ``(name, token)`` items from a queue and runs them; a stop sentinel is passed
from worker to worker. :func:`to_result` turns whatever a trigger returned into a
:class:`~etcdcron.TriggerResult`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

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
    # A short scalar is shown; anything else only by its type: it may carry the job's payload
    # (a TriggerRequest returned by mistake), which is never logged.
    shown = repr(value)
    if not isinstance(value, (int, float, str, bytes)) or len(shown) > 40:
        shown = f"a {type(value).__name__}"
    raise TypeError(
        f"trigger returned {shown}; expected a TriggerResult, True, False, None or a Future"
    )


class WorkerPool:
    """``size`` threads running ``run(*item)`` for each submitted item ``(name, token, run)``.

    Anything ``run`` raises for one item (``BaseException`` included) is logged with the job's
    name, and the worker goes on with the next item. A worker stuck in a trigger past its
    timeout (see :meth:`expired`) is replaced, so that the others keep their number; it leaves
    the pool once its trigger returns.
    """

    def __init__(self, size: int, run: Callable[..., None],
                 logger: logging.Logger | None = None):
        self._run = run
        self._log = logger or log
        self._size = size
        # (name, token, run), a task of call(), or _STOP
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._names = itertools.count()
        # Guards _loops, _current and _retired: the worker loops, what each one runs (by loop
        # name), and the loops stuck past a timeout that leave after their item.
        self._lock = threading.Lock()
        self._loops: list[Loop] = [self._new_loop() for _ in range(size)]
        self._current: dict[str, tuple[str, int, int]] = {}
        self._retired: set[str] = set()
        # Notified when a worker took the last item waiting (see wait_taken).
        self._taken = threading.Condition(threading.Lock())

    def _new_loop(self) -> Loop:
        return Loop(f"etcdcron-worker-{next(self._names)}", self._loop,
                    stopping=self._stopped.is_set, wait=self._stopped.wait, logger=self._log)

    @property
    def loops(self) -> list[Loop]:
        with self._lock:
            return list(self._loops)

    @property
    def threads(self) -> list[threading.Thread]:
        return [loop.thread for loop in self.loops]

    def stuck(self) -> list[str]:
        """Names of the jobs whose (synchronous) trigger is stuck past its timeout."""
        with self._lock:
            return sorted(self._current[name][0] for name in self._retired
                          if name in self._current)

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def submit(self, items: Iterable[tuple[str, int, int]]) -> None:
        for item in items:
            self._queue.put(item)

    def call(self, task: Callable[[], object]) -> None:
        """Run ``task()`` on a worker, in turn with the items (what it raises is logged)."""
        self._queue.put(task)

    def wait_taken(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until a worker has taken every item submitted so far (any
        thread); returns whether none is waiting."""
        if self._queue.empty():
            return True
        with self._taken:
            return self._taken.wait_for(self._queue.empty, timeout)

    def expired(self, item: tuple[str, int, int]) -> None:
        """The trigger of ``item`` ran past its timeout: if a worker is still in it, replace
        that worker (up to twice the pool's size in all)."""
        with self._lock:
            stuck = next((name for name, current in self._current.items()
                          if current == item and name not in self._retired), None)
            if stuck is None:
                return
            self._retired.add(stuck)
            if len(self._loops) >= 2 * self._size:
                self._log.error("%d trigger(s) are stuck past their timeout; no more workers "
                                "are added (jobs: %s)", len(self._retired),
                                ", ".join(sorted(self._current[n][0] for n in self._retired
                                                 if n in self._current)))
                return
            replacement = self._new_loop()
            self._loops.append(replacement)
        self._log.warning("job %r: its trigger is stuck in %s past its timeout; starting "
                          "%s in its place", item[0], stuck, replacement.name)
        replacement.start()

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(_STOP)

    def _loop(self, loop: Loop) -> None:
        name = loop.name
        while True:
            item = self._queue.get()
            if self._queue.empty():
                with self._taken:
                    self._taken.notify_all()
            if item is _STOP:
                self._queue.put(_STOP)
                return
            if not isinstance(item, tuple):  # a task of call()
                try:
                    item()
                except BaseException as exc:  # noqa: BLE001 - the worker goes on
                    self._log.error("etcdcron worker failed running %r", item, exc_info=exc)
                loop.progress()
                continue
            with self._lock:
                self._current[name] = item
            try:
                self._run(*item)
            except BaseException as exc:  # noqa: BLE001 - the worker goes on with the next job
                self._log.error("etcdcron worker failed running job %r", item[0], exc_info=exc)
            with self._lock:
                del self._current[name]
                if name in self._retired:  # a replacement took this worker's place
                    self._retired.discard(name)
                    self._loops.remove(loop)
                    return
            loop.progress()
