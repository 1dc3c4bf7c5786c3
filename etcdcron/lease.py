"""The lease: this replica's etcd lease, granted and kept alive by ``etcdcron-lease``.

:class:`LeaseKeeper` runs on the ``etcdcron-lease`` thread. It grants the lease and keeps it alive
on one ``LeaseKeepAlive`` stream. The lease counts as valid until the last acknowledged
keepalive's send time plus the TTL etcd granted, minus a safety margin, by this process's
monotonic clock; so a process frozen past its lease (SIGSTOP, GC pause, partition) knows on waking
that it lost it, and triggers nothing. :meth:`LeaseKeeper.valid` and :meth:`LeaseKeeper.current`
are read from any thread (the election, the workers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from etcdcron._etcd import Backoff, EtcdClient, Stopped
from etcdcron.errors import EtcdError

__all__ = ["LeaseKeeper", "lease_margin"]

log = logging.getLogger(__name__)


def lease_margin(ttl: float) -> float:
    """Seconds before the lease's end at which this replica stops trusting it."""
    return min(2.0, ttl * 0.2)


class LeaseKeeper:
    """Grants this replica's lease and keeps it alive.

    :param on_change: called (on the lease thread) when a lease is granted or lost.
    """

    def __init__(self, client: EtcdClient, ttl: int, stop: threading.Event,
                 on_change: Callable[[], None], logger: logging.Logger | None = None):
        self._client = client
        self._log = logger or log
        self._ttl = ttl
        self._margin = lease_margin(ttl)
        self._stop = stop
        self._on_change = on_change
        # Guards _lease_id, _validity and _stream. _validity is one tuple
        # (generation, valid until) so that readers without the lock never see half an update.
        self._lock = threading.Lock()
        self._lease_id = 0
        self._validity = (0, 0.0)
        self._stream = None
        self.thread = threading.Thread(target=self._run, name="etcdcron-lease", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def valid(self, generation: int | None = None) -> bool:
        """Whether the lease (of that ``generation``, if given) is valid by this process's clock.

        Each granted lease is a new generation: a session elected under one lease must not
        trigger under the next, even for the moment before the election thread ends it.
        """
        current, valid_until = self._validity
        return time.monotonic() < valid_until and generation in (None, current)

    def current(self) -> tuple[int, int] | None:
        """``(lease id, generation)`` of the valid lease, or ``None``."""
        with self._lock:
            generation, valid_until = self._validity
            if self._lease_id and time.monotonic() < valid_until:
                return self._lease_id, generation
            return None

    def valid_for(self) -> float:
        return self._validity[1] - time.monotonic()

    def stop(self) -> None:
        """Cancel the keepalive stream and revoke the lease, which deletes the key at once."""
        with self._lock:
            stream, lease_id = self._stream, self._lease_id
            self._lease_id, self._validity = 0, (self._validity[0], 0.0)
        if stream is not None:
            stream.cancel()
        if lease_id:
            self._revoke(lease_id)

    def _revoke(self, lease_id: int) -> None:
        try:
            self._client.lease_revoke(lease_id, deadline=time.monotonic() + 2.0)
        except EtcdError as exc:
            self._log.info("could not revoke lease %x (%s); it expires by itself", lease_id, exc)

    def _run(self) -> None:
        backoff = Backoff(cap=2.0)
        while not self._stop.is_set():
            try:
                sent_at = time.monotonic()
                lease_id, ttl = self._client.lease_grant(self._ttl, stop=self._stop, forever=True)
                with self._lock:
                    if self._stop.is_set():
                        self._lease_id = lease_id
                        return
                    self._lease_id = lease_id
                    self._validity = (self._validity[0] + 1, sent_at + ttl - self._margin)
                self._log.debug("granted lease %x (ttl %ds)", lease_id, ttl)
                self._on_change()
                backoff.reset()
                self._keep(lease_id)
            except Stopped:
                return
            except EtcdError as exc:
                self._log.warning("could not grant a lease: %s", exc)
                self._stop.wait(backoff.next_delay())

    def _keep(self, lease_id: int) -> None:
        """Keep ``lease_id`` alive until it is lost or the keeper stops."""
        interval = self._ttl / 3
        backoff = Backoff(cap=1.0)
        while not self._stop.is_set():
            stream = None
            try:
                stream = self._client.keepalive(lease_id)
                with self._lock:
                    self._stream = stream
                stream.send()
                for sent_at, ttl in stream:
                    if ttl <= 0:
                        self._lose(lease_id, "etcd says it expired")
                        return
                    if not self._extend(lease_id, sent_at + ttl - self._margin):
                        self._lose(lease_id, "a keepalive was answered too late to renew it")
                        return
                    backoff.reset()
                    # Renew again before half the time left is gone (after a late answer, that
                    # is well before the usual interval).
                    if self._stop.wait(min(interval, self.valid_for() / 2)):
                        return
                    if not self.valid():
                        self._lose(lease_id, "this process did not run for longer than its TTL")
                        return
                    stream.send()
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self._log.info("lease keepalive stream broke (%s)", exc.code())
            except EtcdError as exc:
                self._log.warning("lease keepalive could not start: %s", exc)
            finally:
                if stream is not None:
                    stream.cancel()
            if not self.valid():
                self._lose(lease_id, "no keepalive was acknowledged within its TTL")
                return
            self._stop.wait(backoff.next_delay())

    def _extend(self, lease_id: int, valid_until: float) -> bool:
        """Move the lease's end out to ``valid_until``; ``False`` if that has passed too.

        A validity that has already run out is not extended, even though etcd still renews
        the lease (it was frozen, say, and answers late): the lease goes on under a new
        generation, so the session that trusted the old one ends, and the next session takes
        up the same leadership key. The other replicas see no change.
        """
        with self._lock:
            generation, current = self._validity
            if self._lease_id != lease_id:
                return True  # stop() has released it
            now = time.monotonic()
            if now < current:
                self._validity = (generation, max(current, valid_until))
                return True
            if now >= valid_until:
                return False
            self._validity = (generation + 1, valid_until)
        self._log.info("lease %x was renewed after its validity ran out; starting a new session "
                       "under it", lease_id)
        self._on_change()
        return True

    def _lose(self, lease_id: int, why: str) -> None:
        with self._lock:
            self._lease_id, self._validity = 0, (self._validity[0], 0.0)
        self._log.warning("lost lease %x: %s", lease_id, why)
        self._on_change()
        self._revoke(lease_id)
