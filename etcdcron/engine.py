"""The engine: runs the owned jobs of the current session, from etcd to trigger and back.

::

    informer thread --load/apply_events--> JobIndex --arm--> timer thread --dispatch--> workers
    workers --trigger(req)--> result --> recorder thread --one txn per batch--> etcd --> re-arm

The election thread calls :meth:`Engine.activate` with an :class:`~etcdcron.index.Ownership`
when this replica may trigger, and :meth:`Engine.deactivate` before any rebalance; the latter
waits (bounded) until the results of triggers in flight are recorded, so the next owner of a job
starts from its true counter.

Every counter write is a nested transaction inside one outer transaction per batch: the outer
compares this session's leadership fence, each inner one compares the job's and the counter's
mod revisions (so a stale owner, an old version or a concurrent writer changes nothing).

Handing over: when a session ends while triggers still run (longer than the drain limit), this
replica writes ``NS/inflight/NAME`` for each, bound to its lease and fenced by the session, and
records their results later under that key instead of the session. The next owner of such a
job loads it in HANDOFF and triggers nothing until the key is gone; then it reads the counter
again and goes on from there. So a long trigger is never fired twice by a rebalance, and a
rebalance never waits for it; only a replica that dies (its lease runs out) leaves its ticks to
be fired again.

Isolation by job: loading, triggering, planning and recording run per job inside their own
``try``, so a record that cannot be scheduled, a trigger that raises anything, or a result
etcd refuses affects that job alone. A refused result stays in flight and is written again
with capped backoff until it succeeds, the job changes, or the session ends
(:attr:`Engine.unrecorded` lists those jobs).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from etcd3.etcdrpc import kv_pb2
from etcd3.etcdrpc import rpc_pb2 as rpc

import grpc
from google.protobuf.message import DecodeError

from etcdcron._etcd import (
    Backoff,
    EtcdClient,
    Stopped,
    cmp_mod,
    compare_mod,
    guarded_check,
    guarded_write,
    op_delete,
    op_put,
    op_range,
    op_txn,
)
from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.api import TriggerResult
from etcdcron.errors import EtcdError, EtcdUnavailableError
from etcdcron.index import IN_FLIGHT, JobIndex, JobState, Ownership, Phase, decode_counter
from etcdcron.informer import Informer
from etcdcron.keys import Keys
from etcdcron.metrics import NO_METRICS, Metrics
from etcdcron.recorder import MAX_BATCH, Outcome, Recorder
from etcdcron.staging import Staging
from etcdcron.store import decode_job_or_none
from etcdcron.ticks import Pending, after_result, after_skip, catch_up, pending, to_timestamp
from etcdcron.timer import LEAD, Timer
from etcdcron.workers import WorkerPool, to_result

if TYPE_CHECKING:
    from etcdcron.schedule import Schedule
    from etcdcron.supervise import Loop

__all__ = ["Engine"]

log = logging.getLogger(__name__)

#: Longest wait before a refused result is written again.
REFUSED_RETRY_CAP = 10.0
#: How long the end of a session may spend writing the NS/inflight/ keys of running triggers.
HAND_OVER_TIMEOUT = 2.0
#: Jobs loaded per hold of the index lock.
LOAD_CHUNK = 2000
#: Jobs read back per transaction after failed compares (two reads each; etcd allows 128 ops).
_READS_PER_TXN = 64
#: A trigger fires only on a view of etcd proven current (a read barrier) at most this many
#: seconds before: one barrier serves every trigger of a burst, and a change acknowledged
#: more than this before a trigger is always seen by it. More than the timer's LEAD, at which
#: barriers are run ahead of jobs falling due (see Engine._soon).
FRESH_FOR = 0.05
assert FRESH_FOR > LEAD
#: How long results are held back at most while triggers wait for a worker (Engine._hold).
HOLD_FOR = 0.05
#: How long a worker waits for one read barrier before it checks its session again.
BARRIER_PATIENCE = 1.0

# The delivery a worker thread is running (fresh_as_of: see _trigger_one).
_delivery = threading.local()


@dataclass(slots=True)
class _Plan:
    """One outcome turned into an inner transaction, with what to apply if it succeeds."""

    outcome: Outcome
    counter: stored_pb2.Counter
    next: Pending | None
    op: bytes  #: the nested transaction, as wire bytes (see _etcd.guarded_write)
    mod_revision: int  #: the job's revision the plan compares
    counter_raw: bytes | None = None  #: the counter it writes, serialized


@dataclass(slots=True)
class _Handed:
    """A trigger still running when its session ended; ``claimed`` once its NS/inflight/ key
    is written (until then its result waits)."""

    state: JobState
    ownership: Ownership
    claimed: bool = False
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.1, cap=REFUSED_RETRY_CAP))


def _cmp_lease(key: bytes, lease_id: int) -> rpc.Compare:
    """Whether ``key`` exists bound to ``lease_id``."""
    return rpc.Compare(key=key, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL,
                       lease=lease_id)


class Engine:
    """Owned jobs, their timer, the worker pool and the recorder of one :class:`Cron`.

    :param trigger: the user's callable.
    :param lease_valid: whether the lease of a generation is still valid by this process's
        clock; checked right before every trigger.
    :param emit: queues an ``InformerEvent`` for the consumer sink (or ``None``).
    """

    def __init__(self, *, client: EtcdClient, keys: Keys,
                 trigger: Callable[[api_pb2.TriggerRequest], object], workers: int,
                 lease_valid: Callable[[int], bool],
                 emit: Callable[[api_pb2.InformerEvent], None] | None, staging: Staging,
                 stop: threading.Event, clock: Callable[[], float] = time.time,
                 trigger_timeout: float | None = None, metrics: Metrics = NO_METRICS,
                 logger: logging.Logger | None = None):
        self._log = logger or log
        self._metrics = metrics
        # Runs (name, token, run) that timed out and were counted as FAILED in the metrics:
        # their late result is not counted again. Only with metrics on; set operations are
        # atomic (the GIL), so it needs no lock of its own.
        self._expired_runs: set[tuple[str, int, int]] = set()
        self._trigger_timeout = trigger_timeout
        self._client = client
        self._keys = keys
        self._trigger = trigger
        self._lease_valid = lease_valid
        self._emit = emit
        self._stop = stop
        self._clock = clock
        self.index = JobIndex(logger)
        # Notified (under the index lock) whenever a job leaves RUNNING.
        self._drained = threading.Condition(self.index.lock)
        # Jobs whose result etcd refused, by name: (token, backoff, last error). Guarded by
        # the index lock; written by the recorder thread.
        self._refused: dict[str, tuple[int, Backoff, str]] = {}
        # Versions that could not be scheduled, by name: (mod revision, why). Index lock.
        self._unschedulable: dict[str, tuple[int, str]] = {}
        # The NS/inflight/ keys of the namespace: name -> partition id of the version whose
        # trigger runs elsewhere. Index lock; kept by the informer.
        self._claims: dict[str, int] = {}
        # Triggers of ended sessions still running here, handed over under NS/inflight/NAME:
        # name -> _Handed. Index lock.
        self._handed: dict[str, _Handed] = {}
        self.staging = staging
        self.timer = Timer(self._dispatch, clock, logger, on_expired=self._expire,
                           on_soon=self._soon)
        self.pool = WorkerPool(workers, self._run, logger)
        # When the recorder began holding results back for triggers waiting for a worker (see
        # _hold); any recorder thread, so a race only lengthens or shortens one hold.
        self._holding_since: float | None = None
        self.recorder = Recorder(self._commit, logger, hold=self._hold)
        #: Told (any thread) when a write fenced by a session failed: this replica's leadership
        #: key is not as that session knows it (the Cron wires it to the election).
        self.on_fence_failed: Callable[[Ownership], None] | None = None
        self.informer = Informer(client, keys, self, stop, logger,
                                 on_fence_failed=self._fence_failed)

    @property
    def loops(self) -> list[Loop]:
        """The supervised loops of the engine's threads."""
        return [self.informer.loop, self.timer.loop, *self.recorder.loops, *self.pool.loops]

    @property
    def threads(self) -> list[threading.Thread]:
        return [loop.thread for loop in self.loops]

    @property
    def unrecorded(self) -> list[str]:
        """Jobs whose trigger result etcd has refused so far (it is being retried)."""
        with self.index.lock:
            return sorted(self._refused)

    @property
    def unschedulable(self) -> dict[str, str]:
        """Owned job versions that cannot be scheduled, with the reason (they are skipped)."""
        with self.index.lock:
            return {name: why for name, (_, why) in sorted(self._unschedulable.items())}

    def start(self) -> None:
        self.informer.start()
        self.timer.start()
        self.recorder.start()
        self.pool.start()

    def stop(self) -> None:
        """Ask every thread to stop; the recorder first commits what the workers hand it."""
        self.informer.stop()
        self.timer.stop()
        self.pool.stop()
        self.recorder.stop()

    # -- sessions (election thread) --------------------------------------------------------------

    def activate(self, ownership: Ownership) -> None:
        with self.index.lock:
            self.index.set_ownership_locked(ownership)
        self.informer.activate(ownership)

    def deactivate(self, timeout: float) -> bool:
        """Stop triggering, wait up to ``timeout`` for results in flight, hand over the triggers
        still running, drop every job.

        Results that etcd refused are not waited for: they would not be written in time.

        :returns: whether every result in flight was recorded in time.
        """
        with self.index.lock:
            ownership = self.index.ownership
            if ownership is None:
                return True
            self.index.set_ownership_locked(None)
        self.informer.deactivate()
        self.timer.clear()
        self.staging.clear()
        with self._drained:
            drained = self._drained.wait_for(
                lambda: self.index.running <= len(self._refused), timeout)
            running = self.index.running_locked()
            for state in running:
                self._handed[state.name] = _Handed(state, ownership)
            self.timer.arm_deadlines([(state.deadline, ("handed", state.name),
                                       (state.token, state.run))
                                      for state in running if state.deadline])
            self.index.clear_locked()
            self._refused.clear()
            self._unschedulable.clear()
            self._claims.clear()
        if running:
            self._hand_over(ownership, running)
        self._send(api_pb2.InformerEvent(drop_all=api_pb2.InformerEventDropAll()))
        return drained

    def _hand_over(self, ownership: Ownership, states: list[JobState]) -> None:
        """Write NS/inflight/NAME for triggers still running at the end of ``ownership``'s
        session, fenced by it (election thread). Those not written are dropped: their next
        owner fires the tick again."""
        claimed: set[str] = set()
        # Only deliveries: a state waiting for its deletion to be recorded has no tick to hand
        # over, and its next owner deletes it.
        deliveries = [state for state in states if state.next is not None]  # cast below
        for start in range(0, len(deliveries), MAX_BATCH):
            batch = deliveries[start:start + MAX_BATCH]
            ops = [op_txn([cmp_mod(self._keys.job(state.name), state.mod_revision)],
                          [op_put(self._keys.in_flight(state.name), stored_pb2.InFlight(
                              job_partition_id=state.partition_id,
                              tick=to_timestamp(cast(Pending, state.next).tick)
                          ).SerializeToString(), lease=ownership.lease_id)])
                   for state in batch]
            try:
                if not ownership.lease_id:
                    raise EtcdError("the session's lease is not known")
                response = self._client.txn(
                    [cmp_mod(ownership.fence_key, ownership.fence_revision)], ops,
                    deadline=time.monotonic() + HAND_OVER_TIMEOUT, stop=self._stop)
            except (EtcdError, Stopped) as exc:
                self._log.warning("could not hand over %d triggers still running (%s); their "
                                  "next owners will fire them again", len(batch), exc)
                continue
            if response.succeeded:
                claimed.update(state.name for state, reply in zip(batch, response.responses)
                               if reply.response_txn.succeeded)
        with self.index.lock:
            for state in states:
                handed = self._handed.get(state.name)
                if handed is None or handed.state is not state:
                    continue
                if state.name in claimed:
                    handed.claimed = True
                else:
                    del self._handed[state.name]
        if claimed:
            self._log.info("%d trigger(s) still running were handed over; their results will be "
                           "recorded when they finish: %s", len(claimed), ", ".join(sorted(claimed)))

    def wait_handed_over(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the results of handed-over triggers (on stop)."""
        with self._drained:
            return self._drained.wait_for(lambda: not self._handed, timeout)

    @property
    def handed_over(self) -> list[str]:
        """Jobs whose trigger runs on here after this replica's session ended."""
        with self.index.lock:
            return sorted(self._handed)

    # -- informer thread -------------------------------------------------------------------------

    def _decode(self, kv: Any, ownership: Ownership) -> tuple[str, stored_pb2.Job] | None:
        """The name and record of a job key, if it is one of this namespace's jobs and owned."""
        name = self._keys.job_name(kv.key)
        if name is None:
            return None
        record = decode_job_or_none(kv.value, name, kv.mod_revision, self._keys)
        if record is None or not ownership.owns(record.partition_id):
            return None
        return name, record

    def load(self, ownership: Ownership, jobs: Iterable[tuple[Any, Any | None]],
             claims: list[Any], revision: int) -> None:
        """Take a full listing at ``revision``: load owned jobs, forget the ones not listed.

        ``jobs`` are ``(job kv, counter kv or None)`` pairs, consumed as they come (a listing
        read from etcd while it loads); ``claims`` are the ``NS/inflight/`` keys at that
        revision. Nothing loaded fires before the listing is whole: every trigger waits for a
        read barrier, which the informer passes only once this has returned."""
        claimed = dict(filter(None, (self._decode_claim(kv) for kv in claims)))
        listed: set[str] = set()
        first = True
        pairs = iter(jobs)
        # In chunks, each decoded before taking the lock (the timer and the workers wait on
        # it), loaded under it at once and armed at once: a decoded record weighs a kilobyte,
        # so only a chunk of them is ever held.
        while True:
            owned, taken = [], 0
            for kv, counter_kv in itertools.islice(pairs, LOAD_CHUNK):
                taken += 1
                decoded = self._decode(kv, ownership)
                if decoded is None:
                    continue
                name, record = decoded
                counter = (decode_counter(counter_kv.value, name, self._log)
                           if counter_kv is not None else None)
                owned.append((name, record, kv.mod_revision, counter,
                              counter_kv.mod_revision if counter_kv is not None else 0, kv.value))
            if not taken and not first:
                break
            arms: list[tuple[float, str, int]] = []
            with self.index.lock:
                if self.index.ownership is not ownership:
                    return
                if first:
                    self.index.caught_up_locked(revision)
                    self._claims = claimed
                    first = False
                for entry in owned:
                    listed.add(entry[0])
                    self._put_locked(entry, ownership, arms)
            self.timer.arm_many(arms)
        with self.index.lock:
            if self.index.ownership is not ownership:
                return
            for name in self.index.names_locked():
                if name not in listed:
                    self._forget_locked(name)
            self._drained.notify_all()
        self._log.debug("loaded %d owned jobs at revision %d", len(listed), revision)

    def apply_events(self, ownership: Ownership, events: list[Any]) -> None:
        arms: list[tuple[float, str, int]] = []
        with self.index.lock:
            if self.index.ownership is not ownership:
                return
            for event in events:
                kv = event.kv
                if kv.key.startswith(self._keys.inflight):
                    self._claim_event_locked(event, ownership)
                    continue
                if not kv.key.startswith(self._keys.jobs):
                    continue  # a nested namespace's key inside the watched range
                name = self._keys.job_name(kv.key)
                if name is None:
                    continue
                decoded = None if event.type == kv_pb2.Event.DELETE else self._decode(kv, ownership)
                if decoded is None:
                    self._forget_locked(name)
                    continue
                self._put_locked((name, decoded[1], kv.mod_revision, None, 0, kv.value), ownership,
                                 arms)
            self.index.caught_up_locked(events[-1].kv.mod_revision)
            self._drained.notify_all()
            # A job put and then deleted or replaced in the same response is armed only as it
            # stands now; armed under the lock, so that no later forget can precede the arming.
            self.timer.arm_many([arm for arm in arms if self._armed_locked(arm[1], arm[2])])

    def _armed_locked(self, name: str, token: int) -> bool:
        state = self.index.get_locked(name, token)
        return state is not None and state.phase is Phase.ARMED

    def _decode_claim(self, kv: Any) -> tuple[str, int] | None:
        """``(name, claimed partition id)`` of an ``NS/inflight/NAME`` key, if it is ours."""
        name = self._keys.in_flight_name(kv.key)
        if name is None:
            return None
        claim = stored_pb2.InFlight()
        try:
            claim.ParseFromString(kv.value)
        except DecodeError:
            self._keys.skip_once(kv.key, "in-flight key %r cannot be decoded; ignoring it",
                                 kv.key)
            return None
        return name, claim.job_partition_id

    def _claim_event_locked(self, event: Any, ownership: Ownership) -> None:
        """Another replica's trigger of a job started (put) or ended (delete) running."""
        if event.type == kv_pb2.Event.DELETE:
            name = self._keys.in_flight_name(event.kv.key)
            if name is None or self._claims.pop(name, None) is None:
                return
            state = self.index.get_locked(name)
            if state is not None and state.phase is Phase.HANDOFF:
                # Its result is recorded (or its replica is gone): read the counter, then arm.
                self.recorder.put(Outcome(name, state.token, ownership, refresh=True))
            return
        decoded = self._decode_claim(event.kv)
        if decoded is None:
            return
        name, partition_id = decoded
        self._claims[name] = partition_id
        state = self.index.get_locked(name)
        if (state is not None and state.phase is Phase.ARMED
                and state.partition_id == partition_id):
            self.index.set_phase_locked(state, Phase.HANDOFF)
            self.timer.discard(name)

    def _put_locked(self, entry: tuple[str, stored_pb2.Job, int, stored_pb2.Counter | None, int,
                                       bytes],
                    ownership: Ownership, arms: list[tuple[float, str, int]]) -> None:
        """Load one job version; one that cannot be scheduled is logged once and skipped."""
        name, mod_revision = entry[0], entry[2]
        try:
            state = self.index.put_locked(*entry)
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
            self._forget_locked(name)
            self._unschedulable[name] = (mod_revision, str(exc) or type(exc).__name__)
            self._keys.skip_once((name, mod_revision), "skipping job %r (revision %d): it "
                                 "cannot be scheduled: %s", name, mod_revision,
                                 self._unschedulable[name][1])
            return
        self._unschedulable.pop(name, None)
        if state is None:
            return
        if state.phase in IN_FLIGHT:  # the same version rewritten while a delivery is out
            self._emit_put(state)
        else:
            self._loaded_locked(state, ownership, arms)

    def _loaded_locked(self, state: JobState, ownership: Ownership,
                       arms: list[tuple[float, str, int]]) -> None:
        self.staging.discard(state.name)
        self._refused.pop(state.name, None)
        self._emit_put(state)
        self._arm_locked(state, ownership, arms)

    def _emit_put(self, state: JobState) -> None:
        if self._emit is not None:
            job = state.record.job
            put = api_pb2.InformerEventJobPut(name=state.name, mod_revision=state.mod_revision)
            if job.HasField("metadata"):
                put.metadata.CopyFrom(job.metadata)
            if job.HasField("payload"):
                put.payload.CopyFrom(job.payload)
            self._emit(api_pb2.InformerEvent(put=put))

    def _forget_locked(self, name: str, token: int | None = None) -> None:
        self._unschedulable.pop(name, None)
        state = self.index.remove_locked(name, token)
        if state is None:
            return
        self._refused.pop(name, None)
        self.timer.discard(name)
        self._drained.notify_all()
        self.staging.discard(name)
        self._send(api_pb2.InformerEvent(delete=api_pb2.InformerEventJobDelete(
            name=name, mod_revision=state.mod_revision)))

    def _idle_locked(self, state: JobState) -> None:
        """Leave ``state`` waiting for the informer: nothing triggers or records it any more."""
        self.index.set_phase_locked(state, Phase.IDLE)
        self._refused.pop(state.name, None)
        self._drained.notify_all()

    def _send(self, event: api_pb2.InformerEvent) -> None:
        if self._emit is not None:
            self._emit(event)

    def _arm_locked(self, state: JobState, ownership: Ownership,
                    arms: list[tuple[float, str, int]]) -> None:
        """Put ``state`` where its ``next`` says: the timer, or the recorder to be deleted; or
        in HANDOFF while another replica's trigger of it still runs."""
        if self.index.ownership is not ownership:
            self.index.set_phase_locked(state, Phase.IDLE)
        elif self._claims.get(state.name) == state.partition_id:
            self.index.set_phase_locked(state, Phase.HANDOFF)
            self.timer.discard(state.name)
        elif state.paused:
            self.index.set_phase_locked(state, Phase.PAUSED)
            self.timer.discard(state.name)
        elif state.next is None:
            self.index.set_phase_locked(state, Phase.RUNNING)
            self.timer.discard(state.name)
            self.recorder.put(Outcome(state.name, state.token, ownership))
        else:
            self.index.set_phase_locked(state, Phase.ARMED)
            arms.append((state.next.due.timestamp(), state.name, state.token))
        if state.phase is not Phase.RUNNING:
            state.compact()  # waits in its serialized form until its next delivery

    # -- timer thread ----------------------------------------------------------------------------

    def _dispatch(self, entries: list[tuple[str, int]]) -> None:
        now = self._clock()
        deadlines: list[tuple[float, object, object]]
        ready, early, deadlines = [], [], []
        with self.index.lock:
            if self.index.ownership is None:
                return
            for name, token in entries:
                state = self.index.get_locked(name, token)
                if state is None or state.phase is not Phase.ARMED:
                    continue
                due = cast(Pending, state.next).due.timestamp()  # ARMED: it has a next
                if due > now:  # the wall clock stepped back since the timer looked
                    early.append((due, name, token))
                    continue
                ready.append(self._start_run_locked(state, deadlines))
        self.timer.arm_many(early)
        self.timer.arm_deadlines(deadlines)
        self.pool.submit(ready)

    def _soon(self, due: float) -> None:
        """Jobs fall due at ``due`` (timer thread, at most :data:`~etcdcron.timer.LEAD`
        seconds before): a worker runs their read barrier now, so that they need not wait for
        one when their time comes. It began at most ``LEAD`` seconds before ``due``, so within
        :data:`FRESH_FOR` of each trigger it serves, as every barrier must."""
        ownership = self.index.ownership
        if ownership is None:
            return
        since = time.monotonic() + (due - self._clock()) - LEAD
        if not self.informer.barrier.covers(ownership, since):
            self.pool.call(lambda: self._prime(ownership, since))

    def _prime(self, ownership: Ownership, since: float) -> None:
        """Run the barrier of :meth:`_soon` (a worker), unless the session ended meanwhile or
        another barrier covers it by now."""
        barrier = self.informer.barrier
        if self.index.ownership is ownership and not barrier.covers(ownership, since):
            barrier.wait(ownership, since, BARRIER_PATIENCE)

    def _hold(self) -> None:
        """Before a batch of results is recorded (a recorder thread): while triggers that fell
        due still wait for a worker, wait for them to be taken, for at most :data:`HOLD_FOR`
        seconds in all until none waits. A result is recorded at most that much later; the job's
        next tick is armed only once it is."""
        if self.pool.wait_taken(0.0):
            self._holding_since = None
            return
        now = time.monotonic()
        if self._holding_since is None:
            self._holding_since = now
        left = self._holding_since + HOLD_FOR - now
        if left > 0 and self.pool.wait_taken(left):
            self._holding_since = None

    def _start_run_locked(self, state: JobState,
                          deadlines: list[tuple[float, object, object]]) -> tuple[str, int, int]:
        """Hand ``state``'s next delivery to a worker: RUNNING, a new run, and its deadline (to
        be armed by the caller once the lock is released)."""
        self.index.set_phase_locked(state, Phase.RUNNING)
        state.run += 1
        timeout = self._trigger_timeout if state.timeout is None else state.timeout
        if timeout is not None:
            state.deadline = self._clock() + timeout
            deadlines.append((state.deadline, state.name, (state.token, state.run)))
        return state.name, state.token, state.run

    def _expire(self, entries: list[tuple[Any, Any]]) -> None:
        """Triggers that ran past their deadline (timer thread): each counts as FAILED, and a
        result that still comes is ignored."""
        outcomes, items = [], []
        state: JobState | None
        ownership: Ownership | None
        with self.index.lock:
            for key, (token, run) in entries:
                if isinstance(key, tuple):  # ("handed", name): handed over, still running here
                    name = key[1]
                    entry = self._handed.get(name)
                    if entry is None or entry.state.token != token or entry.state.run != run:
                        continue
                    state, ownership = entry.state, entry.ownership
                else:
                    name, ownership = key, self.index.ownership
                    state = self.index.get_locked(name, token)
                    if (state is None or ownership is None or state.phase is not Phase.RUNNING
                            or state.run != run):
                        continue
                self._log.warning("job %r: its trigger did not finish within %gs; counting it "
                                  "as FAILED", name,
                                  self._trigger_timeout if state.timeout is None
                                  else state.timeout)
                if self._metrics.enabled:
                    self._count_expired(state, token, run)
                state.run += 1  # the trigger's own result, if it ever comes, is for no run
                # cast: its deadline was armed with a delivery, which has a next
                outcomes.append(Outcome(name, token, ownership, cast(Pending, state.next).tick,
                                        TriggerResult.FAILED, run=state.run))
                items.append((name, token, run))
        for outcome in outcomes:
            self.recorder.put(outcome)
        for item in items:
            self.pool.expired(item)

    def _count_expired(self, state: JobState, token: int, run: int) -> None:
        """Count a trigger that timed out as FAILED (its deadline was set at its call)."""
        timeout = self._trigger_timeout if state.timeout is None else state.timeout
        called = state.deadline - (timeout or 0.0)
        self._expired_runs.add((state.name, token, run))
        # cast: its deadline was armed with a delivery, which has a next
        self._metrics.trigger_done(TriggerResult.FAILED,
                                   called - cast(Pending, state.next).tick.timestamp(),
                                   timeout or 0.0)

    # -- worker threads --------------------------------------------------------------------------

    def _run(self, name: str, token: int, run: int) -> None:
        try:
            self._trigger_one(name, token, run)
        except BaseException as exc:  # noqa: BLE001 - never leave a job RUNNING for nothing
            self._log.error("job %r: triggering it failed; counting it as FAILED", name,
                            exc_info=exc)
            with self.index.lock:
                state = self.index.get_locked(name, token)
                ownership = self.index.ownership
                if (state is None or state.phase is not Phase.RUNNING or state.next is None
                        or state.run != run):
                    return
                if ownership is None:
                    self._idle_locked(state)
                    return
                tick = state.next.tick
            self.recorder.put(Outcome(name, token, ownership, tick, TriggerResult.FAILED,
                                      run=run))

    def _trigger_one(self, name: str, token: int, run: int) -> None:
        since = time.monotonic() - FRESH_FOR
        with self.index.lock:
            state = self.index.get_locked(name, token)
            if (state is None or state.phase is not Phase.RUNNING or state.next is None
                    or state.run != run):
                return
            ownership, tick = self.index.ownership, state.next.tick
        fresh = None if ownership is None else self._await_fresh(ownership, since)
        if fresh is None:
            self._give_back(name, token, run, tick)
            return
        assert ownership is not None  # fresh is None without one
        with self.index.lock:
            state = self.index.get_locked(name, token)
            if (state is None or state.phase is not Phase.RUNNING or state.next is None
                    or state.run != run):
                return  # deleted or replaced meanwhile: the barrier showed it
            if self.index.ownership is not ownership or not self._lease_valid(
                    ownership.lease_generation):
                self._idle_locked(state)
                return
            if state.paused:  # paused meanwhile (the same version, rewritten)
                self.index.set_phase_locked(state, Phase.PAUSED)
                self._drained.notify_all()
                return
            record, schedule, delivery = state.record, state.schedule, state.next
            job, tick = record.job, delivery.tick
        skip = None if not state.catch_up else catch_up(
            record, schedule, delivery, datetime.fromtimestamp(self._clock(), timezone.utc))
        if skip is not None:  # the job's catch-up policy says: not this one
            self._log.debug("job %r: skipping %d tick(s) up to %s (catch-up policy)", name,
                            skip[1], skip[0].isoformat())
            self.recorder.put(Outcome(name, token, ownership, tick, run=run, skip=skip))
            return
        # A request of its own for every trigger: one that the trigger changes is not handed
        # to the next tick.
        request = api_pb2.TriggerRequest(name=name)
        if job.HasField("metadata"):
            request.metadata.CopyFrom(job.metadata)
        if job.HasField("payload"):
            request.payload.CopyFrom(job.payload)
        # For tests that audit deliveries (tests/chaos): as of when this delivery was known
        # current, in wall-clock seconds.
        _delivery.fresh_as_of = time.time() - (time.monotonic() - fresh)
        timing = None
        if self._metrics.enabled:  # (lateness, monotonic time of the call)
            timing = (self._clock() - tick.timestamp(), time.monotonic())
        raised = False
        try:
            value = self._trigger(request)
        except BaseException as exc:  # noqa: BLE001 - SystemExit or a gevent Timeout too
            self._log.error("trigger for job %r raised; counting it as FAILED", name,
                            exc_info=exc)
            value, raised = TriggerResult.FAILED, True
        if isinstance(value, Future):
            value.add_done_callback(
                lambda future: self._finish(
                    name, token, run, tick, ownership, self._future_value(name, future), timing,
                    logged=future.cancelled() or future.exception() is not None)
            )
        else:
            self._finish(name, token, run, tick, ownership, value, timing, logged=raised)

    def _give_back(self, name: str, token: int, run: int, tick: datetime) -> None:
        """The session ended before this replica could prove its view current: drop the
        delivery without firing (a handed-over one releases its in-flight key)."""
        with self.index.lock:
            state = self.index.get_locked(name, token)
            if state is not None and state.phase is Phase.RUNNING and state.run == run:
                self._idle_locked(state)
                return
            handed = self._handed.get(name)
            if handed is not None and handed.state.token == token and handed.state.run == run:
                self.recorder.put(Outcome(name, token, handed.ownership, tick,
                                          TriggerResult.UNDELIVERABLE, run=run))

    def _await_fresh(self, ownership: Ownership, since: float) -> float | None:
        """Wait for a read barrier begun after ``since`` (see :class:`ReadBarrier`), as long as
        the session lasts and its lease is valid; returns the monotonic time it began."""
        while (began := self.informer.barrier.wait(ownership, since, BARRIER_PATIENCE)) is None:
            if (self._stop.is_set() or self.index.ownership is not ownership
                    or not self._lease_valid(ownership.lease_generation)):
                return None
            self._stop.wait(0.05)
        return began

    def _finish(self, name: str, token: int, run: int, tick: datetime, ownership: Ownership,
                value: object, timing: tuple[float, float] | None = None,
                logged: bool = False) -> None:
        """Hand a trigger's result on (a worker thread, or the thread that resolved its Future).

        :param timing: with metrics on, the trigger's lateness and the monotonic time of its
            call.
        :param logged: whether its failure was logged already (it raised)."""
        try:
            result = to_result(value)
        except Exception as exc:  # noqa: BLE001 - TypeError, or a value that fails to compare
            self._log.error("job %r: %s; counting it as FAILED", name, exc)
            result, logged = TriggerResult.FAILED, True
        if result is TriggerResult.FAILED and not logged:
            self._log.warning("job %r: its trigger returned FAILED", name)
        if timing is not None:
            expired = self._expired_runs
            if not expired or (name, token, run) not in expired:
                self._metrics.trigger_done(result, timing[0], time.monotonic() - timing[1])
            else:
                expired.discard((name, token, run))
        if result is not TriggerResult.UNDELIVERABLE:
            self.recorder.put(Outcome(name, token, ownership, tick, result, run=run))
            return
        deadlines: list[tuple[float, object, object]] = []
        with self.index.lock:
            state = self.index.get_locked(name, token)
            if state is None or state.phase is not Phase.RUNNING or state.run != run:
                handed = self._handed.get(name)
                if handed is not None and handed.state.token == token:
                    # Handed over: nothing to stage here; let its next owner deliver it.
                    self.recorder.put(Outcome(name, token, ownership, tick, result, run=run))
                return
            if self.staging.park(name, token):
                self.index.set_phase_locked(state, Phase.STAGED)
                self._drained.notify_all()
                return
            item = self._start_run_locked(state, deadlines)  # deliverable already: again
        self.timer.arm_deadlines(deadlines)
        self.pool.submit([item])

    # -- deliverable prefixes (user's thread) ----------------------------------------------------

    def release(self, entries: list[tuple[str, int]]) -> None:
        deadlines: list[tuple[float, object, object]]
        ready, deadlines = [], []
        with self.index.lock:
            for name, token in entries:
                state = self.index.get_locked(name, token)
                if state is not None and state.phase is Phase.STAGED:
                    ready.append(self._start_run_locked(state, deadlines))
        self.timer.arm_deadlines(deadlines)
        self.pool.submit(ready)

    # -- recorder thread -------------------------------------------------------------------------

    def _commit(self, batch: list[Outcome]) -> None:
        groups: dict[Ownership, list[Outcome]] = {}
        handed = []
        with self.index.lock:
            for outcome in batch:
                entry = self._handed.get(outcome.name)
                if entry is not None and entry.state.token == outcome.token:
                    if outcome.run in (None, entry.state.run):
                        handed.append((outcome, entry))
                    continue  # otherwise: a late result of a handed trigger that timed out
                groups.setdefault(outcome.ownership, []).append(outcome)
        for outcome, entry in handed:
            self._record_handed(outcome, entry)
        for ownership, outcomes in groups.items():
            plans = self._plan(outcomes)
            if not plans:
                continue
            try:
                self._write(ownership, plans)
            except Exception as exc:  # noqa: BLE001 - never strand a batch of jobs RUNNING
                self._log.error("recording %d results failed", len(plans), exc_info=exc)
                self._refuse(plans, exc)

    @staticmethod
    def _in_flight(state: JobState | None, outcome: Outcome) -> TypeGuard[JobState]:
        """Whether ``outcome`` is still to be recorded for ``state``."""
        if state is None or (outcome.run is not None and outcome.run != state.run):
            return False
        return state.phase is (Phase.HANDOFF if outcome.refresh else Phase.RUNNING)

    def _plan(self, outcomes: list[Outcome]) -> list[_Plan]:
        with self.index.lock:
            # What the informer may change (a pause rewrites the record) is taken under the
            # lock; a state's counter and counter revision change only on this thread.
            running = [(outcome, state, (state.record, state.mod_revision, state.schedule))
                       for outcome in outcomes
                       if self._in_flight(state := self.index.get_locked(outcome.name,
                                                                         outcome.token), outcome)]
        # The schedule math runs without the lock; _apply checks the token again.
        plans = []
        for outcome, state, version in running:
            try:
                plans.append(self._plan_one(outcome, state, *version))
            except Exception as exc:  # noqa: BLE001 - one job's outcome must not touch another's
                self._log.error("job %r: its next tick cannot be computed (%s); it stops here on "
                                "this replica until it is changed", state.name, exc,
                                exc_info=exc)
                with self.index.lock:
                    if self.index.get_locked(state.name, state.token) is state:
                        self._idle_locked(state)
                        self._unschedulable[state.name] = (state.mod_revision, str(exc))
        return plans

    def _plan_one(self, outcome: Outcome, state: JobState, record: stored_pb2.Job,
                  mod_revision: int, schedule: Schedule | None) -> _Plan:
        # No failure branch: a compare fails rarely (another writer, a new version), and then
        # the recorder reads what etcd holds for those jobs in one more round trip.
        job_key, counter_key = self._keys.job(state.name), self._keys.counter(state.name)
        counter = state.counter
        if outcome.refresh:  # nothing to write: a failed compare reads what etcd holds
            return _Plan(outcome, counter, state.next, guarded_check(
                job_key, mod_revision, counter_key, state.counter_revision), mod_revision)
        if outcome.skip is not None:
            counter = after_skip(record, counter, *outcome.skip)
            nxt = pending(record, counter, schedule)
        elif outcome.result is None:
            nxt = None
        else:
            # an outcome with a result has the tick it is for
            counter = after_result(record, counter, cast(datetime, outcome.tick), outcome.result,
                                   schedule)
            nxt = pending(record, counter, schedule)
        value = None if nxt is None else counter.SerializeToString()
        return _Plan(outcome, counter, nxt, guarded_write(
            job_key, mod_revision, counter_key, state.counter_revision, value), mod_revision,
            value)

    def _record_handed(self, outcome: Outcome, entry: _Handed) -> None:
        """Record the result of a handed-over trigger under its NS/inflight/ key, and release
        the key; a key that is gone (this replica's lease ran out) means the job moved on."""
        state, ownership = entry.state, entry.ownership
        if not entry.claimed:  # its key is being written: try again in a moment
            self.recorder.retry_later(outcome, 0.05)
            return
        claim_key = self._keys.in_flight(state.name)
        ops = []
        if outcome.result is not TriggerResult.UNDELIVERABLE:
            try:
                ops.append(rpc.RequestOp.FromString(self._plan_one(
                    outcome, state, state.record, state.mod_revision, state.schedule).op))
            except Exception as exc:  # noqa: BLE001 - release the key, change nothing else
                self._log.error("job %r: its next tick cannot be computed (%s)", state.name, exc)
        try:
            response = self._client.txn([_cmp_lease(claim_key, ownership.lease_id)],
                                        [*ops, op_delete(claim_key)], [], stop=self._stop)
        except Stopped:
            return
        except EtcdError as exc:
            self._log.warning("job %r: recording its handed-over result: %s; retrying",
                              state.name, exc)
            self.recorder.retry_later(outcome, entry.backoff.next_delay())
            return
        if not response.succeeded:
            self._metrics.unrecorded()
            self._log.warning("job %r: its in-flight key is gone (this replica's lease ran out); "
                              "its result is dropped and its next owner fires it again",
                              state.name)
        with self.index.lock:
            if self._handed.get(state.name) is entry:
                del self._handed[state.name]
                self._drained.notify_all()

    def _write(self, ownership: Ownership, plans: list[_Plan]) -> None:
        """Commit ``plans`` in one transaction fenced by ``ownership``; split it if etcd finds it
        too big; retry later what etcd refuses; give up only once the session is over."""
        fence = [compare_mod(ownership.fence_key, ownership.fence_revision)]
        while True:
            try:
                response = self._client.txn_encoded(fence, [plan.op for plan in plans],
                                                    stop=self._stop)
                break
            except EtcdUnavailableError as exc:
                if self.index.ownership is ownership and not self._stop.is_set():
                    self._log.warning("recording %d results: %s; retrying", len(plans), exc)
                    continue
                self._abandon(plans, f"etcd unavailable ({exc}) after the session ended")
                return
            except EtcdError as exc:
                # Too large: past etcd's limit (INVALID_ARGUMENT), or past its gRPC one, 512 KiB
                # higher (RESOURCE_EXHAUSTED). One job's own transaction always fits.
                if exc.code in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED) and len(plans) > 1:
                    half = len(plans) // 2
                    self._write(ownership, plans[:half])
                    self._write(ownership, plans[half:])
                    return
                self._refuse(plans, exc)
                return
            except Stopped:
                self._abandon(plans, "stopping")
                return
        if not response.succeeded:
            self._abandon(plans, "this replica's leadership changed (fence failed)")
            self._fence_failed(ownership)
            return
        failed = [plan for plan, reply in zip(plans, response.responses)
                  if not reply.response_txn.succeeded]
        self._apply(ownership, plans, response, self._read_back(failed) if failed else {})

    def _read_back(self, plans: list[_Plan]) -> dict[str, tuple[Any, Any] | None]:
        """What etcd holds for the jobs whose compare failed: name -> (job kvs, counter kvs),
        or ``None`` if it could not be read (the outcome is then tried again)."""
        held: dict[str, tuple[Any, Any] | None] = {}
        for start in range(0, len(plans), _READS_PER_TXN):
            names = [plan.outcome.name for plan in plans[start:start + _READS_PER_TXN]]
            ops = [op for name in names
                   for op in (op_range(self._keys.job(name)), op_range(self._keys.counter(name)))]
            try:
                response = self._client.txn([], ops, [], stop=self._stop)
            except (EtcdError, Stopped) as exc:
                self._log.warning("reading back %d jobs whose result did not apply: %s",
                                  len(names), exc)
                held.update((name, None) for name in names)
                continue
            replies = response.responses
            for i, name in enumerate(names):
                held[name] = (replies[2 * i].response_range.kvs,
                              replies[2 * i + 1].response_range.kvs)
        return held

    def _refuse(self, plans: list[_Plan], exc: Exception) -> None:
        """etcd refused these results (NOSPACE, a request too large, a permission): keep the
        jobs in flight and write them again after a capped backoff."""
        why = str(exc) or type(exc).__name__
        with self.index.lock:
            for plan in plans:
                name, token = plan.outcome.name, plan.outcome.token
                state = self.index.get_locked(name, token)
                if not self._in_flight(state, plan.outcome):
                    continue
                previous = self._refused.get(name)
                backoff = (previous[1] if previous and previous[0] == token
                           else Backoff(base=0.1, cap=REFUSED_RETRY_CAP))
                if previous is None or previous[0] != token:
                    self._metrics.unrecorded()
                    self._log.error("job %r: etcd refused to record its result (%s); retrying "
                                    "until it succeeds, the job changes or the session ends",
                                    name, why)
                self._refused[name] = (token, backoff, why)
                self.recorder.retry_later(plan.outcome, backoff.next_delay())
            self._drained.notify_all()

    def _abandon(self, plans: list[_Plan], why: str) -> None:
        self._log.warning("not recording %d trigger results: %s", len(plans), why)
        self._metrics.unrecorded(len(plans))
        with self.index.lock:
            for plan in plans:
                state = self.index.get_locked(plan.outcome.name, plan.outcome.token)
                if self._in_flight(state, plan.outcome):
                    self._idle_locked(state)

    def _apply(self, ownership: Ownership, plans: list[_Plan], response: Any,
               held: dict[str, tuple[Any, Any] | None]) -> None:
        arms: list[tuple[float, str, int]] = []
        with self.index.lock:
            for plan, reply in zip(plans, response.responses):
                name, token = plan.outcome.name, plan.outcome.token
                state = self.index.get_locked(name, token)
                if state is None:
                    continue
                if self._refused.get(name, (None,))[0] == token:
                    del self._refused[name]
                    self._log.info("job %r: its result was recorded after all", name)
                inner = reply.response_txn
                if not inner.succeeded and held.get(name) is None:
                    self.recorder.put(plan.outcome)  # not known what etcd holds: try again
                    continue
                if plan.outcome.refresh:
                    # held[name] is not None for a failed compare (checked above)
                    if not inner.succeeded and self._adopt_locked(
                            state, *cast("tuple[Any, Any]", held[name])) is None:
                        self._idle_locked(state)
                        continue
                    self._arm_locked(state, ownership, arms)
                    continue
                if inner.succeeded and plan.next is None:
                    self._forget_locked(name, token)
                    self.index.mark_deleted_locked(name, response.header.revision)
                    continue
                if inner.succeeded:
                    state.counter_raw = cast(bytes, plan.counter_raw)  # set when it has a next
                    state.counter_revision = response.header.revision
                    state.next = plan.next
                    if plan.mod_revision != state.mod_revision:  # rewritten in place meanwhile
                        state.next = pending(state.record, state.counter, state.schedule)
                elif plan.mod_revision != state.mod_revision:
                    # The job was rewritten in place (paused, resumed) as this was written:
                    # the result still stands; write it again against the new revision.
                    self.recorder.put(plan.outcome)
                    continue
                else:
                    # held[name] is not None for a failed compare (checked above)
                    adopted = self._adopt_locked(state, *cast("tuple[Any, Any]", held[name]))
                    if adopted is None:
                        self._idle_locked(state)
                        continue
                    if not adopted:
                        self.recorder.put(plan.outcome)  # write the same result again
                        continue
                self._arm_locked(state, ownership, arms)
            self._drained.notify_all()
        self.timer.arm_many(arms)

    def _fence_failed(self, ownership: Ownership) -> None:
        if self.on_fence_failed is not None:
            self.on_fence_failed(ownership)

    def _adopt_locked(self, state: JobState, job_kvs: Sequence[Any],
                      counter_kvs: Sequence[Any]) -> bool | None:
        """After a failed compare, see what etcd holds.

        :returns: ``None`` when the job itself changed (the informer brings the new version);
            ``True`` when another writer moved this version's counter (take it over, and
            trigger from there); ``False`` when the counter there is absent or left by another
            version: this result still stands and is to be written again over it.
        """
        if not job_kvs or job_kvs[0].mod_revision != state.mod_revision:
            return None
        stored = None
        state.counter_revision = counter_kvs[0].mod_revision if counter_kvs else 0
        if counter_kvs:
            stored = decode_counter(counter_kvs[0].value, state.name, self._log)
        if stored is None or stored.job_partition_id != state.partition_id:
            return False
        self._log.info("counter of job %r was changed by another writer; continuing from it",
                       state.name)
        state.counter = stored
        state.next = pending(state.record, state.counter, state.schedule)
        return True

    def _future_value(self, name: str, future: Future[Any]) -> object:
        if future.cancelled():
            self._log.error("trigger future of job %r was cancelled; counting it as FAILED", name)
            return TriggerResult.FAILED
        exc = future.exception()
        if exc is not None:
            self._log.error("trigger future of job %r failed; counting it as FAILED", name,
                            exc_info=exc)
            return TriggerResult.FAILED
        return future.result()
