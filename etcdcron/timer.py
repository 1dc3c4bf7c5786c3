"""The timer thread (``etcdcron-timer``): hands jobs to the workers when they fall due.

:class:`TimerHeap` is the pure part (heap ordering, tested with plain numbers); :class:`Timer`
runs it on a thread that waits on a :class:`threading.Condition` with a timeout, never
``time.sleep``, so arming an earlier job wakes it at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from etcdcron.supervise import Loop

__all__ = ["TimerHeap", "Timer"]

log = logging.getLogger(__name__)

#: The longest the timer sleeps, so that a wall-clock jump is noticed within this many seconds.
MAX_WAIT = 1.0
#: The shortest: ticks spread over a second are handed out a millisecond's worth at a time,
#: not one wake-up each (never early; at most this much later).
MIN_WAIT = 0.001
#: Entries handed out per wake-up at most, so that the workers start on the first ones while
#: the timer goes on with the rest (10,000 jobs due at once).
CHUNK = 256
#: How long before the next entry falls due the timer tells ``on_soon`` (so that what every
#: trigger must wait for, a read barrier, can be done before its time instead of after it).
LEAD = 0.02


class TimerHeap:
    """Entries ``(due, seq, name, token)`` ordered by due time, then by arming order.

    A name has at most one live entry: arming a name again, or :meth:`discard`, makes its
    earlier entry stale. Stale entries are skipped when popped, and dropped all at once when
    they outnumber the live ones, so the heap stays in proportion to the jobs it holds however
    often they are replaced or deleted.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any, Any]] = []
        self._seq = itertools.count()
        self._live: dict[Any, int] = {}  # name (or key) -> seq of its live entry

    def push(self, due: float, name: Any, token: Any) -> bool:
        """Add an entry (replacing any other of ``name``); returns whether it is now the
        earliest."""
        entry = (due, next(self._seq), name, token)
        self._live[name] = entry[1]
        heapq.heappush(self._heap, entry)
        self._compact()
        return self._heap[0] is entry

    def discard(self, name: str) -> None:
        """Forget the entry of ``name``, if any."""
        if self._live.pop(name, None) is not None:
            self._compact()

    def _stale(self, entry: tuple[float, int, Any, Any]) -> bool:
        return self._live.get(entry[2]) != entry[1]

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [entry for entry in self._heap if not self._stale(entry)]
            heapq.heapify(self._heap)

    def next_due(self) -> float | None:
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float, most: int | None = None) -> list[tuple[str, int]]:
        """Remove and return ``(name, token)`` of the entries due at or before ``now``, in
        order: every one, or the first ``most``."""
        due: list[tuple[Any, Any]] = []
        while self._heap and self._heap[0][0] <= now and (most is None or len(due) < most):
            entry = heapq.heappop(self._heap)
            if not self._stale(entry):
                del self._live[entry[2]]
                due.append((entry[2], entry[3]))
        return due

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()

    def __len__(self) -> int:
        """The live entries."""
        return len(self._live)

    @property
    def size(self) -> int:
        """The entries held, stale ones included."""
        return len(self._heap)


class Timer:
    """Calls ``on_due(entries)`` on its own thread with the entries that fell due, and
    ``on_expired(entries)`` with the trigger deadlines that passed (a second heap, so that a
    running job's deadline and its next tick never replace each other).

    If ``on_due`` or ``on_expired`` raises, the entries it was given are armed again (due at
    once) and the supervisor runs the loop again after a backoff.

    :param clock: wall-clock seconds since the epoch (injected in tests).
    :param on_soon: called (on the timer thread, without the timer's lock) with the due time of
        the next entry once it is at most :data:`LEAD` seconds away, once per due time; it must
        return at once.
    """

    def __init__(self, on_due: Callable[[list[tuple[str, int]]], None],
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None,
                 on_expired: Callable[[list[tuple[Any, Any]]], None] | None = None,
                 on_soon: Callable[[float], None] | None = None):
        self._on_due = on_due
        self._on_expired = on_expired
        self._on_soon = on_soon
        self._told = -1.0  # the last due time on_soon was told of (timer thread only)
        self._log = logger or log
        self._clock = clock
        # Guards _heap, _deadlines and _stopping; notified when an earlier entry is armed or on
        # stop.
        self._cond = threading.Condition(threading.Lock())
        self._heap = TimerHeap()
        self._deadlines = TimerHeap()
        self._stopping = False
        self.loop = Loop("etcdcron-timer", self._run, stopping=lambda: self._stopping,
                         wait=self._wait_stopping, logger=self._log)
        self.thread = self.loop.thread

    def start(self) -> None:
        self.loop.start()

    def arm_many(self, entries: list[tuple[float, str, int]]) -> None:
        if not entries:
            return
        with self._cond:
            for due, name, token in entries:
                self._heap.push(due, name, token)
            self._cond.notify()

    def discard(self, name: str) -> None:
        """Forget the armed entry of ``name`` (its job was removed or replaced)."""
        with self._cond:
            self._heap.discard(name)

    def arm_deadlines(self, entries: list[tuple[float, object, object]]) -> None:
        """Arm ``(when, key, token)`` deadlines; one per key, as for :meth:`arm_many`."""
        if not entries:
            return
        with self._cond:
            for when, key, token in entries:
                self._deadlines.push(when, key, token)
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()
            self._deadlines.clear()

    @property
    def size(self) -> int:
        """Entries in the heap, stale ones included (for tests and health)."""
        with self._cond:
            return self._heap.size

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _wait_stopping(self, seconds: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stopping, seconds)

    def _run(self, loop: Loop) -> None:
        while True:
            soon = None
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    due = self._heap.pop_due(now, CHUNK)
                    expired = self._deadlines.pop_due(now, CHUNK)
                    if due or expired:
                        break
                    wait = MAX_WAIT
                    next_due = self._heap.next_due()
                    if (self._on_soon is not None and next_due is not None
                            and next_due != self._told):
                        if next_due - now <= LEAD:
                            soon = self._told = next_due
                            break
                        wait = min(wait, next_due - LEAD - now)  # wake to tell on_soon
                    for next_due in (next_due, self._deadlines.next_due()):
                        if next_due is not None:
                            wait = min(wait, next_due - now)
                    self._cond.wait(max(wait, MIN_WAIT))
                if self._stopping:
                    return
            if soon is not None and self._on_soon is not None:
                self._on_soon(soon)
                continue
            try:
                if expired:
                    self._on_expired(expired)  # type: ignore[misc]  # set with deadlines
            except BaseException:
                self.arm_deadlines([(now, key, token) for key, token in expired])
                self.arm_many([(now, name, token) for name, token in due])
                raise
            try:
                if due:
                    self._on_due(due)
            except BaseException:
                self.arm_many([(now, name, token) for name, token in due])
                raise
            loop.progress()
