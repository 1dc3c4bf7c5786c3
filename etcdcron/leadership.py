"""Leadership: this replica's lease, its key under ``NS/leadership/``, and the partitions it owns.

Three threads:

- ``etcdcron-lease`` (:class:`LeaseKeeper`) grants the lease and keeps it alive on one
  ``LeaseKeepAlive`` stream. The lease counts as valid until the last acknowledged keepalive's
  send time plus the TTL etcd granted, minus a safety margin, by this process's monotonic clock;
  so a process frozen past its lease (SIGSTOP, GC pause, partition) knows on waking that it lost
  it, and triggers nothing.
- ``etcdcron-leader-watch`` (:class:`LeaderWatch`) lists the leadership keys, then watches them,
  and queues what it sees for the election thread.
- ``etcdcron-election`` (:class:`Elector`) claims the key, reaches quorum and tells the engine
  which partitions it owns (DESIGN.md section 5).

Election states (State Transitions)::

    CLAIMING -> PASSIVE      the key is held by another process with the same replica id
    CLAIMING -> WAITING      key claimed; waiting for every replica to agree
    WAITING  -> ELECTED      quorum: the engine triggers the owned partitions
    ELECTED  -> WAITING      membership changed: stop, drain, acknowledge, wait for quorum again
    any      -> BLOCKED      a leadership key cannot be decoded, or static totals disagree
    any      -> CLAIMING     the lease or the key was lost
    any      -> STOPPED

Dynamic membership: every replica writes ``total`` = the number of leadership keys; a change of
the key set (a key created or deleted, at revision C) makes every elected replica stop, wait for
its triggers in flight, and write its key again. Quorum needs every key to show the same total
N == the number of keys and a mod revision >= C, i.e. every replica has acknowledged the change
after draining; only then does anyone trigger. Its index is its key's position among the sorted
keys, and it owns the jobs with ``partition_id % N == index``.

Static mode (``partition_id`` / ``partition_total``): the key is ``NS/leadership/<partition_id>``
and the replica starts once every leadership key shows its total.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from etcdcron._etcd import (
    Backoff,
    Compacted,
    EtcdClient,
    Stopped,
    WatchStream,
    cmp_create,
    op_put,
)
from etcdcron._pb import stored_pb2
from etcdcron.errors import EtcdError, LifecycleError
from etcdcron.index import Ownership
from etcdcron.keys import Keys, prefix_end

__all__ = ["LeaseKeeper", "LeaderWatch", "Elector", "ElectionState", "lease_margin"]

log = logging.getLogger(__name__)


#: Seconds a replica waits after the latest membership change before acknowledging it, so that a
#: burst of joins (a deployment starting many workers) costs one rebalance, not one per join.
#: Sessions still end at once on any change; only the new election waits.
SETTLE = 0.3


def lease_margin(ttl: float) -> float:
    """Seconds before the lease's end at which this replica stops trusting it."""
    return min(2.0, ttl * 0.2)


# -- the lease --------------------------------------------------------------------------------------


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


# -- the leadership keys -----------------------------------------------------------------------------


class LeaderWatch:
    """Lists and watches ``NS/leadership/``; queues ``("snapshot", kvs, revision)`` and
    ``("events", events)`` for the elector."""

    def __init__(self, client: EtcdClient, keys: Keys, stop: threading.Event,
                 deliver: Callable[[tuple], None], logger: logging.Logger | None = None):
        self._client = client
        self._log = logger or log
        self._keys = keys
        self._stop = stop
        self._deliver = deliver
        # Guards _stream, which stop() cancels from another thread.
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self.thread = threading.Thread(target=self._run, name="etcdcron-leader-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def _run(self) -> None:
        prefix = self._keys.leadership
        backoff = Backoff(cap=5.0)
        while not self._stop.is_set():
            try:
                revision, kvs = self._client.list_prefix(prefix, stop=self._stop, forever=True)
                self._deliver(("snapshot", kvs, revision))
                stream = self._client.watch(prefix, prefix_end(prefix), revision + 1)
                with self._lock:
                    self._stream = stream
                if self._stop.is_set():
                    return
                for events in stream:
                    self._deliver(("events", events))
                    backoff.reset()
            except Stopped:
                return
            except Compacted as exc:
                self._log.info("leadership watch fell behind compaction (%s); listing again", exc)
            except EtcdError as exc:
                self._log.warning("leadership watch failed: %s; listing again", exc)
                self._stop.wait(backoff.next_delay())


# -- the election --------------------------------------------------------------------------------------


class ElectionState(enum.Enum):
    CLAIMING = "claiming"
    PASSIVE = "passive"
    WAITING = "waiting"
    ELECTED = "elected"
    BLOCKED = "blocked"
    STOPPED = "stopped"


_TRANSITIONS = {
    ElectionState.CLAIMING: {ElectionState.PASSIVE, ElectionState.WAITING, ElectionState.BLOCKED},
    ElectionState.PASSIVE: {ElectionState.CLAIMING, ElectionState.WAITING, ElectionState.BLOCKED},
    ElectionState.WAITING: {ElectionState.ELECTED, ElectionState.CLAIMING, ElectionState.BLOCKED,
                            ElectionState.PASSIVE},
    ElectionState.ELECTED: {ElectionState.WAITING, ElectionState.CLAIMING, ElectionState.BLOCKED},
    ElectionState.BLOCKED: {ElectionState.WAITING, ElectionState.CLAIMING, ElectionState.ELECTED,
                            ElectionState.PASSIVE},
    ElectionState.STOPPED: set(),
}
for _state in ElectionState:
    if _state is not ElectionState.STOPPED:
        _TRANSITIONS[_state].add(ElectionState.STOPPED)


@dataclass(frozen=True, slots=True)
class _Member:
    record: stored_pb2.Leadership | None  # None: the value cannot be decoded
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(slots=True)
class _Claim:
    generation: int  # of the lease the key is bound to
    create_revision: int
    mod_revision: int  # of our last write of the key


class Elector:
    """Runs the election on ``etcdcron-election`` and drives the engine.

    :param static: ``(partition_id, partition_total)`` for static mode, else ``None``.
    :param activate: called with the :class:`Ownership` once elected.
    :param deactivate: called before every rebalance and on stop; waits for triggers in flight.
    :param on_elected: called with the ownership after each election (the Cron queues the user's
        ``on_leadership`` from it).
    :param stop: the Cron's stop event, which ends the leadership watch; the election itself
        ends with :meth:`halt`.
    """

    def __init__(self, *, client: EtcdClient, keys: Keys, lease: LeaseKeeper, replica_id: str,
                 uid: int, replica_data, static: tuple[int, int] | None,
                 activate: Callable[[Ownership], None], deactivate: Callable[[], None],
                 on_elected: Callable[[Ownership], None], stop: threading.Event,
                 logger: logging.Logger | None = None):
        self._client = client
        self._log = logger or log
        self._keys = keys
        self._lease = lease
        self._key = keys.leader(replica_id)
        self.replica_id = replica_id
        self._uid = uid
        self._replica_data = replica_data
        self._static = static
        self._activate = activate
        self._deactivate = deactivate
        self._on_elected = on_elected
        # Set by halt(): leave the loop, end the session; etcd calls of this thread abort on it.
        self._halt = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Guards _state and _ownership; notified on every state change.
        self._cond = threading.Condition(threading.Lock())
        self._state = ElectionState.CLAIMING
        self._ownership: Ownership | None = None
        # Only the election thread touches the rest.
        self._members: dict[bytes, _Member] = {}
        self._watched_revision = 0  # of the keys seen; 0 until the first snapshot
        self._change_revision = 0
        self._changed_at = 0.0  # monotonic time the change revision last moved
        self._wake_at: float | None = None  # monotonic time the loop must evaluate again
        self._claim: _Claim | None = None
        self._ownership_membership: tuple = ()
        self._epoch = 0
        self._logged: set[str] = set()
        self.watch = LeaderWatch(client, keys, stop, self._inbox.put, self._log)
        self.thread = threading.Thread(target=self._run, name="etcdcron-election", daemon=True)

    # -- any thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self.watch.start()
        self.thread.start()

    def wake(self) -> None:
        self._inbox.put(("wake",))

    @property
    def state(self) -> ElectionState:
        return self._state

    @property
    def ownership(self) -> Ownership | None:
        return self._ownership

    def is_elected(self) -> bool:
        ownership = self._ownership
        return ownership is not None and self._lease.valid(ownership.lease_generation)

    def wait_elected(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(self.is_elected, timeout)

    def halt(self) -> None:
        """End the election: the thread drains the session and exits. Unlike the shared stop
        event, this leaves the recorder free to record the results still in flight."""
        self._halt.set()
        self.wake()

    # -- election thread -------------------------------------------------------------------------

    def _set_state(self, state: ElectionState, ownership: Ownership | None = None) -> None:
        with self._cond:
            if state is not self._state and state not in _TRANSITIONS[self._state]:
                raise LifecycleError(f"election cannot go from {self._state.name} to {state.name}")
            self._state = state
            self._ownership = ownership
            self._cond.notify_all()

    def _log_once(self, level: int, message: str, *args) -> None:
        text = message % args
        if text not in self._logged:
            self._logged.add(text)
            self._log.log(level, "replica %r: %s", self.replica_id, text)

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                timeout = min(1.0, self._lease.valid_for()) if self._claim else 1.0
                if self._wake_at is not None:
                    timeout = min(timeout, self._wake_at - time.monotonic())
                    self._wake_at = None
                timeout = max(0.01, timeout)
                try:
                    message = self._inbox.get(timeout=timeout)
                except queue.Empty:
                    message = ("wake",)
                self._take(message)
                while True:
                    try:
                        self._take(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if self._halt.is_set():
                    break
                try:
                    self._evaluate()
                except Stopped:
                    break
                except EtcdError as exc:
                    self._log.warning("replica %r: election step failed: %s", self.replica_id, exc)
        finally:
            self._end_session("stopping")
            self._set_state(ElectionState.STOPPED)

    def _take(self, message: tuple) -> None:
        kind = message[0]
        if kind == "snapshot":
            _, kvs, revision = message
            self._members = {kv.key: self._member(kv) for kv in kvs}
            created = [m.create_revision for m in self._members.values()]
            self._changed(max(created, default=0))
            self._watched_revision = revision
        elif kind == "events":
            for event in message[1]:
                kv = event.kv
                if event.type == event.DELETE:
                    self._members.pop(kv.key, None)
                    self._changed(kv.mod_revision)
                else:
                    self._members[kv.key] = self._member(kv)
                    if kv.version == 1:
                        self._changed(kv.create_revision)
                self._watched_revision = max(self._watched_revision, kv.mod_revision)

    def _changed(self, revision: int) -> None:
        if revision > self._change_revision:
            self._change_revision = revision
            self._changed_at = time.monotonic()

    @staticmethod
    def _member(kv) -> _Member:
        record = stored_pb2.Leadership()
        try:
            record.ParseFromString(kv.value)
        except DecodeError:
            record = None
        return _Member(record, kv.create_revision, kv.mod_revision, kv.lease)

    def _end_session(self, why: str) -> None:
        if self._ownership is None:
            return
        self._log.info("replica %r: leaving partition(s) %s of %d: %s", self.replica_id,
                       sorted(self._ownership.indices), self._ownership.total, why)
        self._deactivate()
        self._set_state(ElectionState.WAITING if self._claim else ElectionState.CLAIMING)

    def _record(self, total: int) -> bytes:
        record = stored_pb2.Leadership(total=total, uid=self._uid)
        if self._replica_data is not None:
            record.replica_data.CopyFrom(self._replica_data)
        return record.SerializeToString()

    def _evaluate(self) -> None:
        lease = self._lease.current()
        if lease is None:
            self._claim = None
            self._end_session("lease lost")
            if self._state is not ElectionState.CLAIMING:
                self._set_state(ElectionState.CLAIMING)
            return
        lease_id, generation = lease
        if self._claim is None or self._claim.generation != generation:
            self._claim = None
            self._end_session("new lease")
            self._claim_key(lease_id, generation)
            return  # the watch will show the key (or its holder) and wake us
        mine = self._members.get(self._key)
        if mine is None or mine.create_revision != self._claim.create_revision:
            if self._watched_revision >= self._claim.mod_revision:
                self._log.warning("replica %r: its leadership key was deleted; claiming it again",
                                  self.replica_id)
                self._claim = None
                self._end_session("leadership key deleted")
                self.wake()
            return
        if mine.mod_revision < self._claim.mod_revision:
            return  # the watch has not caught up with our last write yet
        if mine.mod_revision > self._claim.mod_revision:
            # Written again since the write we know of: one whose answer was lost (a deadline
            # passed after etcd applied it), or another writer's. The fence is what etcd holds.
            self._claim.mod_revision = mine.mod_revision
        if self._ownership is not None and self._ownership.fence_revision != mine.mod_revision:
            self._end_session("its leadership key was written again")
        undecodable = sorted(k.decode(errors="replace") for k, m in self._members.items()
                             if m.record is None)
        if undecodable:
            self._end_session("undecodable leadership key")
            self._log_once(logging.WARNING, "waiting: leadership key(s) %s cannot be decoded",
                           undecodable)
            if self._state is not ElectionState.BLOCKED:
                self._set_state(ElectionState.BLOCKED)
            return
        if self._static is not None:
            self._evaluate_static()
        else:
            self._evaluate_dynamic(mine, lease_id)

    def _claim_key(self, lease_id: int, generation: int) -> None:
        if not self._watched_revision:
            return  # no snapshot of the keys yet
        holder = self._members.get(self._key)
        if holder is not None and holder.record is not None and holder.record.uid == self._uid:
            self._claim_own_key(holder, lease_id, generation)
            return
        if holder is not None:
            self._log_once(logging.INFO, "replica id is held by another process; waiting "
                           "passively until it goes away")
            if self._state is not ElectionState.PASSIVE:
                self._set_state(ElectionState.PASSIVE)
            return
        total = self._static[1] if self._static else len(self._members) + 1
        response = self._client.txn([cmp_create(self._key, 0)],
                                    [op_put(self._key, self._record(total), lease=lease_id)],
                                    stop=self._halt)
        if not response.succeeded:
            return  # somebody took it first; the watch will show who
        revision = response.header.revision
        self._hold(_Claim(generation, revision, revision), "claimed")

    def _claim_own_key(self, holder: _Member, lease_id: int, generation: int) -> None:
        """The key holds this replica's own record: written under the current lease (by a claim
        whose answer was lost), take it up; written under an earlier one, wait for it to go."""
        if holder.lease != lease_id:
            self._log_once(logging.INFO, "waiting for its leadership key of an earlier lease "
                           "(%x) to go", holder.lease)
            if self._state is not ElectionState.CLAIMING:
                self._set_state(ElectionState.CLAIMING)
            return
        self._hold(_Claim(generation, holder.create_revision, holder.mod_revision),
                   "took up its own")

    def _hold(self, claim: _Claim, how: str) -> None:
        self._claim = claim
        self._logged.clear()
        self._log.info("replica %r: %s leadership key %r", self.replica_id, how,
                       self._key.decode())
        self._set_state(ElectionState.WAITING)

    def _evaluate_static(self) -> None:
        partition_id, total = self._static
        others = {k.decode(errors="replace"): m.record.total for k, m in self._members.items()
                  if m.record.total != total}
        if others:
            if self._ownership is None:
                self._log_once(logging.WARNING, "not starting: this replica's partition total "
                               "is %d but leadership key(s) say %s", total, others)
                if self._state is not ElectionState.BLOCKED:
                    self._set_state(ElectionState.BLOCKED)
            return
        if self._ownership is None:
            self._elect(total, frozenset([partition_id]), ())

    def _evaluate_dynamic(self, mine: _Member, lease_id: int) -> None:
        keys = sorted(self._members)
        membership = tuple((k, self._members[k].create_revision) for k in keys)
        total = len(keys)
        if self._ownership is not None:
            if self._ownership_membership == membership:
                return
            self._end_session(f"membership changed to {total} replica(s)")
        if mine.record.total != total or mine.mod_revision < self._change_revision:
            settled_at = self._changed_at + SETTLE
            if time.monotonic() < settled_at:
                self._wake_at = settled_at
                return
            # Acknowledge the change (after draining): write our key again with the new total.
            response = self._client.txn(
                [cmp_create(self._key, self._claim.create_revision)],
                [op_put(self._key, self._record(total), lease=lease_id)],
                stop=self._halt)
            if response.succeeded:
                self._claim.mod_revision = response.header.revision
            return
        if all(m.record.total == total and m.mod_revision >= self._change_revision
               for m in self._members.values()):
            self._elect(total, frozenset([keys.index(self._key)]), membership)

    def _elect(self, total: int, indices: frozenset, membership: tuple) -> None:
        self._epoch += 1
        replicas = tuple(
            m.record.replica_data if m.record.HasField("replica_data") else None
            for _, m in sorted(self._members.items())
        )
        lease = self._lease.current()
        ownership = Ownership(total=total, indices=indices, fence_key=self._key,
                              fence_revision=self._claim.mod_revision,
                              lease_generation=self._claim.generation, epoch=self._epoch,
                              replicas=replicas, lease_id=lease[0] if lease else 0)
        self._ownership_membership = membership
        self._activate(ownership)
        self._set_state(ElectionState.ELECTED, ownership)
        self._log.info("replica %r: elected for partition(s) %s of %d", self.replica_id,
                       sorted(indices), total)
        self._on_elected(ownership)
