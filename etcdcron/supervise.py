"""Supervised background loops, and what :meth:`Cron.health() <etcdcron.Cron.health>` reports.

Every ``etcdcron-*`` thread runs its loop under a :class:`Loop`. The loop body stays a plain
``while not stopping:`` that does its own work; the :class:`Loop` around it

- catches whatever escapes the body (``BaseException`` included: a stray ``SystemExit`` or a
  gevent ``Timeout`` must not end a background thread), logs it with its traceback, records it,
  waits with capped, jittered backoff and runs the body again;
- records when the loop last made progress and the last error, for :class:`LoopHealth`;
- asks the election to resign (``on_stuck``) when the loop keeps failing without progress, so
  that a replica never stays elected while one of its loops cannot work.

A body reports progress with :meth:`Loop.progress` and errors it handled itself (an etcd call
that failed and will be retried) with :meth:`Loop.failed`: both count for the "stuck" rule.

Thread safety: a :class:`Loop` is written by its own thread and read by any thread; each field
is replaced whole, so readers see a consistent value without a lock, except the failure streak,
which one lock guards.
"""

from __future__ import annotations

import logging
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from etcdcron._etcd import Backoff

__all__ = ["Loop", "LoopHealth", "Health", "STUCK_FAILURES"]

log = logging.getLogger(__name__)

#: A loop that failed this many times in a row, for at least its ``stuck_after`` seconds,
#: without making progress in between, is stuck: the replica resigns its partitions.
STUCK_FAILURES = 3


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _wall(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


@dataclass(frozen=True)
class LoopHealth:
    """One background thread, as :meth:`Cron.health` sees it.

    :ivar name: the thread's name (``etcdcron-watch``, ``etcdcron-worker-3``, ...).
    :ivar alive: whether the thread is running.
    :ivar last_progress: when the loop last did its work (an aware UTC datetime), or ``None``.
    :ivar last_error: the last error the loop met (``"Type: message"``), or ``None``.
    :ivar last_error_at: when that happened.
    :ivar failures: errors in a row since the last progress (0: healthy).
    :ivar restarts: how many times the supervisor ran the loop again after it raised.
    """

    name: str
    alive: bool
    last_progress: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    failures: int
    restarts: int

    @property
    def ok(self) -> bool:
        return self.alive and self.failures == 0


@dataclass(frozen=True)
class Health:
    """A snapshot of one :class:`~etcdcron.Cron` (see :meth:`Cron.health`).

    :ivar state: the Cron's :class:`~etcdcron.CronState`.
    :ivar election: the :class:`~etcdcron.ElectionState`, or ``None`` before ``start()``.
    :ivar elected: whether the replica triggers its partitions now.
    :ivar threads: :class:`LoopHealth` by thread name.
    :ivar unrecorded: names of jobs whose trigger results etcd has refused so far; they are
        retried with backoff until written, the job changes, or the session ends.
    :ivar unschedulable: owned jobs that cannot be scheduled (a record out of range, a schedule
        that does not parse), with the reason; they are skipped until changed.
    :ivar stuck: jobs whose synchronous trigger is still running past ``trigger_timeout`` (its
        worker was replaced; the thread is freed once the trigger returns).
    """

    state: object
    election: enum.Enum | None
    elected: bool
    threads: dict[str, LoopHealth] = field(default_factory=dict)
    unrecorded: tuple[str, ...] = ()
    unschedulable: dict[str, str] = field(default_factory=dict)
    stuck: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every thread is alive and without errors, every result was recorded,
        every owned job can be scheduled, and the election is neither blocked nor resigned."""
        return (all(t.ok for t in self.threads.values()) and not self.unrecorded
                and not self.unschedulable and not self.stuck
                and getattr(self.election, "name", None) not in ("BLOCKED", "RESIGNED"))

    @property
    def problems(self) -> list[str]:
        """One line per thing that is wrong, for logs and health endpoints."""
        lines = [f"{t.name}: {'dead' if not t.alive else t.last_error} "
                 f"({t.failures} failure(s) in a row)"
                 for t in self.threads.values() if not t.ok]
        if self.unrecorded:
            lines.append(f"results not recorded yet for job(s): {', '.join(self.unrecorded)}")
        lines += [f"job {name!r} cannot be scheduled: {why}"
                  for name, why in self.unschedulable.items()]
        lines += [f"job {name!r}: its trigger is stuck past its timeout" for name in self.stuck]
        if getattr(self.election, "name", None) in ("BLOCKED", "RESIGNED"):
            lines.append(f"the election is {getattr(self.election, 'name', '').lower()}")
        return lines


class Loop:
    """Runs ``body(loop)`` on a daemon thread named ``name``, again and again until it returns.

    :param body: the loop; it returns when its component stops. It may call
        :meth:`progress` and :meth:`failed`.
    :param stopping: whether the component is stopping (then an exception ends the thread
        instead of restarting the body).
    :param wait: ``wait(seconds)`` sleeps, interruptibly; returns True if stopping.
    :param on_stuck: called (on this thread) with a reason when the loop is stuck (see
        :data:`STUCK_FAILURES`); once per run of failures.
    :param stuck_after: seconds a run of failures must last to count as stuck.
    """

    def __init__(self, name: str, body: Callable[[Loop], None], *,
                 stopping: Callable[[], bool], wait: Callable[[float], bool],
                 on_stuck: Callable[[str], None] | None = None, stuck_after: float = 0.0,
                 backoff_cap: float = 5.0, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.time):
        self.name = name
        self._body = body
        self._stopping = stopping
        self._wait = wait
        self.on_stuck = on_stuck
        self.stuck_after = stuck_after
        self._backoff = Backoff(base=0.05, cap=backoff_cap)
        self._log = logger or log
        self._clock = clock
        # Guards the failure streak: _failures, _failing_since, _reported.
        self._lock = threading.Lock()
        self._failures = 0
        self._failing_since = 0.0  # monotonic time of the streak's first failure
        self._reported = False  # whether on_stuck was called for this streak
        self._restarts = 0
        self._last_progress: float | None = None
        self._last_error: tuple[str, float] | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- the loop's own thread --------------------------------------------------------------------

    def progress(self) -> None:
        """The loop did its work: the failure streak ends."""
        self._last_progress = self._clock()
        if self._failures:
            with self._lock:
                self._failures, self._reported = 0, False
            self._backoff.reset()

    def failed(self, exc: BaseException) -> None:
        """The loop met an error (handled by the body, or escaping it)."""
        self._last_error = (_describe(exc), self._clock())
        with self._lock:
            if self._failures == 0:
                self._failing_since = time.monotonic()
            self._failures += 1
            stuck = (not self._reported and self._failures >= STUCK_FAILURES
                     and time.monotonic() - self._failing_since >= self.stuck_after)
            if stuck:
                self._reported = True
            failures = self._failures
        if stuck and self.on_stuck is not None:
            self.on_stuck(f"{self.name} failed {failures} times in a row "
                           f"(last: {_describe(exc)})")

    def _run(self) -> None:
        while True:
            try:
                self._body(self)
                return
            except BaseException as exc:  # noqa: BLE001 - a background loop must not die
                if self._stopping():
                    return
                self._log.error("etcdcron thread %s failed; restarting it", self.name,
                                exc_info=exc)
                self.failed(exc)
                self._restarts += 1
                if self._wait(self._backoff.next_delay()):
                    return

    # -- any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def health(self) -> LoopHealth:
        error = self._last_error
        return LoopHealth(
            name=self.name,
            alive=self.thread.is_alive(),
            last_progress=_wall(self._last_progress),
            last_error=error[0] if error else None,
            last_error_at=_wall(error[1]) if error else None,
            failures=self._failures,
            restarts=self._restarts,
        )
