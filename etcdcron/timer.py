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

__all__ = ["TimerHeap", "Timer"]

log = logging.getLogger(__name__)

#: The longest the timer sleeps, so that a wall-clock jump is noticed within this many seconds.
MAX_WAIT = 1.0


class TimerHeap:
    """Entries ``(due, seq, name, token)`` ordered by due time, then by arming order."""

    def __init__(self):
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()

    def push(self, due: float, name: str, token: int) -> bool:
        """Add an entry; returns whether it is now the earliest."""
        entry = (due, next(self._seq), name, token)
        heapq.heappush(self._heap, entry)
        return self._heap[0] is entry

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[str, int]]:
        """Remove and return ``(name, token)`` of every entry due at or before ``now``, in order."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, _, name, token = heapq.heappop(self._heap)
            due.append((name, token))
        return due

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)


class Timer:
    """Calls ``on_due(entries)`` on its own thread with the entries that fell due.

    :param clock: wall-clock seconds since the epoch (injected in tests).
    """

    def __init__(self, on_due: Callable[[list[tuple[str, int]]], None],
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None):
        self._on_due = on_due
        self._log = logger or log
        self._clock = clock
        # Guards _heap and _stopping; notified when an earlier entry is armed or on stop.
        self._cond = threading.Condition(threading.Lock())
        self._heap = TimerHeap()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="etcdcron-timer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def arm_many(self, entries: list[tuple[float, str, int]]) -> None:
        if not entries:
            return
        with self._cond:
            for due, name, token in entries:
                self._heap.push(due, name, token)
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    due = self._heap.pop_due(now)
                    if due:
                        break
                    next_due = self._heap.next_due()
                    wait = MAX_WAIT if next_due is None else min(MAX_WAIT, next_due - now)
                    self._cond.wait(wait)
                if self._stopping:
                    return
            try:
                self._on_due(due)
            except Exception:
                self._log.exception("etcdcron timer: handing due jobs to the workers failed")
