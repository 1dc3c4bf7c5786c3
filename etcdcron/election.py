"""The election: this replica's key under ``NS/leadership/`` and the partitions it owns.

:class:`Elector` runs its loop on the ``etcdcron-election`` thread, under a supervising
:class:`~etcdcron.supervise.Loop`: it claims the key, reaches quorum and tells the engine which
partitions it owns (DESIGN.md section 5). It learns the lease from
:class:`~etcdcron.lease.LeaseKeeper` (``etcdcron-lease``) and the keys from
:class:`~etcdcron.leaderwatch.LeaderWatch` (``etcdcron-leader-watch``), which it starts.
:meth:`Elector.resign`, :meth:`Elector.is_elected` and :meth:`Elector.wait_elected` may be
called from any thread.

Election states (State Transitions)::

    CLAIMING -> PASSIVE      the key is held by another process with the same replica id
    CLAIMING -> WAITING      key claimed; waiting for every replica to agree
    WAITING  -> ELECTED      quorum: the engine triggers the owned partitions
    ELECTED  -> WAITING      membership changed: stop, drain, acknowledge, wait for quorum again
    any      -> BLOCKED      a leadership key cannot be decoded, static totals disagree, or this
                             replica's own record cannot be encoded
    any      -> CLAIMING     the lease or the key was lost
    any      -> RESIGNED     resign(): drained, key deleted; out for a growing backoff
    RESIGNED -> CLAIMING     the backoff is over: claim again
    any      -> STOPPED

A session ends (``is_elected()`` is False from that moment, drain included) before the engine is
told to drain, and a replica writes its key only while it holds no session.

Dynamic membership: every replica writes ``total`` = the number of leadership keys it sees.
Quorum is a function of the keys alone: with N keys, every key must show ``total == N`` and a
mod revision at least the newest key's create revision (it was written after its replica saw
every current member). A replica whose own key falls short ends its session, waits for its
triggers in flight, and writes its key again; once every key qualifies, each replica owns the
jobs with ``partition_id % N == index`` of its key among the sorted keys. Since the verdict
depends on nothing but what etcd holds, every replica that sees the same keys reaches it: a
change some replica saw and another missed (a replica that joined and left while one was frozen,
a watch that fell behind compaction and listed again) cannot leave anyone waiting for an
acknowledgement nobody will write. It is still safe: two replicas elected under different key
sets would need a key that is in one set only, or totals that differ, and either makes the key
written under the older view fall short until its replica has drained and written again.

Static mode (``partition_id`` / ``partition_total``): the key is ``NS/leadership/<partition_id>``
and the replica starts once every leadership key shows its total.
"""

from __future__ import annotations

import enum
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import any_pb2
from google.protobuf.message import EncodeError

from etcdcron._etcd import EtcdClient, Stopped, cmp_create, op_delete, op_put
from etcdcron._pb import stored_pb2
from etcdcron.errors import EtcdError, LifecycleError
from etcdcron.index import Ownership
from etcdcron.keys import Keys
from etcdcron.lease import LeaseKeeper
from etcdcron.leaderwatch import LeaderWatch
from etcdcron.metrics import NO_METRICS, Metrics
from etcdcron.supervise import STUCK_FAILURES, Loop

__all__ = ["Elector", "ElectionState", "ElectionBlocked", "quorum", "resign_backoff"]

log = logging.getLogger(__name__)


#: Seconds a replica waits after the latest membership change before acknowledging it, so that a
#: burst of joins (a deployment starting many workers) costs one rebalance, not one per join.
#: Sessions still end at once on any change; only the new election waits.
SETTLE = 0.3

#: Lease TTLs a replica waits for quorum before it warns (and again after as many more), naming
#: the replicas it waits for.
QUORUM_PATIENCE = 2.0

#: Lease TTLs after a resignation within which the next one counts as "in a row".
RESIGN_MEMORY = 6.0


def resign_backoff(resignations: int, ttl: float) -> float:
    """Seconds a replica stays out after its ``resignations``-th resignation in a row: half a
    lease TTL, doubling each time, at most three TTLs."""
    # int ** int is Any to mypy (a negative power is a float)
    return min(3.0 * ttl, ttl / 2 * cast(float, 2 ** min(resignations - 1, 16)))


class ElectionState(enum.Enum):
    CLAIMING = "claiming"
    PASSIVE = "passive"
    WAITING = "waiting"
    ELECTED = "elected"
    BLOCKED = "blocked"
    RESIGNED = "resigned"
    STOPPED = "stopped"


_TRANSITIONS = {
    ElectionState.CLAIMING: {ElectionState.PASSIVE, ElectionState.WAITING, ElectionState.BLOCKED},
    ElectionState.PASSIVE: {ElectionState.CLAIMING, ElectionState.WAITING, ElectionState.BLOCKED},
    ElectionState.WAITING: {ElectionState.ELECTED, ElectionState.CLAIMING, ElectionState.BLOCKED,
                            ElectionState.PASSIVE},
    ElectionState.ELECTED: {ElectionState.WAITING, ElectionState.CLAIMING, ElectionState.BLOCKED},
    ElectionState.BLOCKED: {ElectionState.WAITING, ElectionState.CLAIMING, ElectionState.ELECTED,
                            ElectionState.PASSIVE},
    ElectionState.RESIGNED: {ElectionState.CLAIMING},
    ElectionState.STOPPED: set(),
}
for _state in ElectionState:
    if _state is not ElectionState.STOPPED:
        _TRANSITIONS[_state] |= {ElectionState.STOPPED, ElectionState.RESIGNED} - {_state}


class ElectionBlocked(Exception):
    """Why the election waits (shown as the election loop's last error in ``health()``)."""


@dataclass(frozen=True, slots=True)
class _Member:
    record: stored_pb2.Leadership | None  # None: the value cannot be decoded
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(slots=True)
class _Claim:
    lease_id: int  # the lease the key is bound to
    generation: int  # of that lease
    create_revision: int
    mod_revision: int  # of our last write of the key


def _membership(members: Mapping[bytes, _Member]) -> tuple[tuple[bytes, int], ...]:
    return tuple((key, members[key].create_revision) for key in sorted(members))


def quorum(members: Mapping[bytes, _Member]) -> list[bytes]:
    """The keys that have not acknowledged the current members (sorted); none: quorum.

    A key acknowledges them if it shows ``total`` = the number of keys and was written at or
    after the newest key's creation. Every record must be decoded.
    """
    total = len(members)
    newest = max((m.create_revision for m in members.values()), default=0)
    return [key for key, m in sorted(members.items())
            if cast(stored_pb2.Leadership, m.record).total != total or m.mod_revision < newest]


class Elector:
    """Runs the election on ``etcdcron-election`` and drives the engine.

    :param static: ``(partition_id, partition_total)`` for static mode, else ``None``.
    :param activate: called with the :class:`Ownership` once elected.
    :param deactivate: called before every rebalance and on stop; waits for triggers in flight.
        :meth:`is_elected` is already False when it is called.
    :param on_elected: called with the ownership after each election (the Cron queues the user's
        ``on_leadership`` from it).
    :param stop: the Cron's stop event, which ends the leadership watch; the election itself
        ends with :meth:`halt`.
    :param depends_on: other loops this replica's work needs (the engine's): after resigning,
        it claims again only once none of them, nor the lease and leadership watch loops, is
        failing (:data:`~etcdcron.supervise.STUCK_FAILURES` in a row, or dead).
    """

    def __init__(self, *, client: EtcdClient, keys: Keys, lease: LeaseKeeper, replica_id: str,
                 uid: int, replica_data: any_pb2.Any | None, static: tuple[int, int] | None,
                 activate: Callable[[Ownership], None], deactivate: Callable[[], None],
                 on_elected: Callable[[Ownership], None], stop: threading.Event,
                 metrics: Metrics = NO_METRICS, logger: logging.Logger | None = None,
                 depends_on: Sequence[Loop] = ()) -> None:
        self._client = client
        self._metrics = metrics
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
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # Guards _state, _ownership and _resignation; notified on every state change.
        self._cond = threading.Condition(threading.Lock())
        self._state = ElectionState.CLAIMING
        self._ownership: Ownership | None = None  # published once the engine is active
        self._resignation: str | None = None  # why resign() was asked, until it is carried out
        # Only the election thread touches the rest.
        self._session: Ownership | None = None  # the engine's session, until it is drained
        self._members: dict[bytes, _Member] = {}
        self._watched_revision = 0  # of the keys seen; 0 until the first snapshot
        # Monotonic time a fence failed: decide nothing until a fresh snapshot arrives.
        self._relisting: float | None = None
        self._changed_at = 0.0  # monotonic time the membership last changed
        self._wake_at: float | None = None  # monotonic time the loop must evaluate again
        self._claim: _Claim | None = None
        self._ownership_membership: tuple[tuple[bytes, int], ...] = ()
        self._epoch = 0
        self._logged: set[str] = set()
        self._blocked = False  # whether the loop reported why it waits (no progress meanwhile)
        self._waiting_since: float | None = None  # monotonic; for the quorum warning
        self._warn_at = 0.0  # monotonic time of the next quorum warning
        self._resignations = 0  # in a row
        self._resigned_at = -math.inf  # monotonic
        self._resigned_until = 0.0  # monotonic
        self._runs = 0
        lease.on_stuck = self.resign  # a lease that cannot be kept gives the partitions up
        self.watch = LeaderWatch(client, keys, stop, self._inbox.put, logger,
                                 on_stuck=self.resign, stuck_after=lease.ttl)
        self.loop = Loop("etcdcron-election", self._run, stopping=self._halt.is_set,
                         wait=self._pause, on_stuck=self.resign, stuck_after=lease.ttl,
                         logger=self._log)
        self.thread = self.loop.thread
        self._depends_on = (lease.loop, self.watch.loop, *depends_on)

    # -- any thread ------------------------------------------------------------------------------

    @property
    def loops(self) -> tuple[Loop, ...]:
        """The supervised loops of this component (leader watch, election), for ``health()``."""
        return (self.watch.loop, self.loop)

    def start(self) -> None:
        self.watch.start()
        self.loop.start()

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
        return (ownership is not None and self._resignation is None
                and self._lease.valid(ownership.lease_generation))

    def wait_elected(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(self.is_elected, timeout)

    def resign(self, why: str) -> None:
        """Give this replica's partitions up for a while, because ``why`` (any thread).

        From the moment this returns nothing more is triggered and :meth:`is_elected` is
        False. The election thread then drains the session, deletes its leadership key (so the
        other replicas take the partitions over; the lease, which triggers handed over are
        bound to, stays), stays out for :func:`resign_backoff` (longer after each resignation
        in a row, and while a loop it depends on still fails), and claims again.
        """
        with self._cond:
            if self._halt.is_set() or self._state is ElectionState.STOPPED:
                return
            pending, self._resignation = self._resignation, why
            self._cond.notify_all()
        self._lease.end_generation()  # the session's triggers stop here, its results still land
        if pending is None:
            self._log.warning("replica %r resigns its partitions: %s", self.replica_id, why)
        self.wake()

    def fence_failed(self, ownership: Ownership) -> None:
        """A write fenced by ``ownership`` failed (any thread): etcd's leadership key is not
        what that session was granted on, so this replica's view of the keys is behind. The
        election thread ends that session, lists the keys afresh, and decides again on them."""
        self._inbox.put(("fenced", ownership.epoch))

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

    def _log_once(self, level: int, message: str, *args: object) -> None:
        text = message % args
        if text not in self._logged:
            self._logged.add(text)
            self._log.log(level, "replica %r: %s", self.replica_id, text)

    def _pause(self, delay: float) -> bool:
        """The supervisor's wait before it runs the loop again. Never reports stopping, so that
        after a halt the loop runs once more and ends the session on its way out."""
        self._halt.wait(delay)
        return False

    def _run(self, loop: Loop) -> None:
        try:
            self._runs += 1
            if self._runs > 1 and not self._halt.is_set():
                self._recover()
            while not self._halt.is_set():
                self._receive()
                if self._halt.is_set():
                    break
                try:
                    if self._resignation is not None:
                        self._carry_out_resignation()
                    self._evaluate()
                except Stopped:
                    break
                except ElectionBlocked as exc:
                    self._block(str(exc))
                except EtcdError as exc:
                    self._log.warning("replica %r: election step failed: %s", self.replica_id,
                                      exc)
                    loop.failed(exc)
                else:
                    self._blocked = False
                    loop.progress()
        finally:
            if self._halt.is_set():
                try:
                    self._end_session("stopping")
                finally:
                    self._set_state(ElectionState.STOPPED)

    def _recover(self) -> None:
        """The loop raised and runs again (the supervisor logged why): end the session and read
        the keys afresh."""
        self._end_session("the election loop restarted", "restart")
        self.watch.relist()

    def _receive(self) -> None:
        """Wait for the next message (or the next time to look again), then take them all."""
        timeout = min(1.0, self._lease.valid_for()) if self._claim else 1.0
        if self._wake_at is not None:
            timeout = min(timeout, self._wake_at - time.monotonic())
            self._wake_at = None
        try:
            message = self._inbox.get(timeout=max(0.01, timeout))
        except queue.Empty:
            message = ("wake",)
        self._take(message)
        while True:
            try:
                self._take(self._inbox.get_nowait())
            except queue.Empty:
                break

    def _take(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "snapshot":
            _, kvs, revision = message
            members = {kv.key: self._member(kv) for kv in kvs}
            if _membership(members) != _membership(self._members):
                self._changed_at = time.monotonic()
            self._members = members
            self._watched_revision = revision
            self._relisting = None
        elif kind == "fenced":
            if self._session is not None and self._session.epoch == message[1]:
                self._end_session("a write's fence failed: its leadership key is not as this "
                                  "session knows it", "key")
                self._relisting = time.monotonic()
                self.watch.relist()
        elif kind == "events":
            _, events, revision = message
            for event in events:
                kv = event.kv
                if event.type == event.DELETE:
                    if self._members.pop(kv.key, None) is not None:
                        self._changed_at = time.monotonic()
                else:
                    before = self._members.get(kv.key)
                    self._members[kv.key] = self._member(kv)
                    if before is None or before.create_revision != kv.create_revision:
                        self._changed_at = time.monotonic()
            self._watched_revision = max(self._watched_revision, revision)

    @staticmethod
    def _member(kv: Any) -> _Member:
        record: stored_pb2.Leadership | None
        record = stored_pb2.Leadership()
        try:
            record.ParseFromString(kv.value)
        except Exception:  # noqa: BLE001 - any value that does not parse is "undecodable"
            record = None
        return _Member(record, kv.create_revision, kv.mod_revision, kv.lease)

    def _end_session(self, why: str, reason: str | None = None) -> None:
        """Stop triggering (``is_elected()`` is False from here on), then drain.

        :param reason: for the rebalance metric (``None``: not a rebalance, e.g. stopping)."""
        if self._session is None:
            return
        if reason is not None:
            self._metrics.rebalance(reason)
        self._log.info("replica %r: leaving partition(s) %s of %d: %s", self.replica_id,
                       sorted(self._session.indices), self._session.total, why)
        if self._state is ElectionState.ELECTED:
            self._set_state(ElectionState.WAITING if self._claim else ElectionState.CLAIMING)
        self._deactivate()
        self._session = None  # only now: if the drain raised, the next attempt drains again

    def _block(self, why: str) -> None:
        """Wait, visibly: BLOCKED, a warning, and the reason as the loop's last error."""
        self._end_session(why, "blocked")
        self._log_once(logging.WARNING, "waiting: %s", why)
        if self._state is not ElectionState.BLOCKED:
            self._set_state(ElectionState.BLOCKED)
        if not self._blocked:
            self._blocked = True
            self.loop.failed(ElectionBlocked(why))

    def _record(self, total: int) -> bytes:
        try:
            record = stored_pb2.Leadership(total=total, uid=self._uid)
            if self._replica_data is not None:
                record.replica_data.CopyFrom(self._replica_data)
            return record.SerializeToString()
        except (ValueError, TypeError, EncodeError) as exc:
            raise ElectionBlocked(f"its leadership record (total {total!r}) cannot be "
                                  f"encoded: {exc}") from exc

    def _carry_out_resignation(self) -> None:
        with self._cond:
            why, self._resignation = self._resignation, None
        try:
            self._end_session(f"resigning: {why}", "resigned")
        finally:
            self._give_up_key()
            if self._state is not ElectionState.RESIGNED:
                self._set_state(ElectionState.RESIGNED)
            delay = self._stay_out()
        self._log.info("replica %r: resigned (%d in a row); claiming again in %.1fs",
                       self.replica_id, self._resignations, delay)

    def _give_up_key(self) -> None:
        """Delete this replica's leadership key, so the others take its partitions over. The
        lease stays: triggers handed over when the session ended are bound to it. If etcd
        refuses, release the lease instead (it goes, or runs out, and the key with it)."""
        claim, self._claim = self._claim, None
        if claim is None:
            return
        try:
            self._client.txn([cmp_create(self._key, claim.create_revision)],
                             [op_delete(self._key)], stop=self._halt)
        except EtcdError as exc:
            self._log.warning("replica %r: could not delete its leadership key (%s); releasing "
                              "its lease instead", self.replica_id, exc)
            self._lease.release()

    def _stay_out(self) -> float:
        """Count one more resignation in a row and start its backoff; returns its length."""
        now = time.monotonic()
        if now - self._resigned_at > RESIGN_MEMORY * self._lease.ttl:
            self._resignations = 0
        self._resignations += 1
        self._resigned_at = now
        delay = resign_backoff(self._resignations, self._lease.ttl)
        self._resigned_until = self._wake_at = now + delay
        return delay

    def _failing(self) -> list[str]:
        """The loops this replica depends on that are failing now."""
        return [h.name for h in (loop.health() for loop in self._depends_on)
                if not h.alive or h.failures >= STUCK_FAILURES]

    def _evaluate(self) -> None:
        if self._relisting is not None:
            if time.monotonic() - self._relisting > self._lease.ttl:
                self._relisting = time.monotonic()
                self.watch.relist()  # the watch failed meanwhile: ask again
            self._wake_at = time.monotonic() + 1.0
            return  # the snapshot that ends it wakes the loop
        if self._state is ElectionState.RESIGNED:
            if time.monotonic() < self._resigned_until:
                self._wake_at = self._resigned_until
                return
            failing = self._failing()
            if failing:
                delay = self._stay_out()
                self._log.warning("replica %r: staying out another %.1fs: %s still failing",
                                  self.replica_id, delay, ", ".join(failing))
                return
            self._log.info("replica %r: claiming again after resigning", self.replica_id)
            self._set_state(ElectionState.CLAIMING)
        lease = self._lease.current()
        if lease is None:
            self._claim = None
            self._end_session("lease lost", "lease")
            if self._state is not ElectionState.CLAIMING:
                self._set_state(ElectionState.CLAIMING)
            return
        lease_id, generation = lease
        if self._claim is None or self._claim.generation != generation:
            self._claim = None
            self._end_session("new lease", "lease")
            self._claim_key(lease_id, generation)
            return  # the watch will show the key (or its holder) and wake us
        mine = self._members.get(self._key)
        if mine is None or mine.create_revision != self._claim.create_revision:
            if self._watched_revision >= self._claim.mod_revision:
                self._log.warning("replica %r: its leadership key was deleted; claiming it again",
                                  self.replica_id)
                self._claim = None
                self._end_session("leadership key deleted", "key")
                self.wake()
            return
        if mine.mod_revision < self._claim.mod_revision:
            return  # the watch has not caught up with our last write yet
        if mine.mod_revision > self._claim.mod_revision:
            # Written again since the write we know of: one whose answer was lost (a deadline
            # passed after etcd applied it), or another writer's. The fence is what etcd holds.
            self._claim.mod_revision = mine.mod_revision
        if self._session is not None and self._session.fence_revision != mine.mod_revision:
            self._end_session("its leadership key was written again", "key")
        undecodable = sorted(k.decode(errors="replace") for k, m in self._members.items()
                             if m.record is None)
        if undecodable:
            raise ElectionBlocked(f"leadership key(s) {undecodable} cannot be decoded")
        if self._static is not None:
            self._evaluate_static()
        else:
            self._evaluate_dynamic(lease_id)

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
        self._hold(_Claim(lease_id, generation, revision, revision), "claimed")

    def _claim_own_key(self, holder: _Member, lease_id: int, generation: int) -> None:
        """The key holds this replica's own record: written under the current lease (by a claim
        whose answer was lost), take it up; written under an earlier one, wait for it to go."""
        if holder.lease != lease_id:
            self._log_once(logging.INFO, "waiting for its leadership key of an earlier lease "
                           "(%x) to go", holder.lease)
            if self._state is not ElectionState.CLAIMING:
                self._set_state(ElectionState.CLAIMING)
            return
        self._hold(_Claim(lease_id, generation, holder.create_revision, holder.mod_revision),
                   "took up its own")

    def _hold(self, claim: _Claim, how: str) -> None:
        self._claim = claim
        self._logged.clear()
        self._waiting_since = None
        self._log.info("replica %r: %s leadership key %r", self.replica_id, how,
                       self._key.decode())
        self._set_state(ElectionState.WAITING)

    def _evaluate_static(self) -> None:
        assert self._static is not None  # _evaluate calls it in static mode only
        partition_id, total = self._static
        # _evaluate calls it once every record is decoded
        others = {k.decode(errors="replace"): cast(stored_pb2.Leadership, m.record).total
                  for k, m in self._members.items()
                  if cast(stored_pb2.Leadership, m.record).total != total}
        if others:
            if self._session is None:
                raise ElectionBlocked(f"not starting: this replica's partition total is {total} "
                                      f"but leadership key(s) say {others}")
            return
        if self._session is None:
            self._elect(total, frozenset([partition_id]), ())

    def _evaluate_dynamic(self, lease_id: int) -> None:
        assert self._claim is not None  # _evaluate calls it with the key claimed
        keys = sorted(self._members)
        membership = _membership(self._members)
        total = len(keys)
        if self._session is not None:
            if self._ownership_membership == membership:
                return
            self._end_session(f"membership changed to {total} replica(s)", "membership")
        if self._state is ElectionState.BLOCKED:
            self._set_state(ElectionState.WAITING)
        lagging = quorum(self._members)
        if self._key in lagging:
            settled_at = self._changed_at + SETTLE
            if time.monotonic() < settled_at:
                self._wake_at = settled_at
                return
            # Acknowledge the members (after draining): write our key again with their number.
            response = self._client.txn(
                [cmp_create(self._key, self._claim.create_revision)],
                [op_put(self._key, self._record(total), lease=lease_id)],
                stop=self._halt)
            if response.succeeded:
                self._claim.mod_revision = response.header.revision
            return
        if lagging:
            self._warn_if_waiting_long(lagging)
            return
        self._elect(total, frozenset([keys.index(self._key)]), membership)

    def _warn_if_waiting_long(self, lagging: list[bytes]) -> None:
        """Warn when quorum has not come within :data:`QUORUM_PATIENCE` TTLs, and again after
        each as many more, naming the replicas whose keys fall short."""
        now = time.monotonic()
        patience = QUORUM_PATIENCE * self._lease.ttl
        if self._waiting_since is None:
            self._waiting_since, self._warn_at = now, now + patience
        if now < self._warn_at:
            self._wake_at = self._warn_at
            return
        self._warn_at = now + patience
        newest = max(m.create_revision for m in self._members.values())
        # the lagging keys come from quorum(), which reads decoded records only
        who = ", ".join(f"{self._keys.replica_id(k)!r} "
                        f"(total {cast(stored_pb2.Leadership, self._members[k].record).total} "
                        f"at revision {self._members[k].mod_revision})" for k in lagging)
        self._log.warning("replica %r: no quorum after %.0fs: waiting for %s to acknowledge the "
                          "%d members (total %d, written at revision >= %d)", self.replica_id,
                          now - self._waiting_since, who, len(self._members),
                          len(self._members), newest)
        # The lagging keys may be this replica's own view (its watch stalled after a fault,
        # seen in the chaos runs): read them afresh; the snapshot replaces the view.
        self.watch.relist()

    def _elect(self, total: int, indices: frozenset[int],
               membership: tuple[tuple[bytes, int], ...]) -> None:
        assert self._claim is not None  # elected only with the key claimed
        self._epoch += 1
        # every record is decoded by now (_evaluate checks that first)
        replicas = tuple(
            cast(stored_pb2.Leadership, m.record).replica_data
            if cast(stored_pb2.Leadership, m.record).HasField("replica_data") else None
            for _, m in sorted(self._members.items())
        )
        ownership = Ownership(total=total, indices=indices, fence_key=self._key,
                              fence_revision=self._claim.mod_revision,
                              lease_generation=self._claim.generation, epoch=self._epoch,
                              replicas=replicas, lease_id=self._claim.lease_id)
        self._ownership_membership = membership
        self._waiting_since = None
        self._session = ownership  # from here on, ending the session drains the engine
        self._activate(ownership)
        self._set_state(ElectionState.ELECTED, ownership)
        self._log.info("replica %r: elected for partition(s) %s of %d", self.replica_id,
                       sorted(indices), total)
        self._on_elected(ownership)
