"""The lease: this replica's etcd lease, granted and kept alive by ``etcdcron-lease``.

:class:`LeaseKeeper` runs its loop on the ``etcdcron-lease`` thread, under a supervising
:class:`~etcdcron.supervise.Loop`: it grants the lease and keeps it alive on one
``LeaseKeepAlive`` stream. :meth:`LeaseKeeper.valid` and :meth:`LeaseKeeper.current` are read
from any thread (the election, the workers); :meth:`LeaseKeeper.end_generation` and
:meth:`LeaseKeeper.release` are called by the election.

The lease counts as valid until the last acknowledged keepalive's send time plus the TTL etcd
granted, minus a safety margin. A process frozen past its lease (SIGSTOP, a GC pause, a
partition) knows on waking that it lost it, and triggers nothing. That time is measured on two
clocks (:class:`LeaseClock`), and the lease is valid only while both say so:

- ``CLOCK_BOOTTIME`` where the platform has it (Linux), else ``time.monotonic()``: unlike
  ``CLOCK_MONOTONIC``, which stops while the machine is suspended, it counts a suspend;
- the wall clock (``time.time()``): a container checkpointed and restored later (CRIU, with
  time namespaces) or a VM restored from a snapshot sees neither of the other two clocks move
  across the gap, but its wall clock does. A wall clock stepped forward ends the lease early
  (one needless rebalance); one stepped back changes nothing, the first clock still rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from etcdcron._etcd import Backoff, EtcdClient, KeepAliveStream, Stopped
from etcdcron.errors import EtcdError
from etcdcron.supervise import Loop

__all__ = ["LeaseKeeper", "LeaseClock", "boottime", "lease_margin"]

log = logging.getLogger(__name__)


def lease_margin(ttl: float) -> float:
    """Seconds before the lease's end at which this replica stops trusting it."""
    return min(2.0, ttl * 0.2)


if hasattr(time, "CLOCK_BOOTTIME"):
    def boottime() -> float:
        """Seconds since boot, suspends included (Linux ``CLOCK_BOOTTIME``)."""
        return time.clock_gettime(time.CLOCK_BOOTTIME)
else:  # pragma: no cover - not Linux
    boottime = time.monotonic


class LeaseClock:
    """The two clocks a lease's validity is measured on: ``(elapsed, wall)`` seconds.

    :param elapsed: seconds that count a suspend (default ``CLOCK_BOOTTIME`` if available).
    :param wall: seconds since the epoch (default ``time.time``).
    """

    def __init__(self, elapsed: Callable[[], float] | None = None,
                 wall: Callable[[], float] = time.time):
        self.elapsed = elapsed or boottime
        self.wall = wall

    def now(self) -> tuple[float, float]:
        return self.elapsed(), self.wall()


class LeaseKeeper:
    """Grants this replica's lease and keeps it alive.

    Each lease granted, and each renewal after its validity had run out, is a new
    *generation*: a session elected under one generation must not trigger under the next.

    :param on_change: called (on the lease thread) when a lease is granted or lost.
    :param clock: the clocks validity is measured on (for tests).
    :ivar on_stuck: called with a reason when the lease loop keeps failing without an
        acknowledged keepalive (see :class:`~etcdcron.supervise.Loop`); the
        :class:`~etcdcron.election.Elector` sets it to its ``resign``. Such a lease also runs
        out by itself, so the replica stops triggering either way.
    """

    def __init__(self, client: EtcdClient, ttl: int, stop: threading.Event,
                 on_change: Callable[[], None], logger: logging.Logger | None = None, *,
                 clock: LeaseClock | None = None):
        self._client = client
        self._log = logger or log
        self.ttl = ttl
        self._margin = lease_margin(ttl)
        self._stop = stop
        self._on_change = on_change
        self._clock = clock or LeaseClock()
        # Guards _lease_id, _validity and _stream. _validity is one tuple
        # (generation, valid until by the elapsed clock, valid until by the wall clock) so that
        # readers without the lock never see half an update.
        self._lock = threading.Lock()
        self._lease_id = 0
        self._validity = (0, 0.0, 0.0)
        self._stream: KeepAliveStream | None = None
        self.on_stuck: Callable[[str], None] | None = None
        self.loop = Loop("etcdcron-lease", self._run, stopping=stop.is_set, wait=stop.wait,
                         on_stuck=self._stuck, stuck_after=ttl, logger=self._log)
        self.thread = self.loop.thread

    @property
    def loops(self) -> tuple[Loop, ...]:
        """The supervised loops of this component, for :meth:`Cron.health`."""
        return (self.loop,)

    def start(self) -> None:
        self.loop.start()

    # -- any thread ------------------------------------------------------------------------------

    def _left(self, validity: tuple[int, float, float]) -> float:
        elapsed, wall = self._clock.now()
        return min(validity[1] - elapsed, validity[2] - wall)

    def valid(self, generation: int | None = None) -> bool:
        """Whether the lease (of that ``generation``, if given) is valid by this process's clocks.

        Each granted lease is a new generation: a session elected under one lease must not
        trigger under the next, even for the moment before the election thread ends it.
        """
        validity = self._validity
        return self._left(validity) > 0 and generation in (None, validity[0])

    def current(self) -> tuple[int, int] | None:
        """``(lease id, generation)`` of the valid lease, or ``None``."""
        with self._lock:
            if self._lease_id and self._left(self._validity) > 0:
                return self._lease_id, self._validity[0]
            return None

    def valid_for(self) -> float:
        return self._left(self._validity)

    def end_generation(self) -> None:
        """End the current generation now, keeping the lease itself alive: nothing triggers
        under the sessions elected so far, while their results can still be recorded."""
        with self._lock:
            generation, elapsed, wall = self._validity
            self._validity = (generation + 1, elapsed, wall)

    def release(self) -> None:
        """Revoke the lease, which deletes the key bound to it, and grant a new one.

        If etcd cannot be reached, the old lease is no longer kept alive and expires by itself.
        """
        lease_id = self._drop()
        if lease_id:
            self._log.info("released lease %x", lease_id)
            self._revoke(lease_id)

    def stop(self) -> None:
        """Cancel the keepalive stream and revoke the lease, which deletes the key at once."""
        lease_id = self._drop()
        if lease_id:
            self._revoke(lease_id)

    def _drop(self) -> int:
        """Forget the lease (the lease thread stops keeping it alive); returns its id."""
        with self._lock:
            stream, lease_id = self._stream, self._lease_id
            self._lease_id, self._validity = 0, (self._validity[0], 0.0, 0.0)
        if stream is not None:
            stream.cancel()
        return lease_id

    def _revoke(self, lease_id: int) -> None:
        try:
            self._client.lease_revoke(lease_id, deadline=time.monotonic() + 2.0)
        except EtcdError as exc:
            self._log.info("could not revoke lease %x (%s); it expires by itself", lease_id, exc)

    # -- lease thread ----------------------------------------------------------------------------

    def _stuck(self, why: str) -> None:
        if self.on_stuck is not None:
            self.on_stuck(why)

    def _held(self, lease_id: int) -> bool:
        return self._lease_id == lease_id and not self._stop.is_set()

    def _run(self, loop: Loop) -> None:
        backoff = Backoff(cap=2.0)
        while not self._stop.is_set():
            with self._lock:
                lease_id = self._lease_id
            if lease_id:
                # Kept by an earlier run of this loop that raised: go on with it if it is valid.
                if self.valid():
                    self._keep(lease_id, loop)
                else:
                    self._lose(lease_id, "no keepalive was acknowledged within its TTL")
                continue
            try:
                sent_at = self._clock.now()
                lease_id, ttl = self._client.lease_grant(self.ttl, stop=self._stop, forever=True)
            except Stopped:
                return
            except EtcdError as exc:
                self._log.warning("could not grant a lease: %s", exc)
                loop.failed(exc)
                self._stop.wait(backoff.next_delay())
                continue
            with self._lock:
                if not self._stop.is_set():
                    self._lease_id = lease_id
                    self._validity = (self._validity[0] + 1, *self._until(sent_at, ttl))
            if self._stop.is_set():
                self._revoke(lease_id)  # stop() came while it was being granted
                return
            self._log.debug("granted lease %x (ttl %ds)", lease_id, ttl)
            backoff.reset()  # progress is an acknowledged keepalive, in _keep
            self._on_change()

    def _until(self, sent_at: tuple[float, float], ttl: int) -> tuple[float, float]:
        return sent_at[0] + ttl - self._margin, sent_at[1] + ttl - self._margin

    def _keep(self, lease_id: int, loop: Loop) -> None:
        """Keep ``lease_id`` alive until it is lost, released, or the keeper stops."""
        interval = self.ttl / 3
        backoff = Backoff(cap=1.0)
        while self._held(lease_id):
            stream = None
            try:
                stream = self._client.keepalive(lease_id)
                with self._lock:
                    if self._lease_id != lease_id:
                        return  # released meanwhile; finally cancels the stream
                    self._stream = stream
                # One request in flight at a time, so its answer is this send's.
                sent_at = self._clock.now()
                stream.send()
                for _, ttl in stream:
                    if ttl <= 0:
                        self._lose(lease_id, "etcd says it expired")
                        return
                    if not self._extend(lease_id, self._until(sent_at, ttl)):
                        self._lose(lease_id, "a keepalive was answered too late to renew it")
                        return
                    loop.progress()
                    backoff.reset()
                    # Renew again before half the time left is gone (after a late answer, that
                    # is well before the usual interval).
                    if self._stop.wait(min(interval, self.valid_for() / 2)):
                        return
                    if not self._held(lease_id):
                        return
                    if not self.valid():
                        self._lose(lease_id, "this process did not run for longer than its TTL")
                        return
                    sent_at = self._clock.now()
                    stream.send()
            except grpc.RpcError as exc:
                if not self._held(lease_id):
                    return
                self._log.info("lease keepalive stream broke (%s)", exc.code())
                loop.failed(exc)
            except EtcdError as exc:
                self._log.warning("lease keepalive could not start: %s", exc)
                loop.failed(exc)
            finally:
                if stream is not None:
                    stream.cancel()
                    with self._lock:
                        if self._stream is stream:
                            self._stream = None
            if not self._held(lease_id):
                return
            if not self.valid():
                self._lose(lease_id, "no keepalive was acknowledged within its TTL")
                return
            self._stop.wait(backoff.next_delay())

    def _extend(self, lease_id: int, valid_until: tuple[float, float]) -> bool:
        """Move the lease's end out to ``valid_until``; ``False`` if that has passed too.

        A validity that has already run out is not extended, even though etcd still renews
        the lease (it was frozen, say, and answers late): the lease goes on under a new
        generation, so the session that trusted the old one ends, and the next session takes
        up the same leadership key. The other replicas see no change.
        """
        with self._lock:
            generation, elapsed, wall = self._validity
            if self._lease_id != lease_id:
                return True  # released; the loop leaves it
            if self._left(self._validity) > 0:
                self._validity = (generation, max(elapsed, valid_until[0]),
                                  max(wall, valid_until[1]))
                return True
            if self._left((generation, *valid_until)) <= 0:
                return False
            self._validity = (generation + 1, *valid_until)
        self._log.info("lease %x was renewed after its validity ran out; starting a new session "
                       "under it", lease_id)
        self._on_change()
        return True

    def _lose(self, lease_id: int, why: str) -> None:
        with self._lock:
            if self._lease_id != lease_id:
                return  # released or stopped meanwhile
            self._lease_id, self._validity = 0, (self._validity[0], 0.0, 0.0)
        self._log.warning("lost lease %x: %s", lease_id, why)
        self._on_change()
        self._revoke(lease_id)
