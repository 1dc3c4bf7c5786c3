"""The informer thread (``etcdcron-watch``): keeps the job index in step with etcd.

While this replica holds an ownership (a session), it lists ``NS/jobs/``, ``NS/counters/`` and
``NS/inflight/`` page by page at one revision R, hands the owned jobs to the engine, then watches
``NS/inflight/`` and ``NS/jobs/`` (one range: the first sorts just before the second, and the
replicas' read-barrier keys between them) from R + 1. A broken stream resumes from the last
revision seen; a compacted one re-lists (the engine reconciles). It never calls user code and
never blocks on anything but etcd.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from etcdcron._etcd import (
    Backoff, Compacted, EtcdClient, Stopped, WatchStream, cmp_mod, op_put,
)
from etcdcron.errors import EtcdError
from etcdcron.index import Ownership
from etcdcron.keys import Keys, prefix_end
from etcdcron.store import stream_jobs_and_counters
from etcdcron.supervise import Loop

if TYPE_CHECKING:
    from etcdcron.engine import Engine

__all__ = ["Informer", "ReadBarrier"]

log = logging.getLogger(__name__)

#: How often the fallback read barrier asks the watch again for a progress notification.
PROGRESS_EVERY = 0.2
#: Seconds barriers may wait in vain for the job watch before it starts over.
WATCH_STALL = 5.0
#: Codes of a barrier write etcd refuses while it could still be read (see Informer._fresh).
_REFUSED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED})

class ReadBarrier:
    """Proves, before a trigger, that the engine has seen every job change etcd had committed
    when the barrier began: so a job deleted or replaced, once ``delete()`` or ``add()``
    returned, never fires again, however far behind the watch is (a slow link, a frozen
    member); a replica that cannot prove it fires nothing until it can, or loses its lease.

    Shared by the workers: one barrier runs at a time, run by the worker that needs it, and
    answers every worker that began waiting before it started; so a burst of triggers costs
    a few barriers, not one each.

    :param check: ``check(ownership, timeout)`` runs one barrier.
    """

    def __init__(self, check: Callable[[Ownership, float], bool]):
        self._check = check
        # Guards _running and _passed: whether a barrier runs, and (ownership, monotonic start
        # time) of the latest that passed; notified when one ends.
        self._cond = threading.Condition(threading.Lock())
        self._running = False
        self._passed: tuple[Ownership | None, float] = (None, -math.inf)

    def covers(self, ownership: Ownership, since: float) -> bool:
        """Whether a barrier runs now, or one that began at or after ``since`` passed for
        ``ownership`` (so that running another ahead of time would add nothing)."""
        with self._cond:
            return self._running or (self._passed[0] is ownership and self._passed[1] >= since)

    def wait(self, ownership: Ownership, since: float, timeout: float) -> float | None:
        """Wait until a barrier that began at or after ``since`` passed for ``ownership``.

        :returns: the monotonic time that barrier began (its proof covers every change
            acknowledged before it); ``None`` if ``timeout`` seconds passed first, or the
            barrier this call ran failed (etcd could not be read, or the session ended).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._passed[0] is ownership and self._passed[1] >= since):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if self._running:
                    self._cond.wait(left)
                    continue
                self._running, started = True, time.monotonic()
                self._cond.release()
                try:
                    passed = self._check(ownership, left)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                if not passed:
                    return None
                if self._passed[0] is not ownership or started > self._passed[1]:
                    self._passed = (ownership, started)
            return self._passed[1]


class Informer:
    """Feeds ``engine.load`` and ``engine.apply_events`` for the current ownership.

    :param engine: has ``load(ownership, jobs, counters, claims, revision)`` and
        ``apply_events(ownership, events)``.
    """

    def __init__(self, client: EtcdClient, keys: Keys, engine: Engine, stop: threading.Event,
                 logger: logging.Logger | None = None,
                 on_fence_failed: Callable[[Ownership], None] | None = None):
        self._client = client
        self._on_fence_failed = on_fence_failed
        self._log = logger or log
        self._keys = keys
        self._engine = engine
        self._stop = stop
        # Guards _ownership and _stream; notified when the ownership changes or on stop.
        self._cond = threading.Condition(threading.Lock())
        self._ownership: Ownership | None = None
        self._stream: WatchStream | None = None
        # Every job change up to this revision is applied to the engine, for _ownership: as
        # the watch delivered its events (_applied), or as a progress notification says
        # (_progressed, at least _applied; see _fresh).
        self._applied = self._progressed = 0
        self._refused = False  # whether etcd refused the last barrier write (see _fresh)
        # Monotonic times barriers began to wait in vain for the watch, and _applied last
        # moved (see _stalled_locked).
        self._waiting_since: float | None = None
        self._applied_at = 0.0
        self.barrier = ReadBarrier(self._fresh)
        self.loop = Loop("etcdcron-watch", self._run, stopping=stop.is_set, wait=stop.wait,
                         logger=self._log)
        self.thread = self.loop.thread

    def start(self) -> None:
        self.loop.start()

    def activate(self, ownership: Ownership) -> None:
        with self._cond:
            self._ownership, self._applied = ownership, 0
            self._progressed = 0
            self._cond.notify_all()

    def deactivate(self) -> None:
        with self._cond:
            self._ownership, self._applied = None, 0
            self._progressed = 0
            stream, self._stream = self._stream, None
            self._cond.notify_all()
        if stream is not None:
            stream.cancel()

    def stop(self) -> None:
        self.deactivate()
        with self._cond:
            self._cond.notify_all()

    def _wait_ownership(self) -> Ownership | None:
        with self._cond:
            while self._ownership is None and not self._stop.is_set():
                self._cond.wait()
            return self._ownership

    def _run(self, loop: Loop) -> None:
        backoff = Backoff(cap=5.0)
        while not self._stop.is_set():
            ownership = self._wait_ownership()
            if ownership is None:
                return
            try:
                self._follow(ownership, loop)
                backoff.reset()
            except Stopped:
                return
            except Compacted as exc:
                self._log.info("job watch fell behind compaction (%s); listing again", exc)
            except EtcdError as exc:
                if exc.code != grpc.StatusCode.OUT_OF_RANGE:  # a page read at a compacted revision
                    self._log.warning("job watch failed: %s; listing again", exc)
                    loop.failed(exc)
                    self._stop.wait(backoff.next_delay())

    def _follow(self, ownership: Ownership, loop: Loop) -> None:
        revision = self._load(ownership)
        self._applied_to(ownership, revision)
        loop.progress()
        stream = self._client.watch(
            self._keys.inflight, prefix_end(self._keys.jobs), revision + 1,
            on_progress=lambda rev: self._applied_to(ownership, rev, progress=True))
        with self._cond:
            if self._ownership is not ownership:
                stream.cancel()
                return
            self._stream = stream
        for events in stream:
            self._engine.apply_events(ownership, events)
            self._applied_to(ownership, events[-1].kv.mod_revision)
            loop.progress()

    def _applied_to(self, ownership: Ownership, revision: int, progress: bool = False) -> None:
        with self._cond:
            if self._ownership is not ownership:
                return
            if not progress and revision > self._applied:
                self._applied, self._applied_at = revision, time.monotonic()
            self._progressed = max(self._progressed, self._applied, revision)
            self._cond.notify_all()

    def _fresh(self, ownership: Ownership, timeout: float) -> bool:
        """One read barrier (a worker's thread): write this replica's barrier key (bound to the
        session's lease) at revision W, then wait until the watch has delivered that write, and
        so, in order, every job change up to W.

        A write, not a linearizable read plus a progress notification: before etcd 3.4.25 and
        3.5.8 a requested progress notification can overtake events still queued for a watch
        that fell behind (etcd-io/etcd#15220), and a change acknowledged before the barrier
        would be missed. Only while etcd refuses the write (its space quota is exhausted, or
        the role does not cover the key) does the barrier fall back to that read.

        Both are fenced by the session: a barrier also proves that this replica's leadership
        key is still what the session was granted on. One that finds it changed (the election's
        view of the keys fell behind) passes nothing and tells ``on_fence_failed``.

        :returns: False if ``timeout`` passes first, the lease is gone, the fence failed, or
            the session ends.
        """
        if not ownership.lease_id:
            return False
        deadline = time.monotonic() + timeout
        fence = [cmp_mod(ownership.fence_key, ownership.fence_revision)]
        try:
            response = self._client.txn(
                fence, [op_put(self._keys.barrier(ownership.fence_key), b"",
                               lease=ownership.lease_id)],
                deadline=deadline, stop=self._stop)
        except Stopped:
            return False
        except EtcdError as exc:
            if exc.code not in _REFUSED:
                return False
            return self._fresh_by_progress(ownership, deadline, exc)
        if not response.succeeded:
            return self._fenced(ownership)
        revision = response.header.revision
        if self._refused:
            self._refused = False
            self._log.info("read barrier: etcd accepts its writes again")
        return self._wait_applied(ownership, deadline, revision, progress=False)

    def _fenced(self, ownership: Ownership) -> bool:
        self._log.warning("read barrier: this replica's leadership key is not as its session "
                          "knows it (fence failed); nothing fires until the election has "
                          "read the keys again")
        if self._on_fence_failed is not None:
            self._on_fence_failed(ownership)
        return False

    def _fresh_by_progress(self, ownership: Ownership, deadline: float,
                           refused: EtcdError) -> bool:
        """The fallback barrier: read etcd's revision R linearizably, then wait until the
        watch's events or a progress notification (asked for every :data:`PROGRESS_EVERY`
        seconds) reach R."""
        if not self._refused:
            self._refused = True
            self._log.warning("read barrier: etcd refuses its write (%s); proving the view "
                              "current by a read and a watch progress notification instead",
                              refused)
        try:  # a range, fenced by hand: etcd refuses even read-only transactions when full
            response = self._client.range(ownership.fence_key, deadline=deadline,
                                          stop=self._stop)
        except (EtcdError, Stopped):
            return False
        if not response.kvs or response.kvs[0].mod_revision != ownership.fence_revision:
            return self._fenced(ownership)
        return self._wait_applied(ownership, deadline, response.header.revision, progress=True)

    def _wait_applied(self, ownership: Ownership, deadline: float, revision: int,
                      progress: bool) -> bool:
        with self._cond:
            while self._ownership is ownership and (
                    self._progressed if progress else self._applied) < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stalled_locked(revision)
                    return False
                if progress and self._stream is not None:
                    self._stream.request_progress()
                self._cond.wait(min(PROGRESS_EVERY, left) if progress else left)
            self._waiting_since = None
            return self._ownership is ownership

    def _stalled_locked(self, revision: int) -> None:
        """A barrier timed out waiting for the watch: once barriers have waited in vain, and the
        watch delivered nothing, for :data:`WATCH_STALL` seconds, the stream is taken to be
        stalled (seen in the chaos runs after overlapping faults) and the job watch starts
        over with a fresh listing."""
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
            return
        if (now - self._waiting_since < WATCH_STALL or now - self._applied_at < WATCH_STALL
                or self._stream is None):
            return  # not long enough, or the watch delivers (only slower), or it is listing
        self._waiting_since = None
        self._log.warning("job watch delivered nothing up to revision %d for %gs; listing "
                          "and watching again", revision, WATCH_STALL)
        self._stream.cancel()

    def _load(self, ownership: Ownership) -> int:
        """List jobs, counters and in-flight keys at one revision and hand them to the engine;
        return the revision."""
        kw = {"stop": self._stop, "forever": True}
        revision, jobs = stream_jobs_and_counters(self._client, self._keys, **kw)
        _, claims = self._client.list_prefix(self._keys.inflight, revision=revision, **kw)
        self._engine.load(ownership, jobs, claims, revision)
        return revision
