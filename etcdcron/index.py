"""The in-memory table of the jobs this replica owns, and what an election grants it.

The informer thread fills the table, the timer and worker threads move jobs between phases, the
recorder thread updates their counters. Every access holds :attr:`JobIndex.lock` (methods named
``*_locked`` expect the caller to hold it), except that the recorder thread, the only writer of a
state's counter, reads a state it found RUNNING without it. Nothing here talks to etcd or calls
user code.

Job phases (State Transitions)::

    (informer put) --> ARMED --(timer: due)--> RUNNING --(recorder: next tick)--> ARMED
                                                  |  \\--(recorder: no next tick)--> removed
                                                  |   \\--(recorder: conflict)--> IDLE
                                                  \\--(UNDELIVERABLE)--> STAGED --(prefix)--> RUNNING
    (informer put, NS/inflight/NAME held by another replica) --> HANDOFF
        --(that key deleted: recorder re-reads the counter)--> RUNNING --> ARMED
    (informer put of the same version, paused) --> PAUSED --(resumed)--> ARMED
    (informer delete) --> removed;  (informer put of a new version) --> replaced (new token)

A job's ``token`` is unique per loaded version (and per session): a heap entry, a queued trigger
or a result that carries another token is stale and is dropped.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.schedule import Schedule, parse_duration, parse_schedule
from etcdcron.ticks import Pending, pending

__all__ = ["Phase", "IN_FLIGHT", "JobState", "JobIndex", "Ownership", "counter_of",
           "decode_counter"]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    ARMED = "armed"  #: waiting in the timer heap until ``next.due``
    RUNNING = "running"  #: handed to a worker; its result is not recorded yet
    STAGED = "staged"  #: undeliverable; parked until a deliverable prefix matches it
    IDLE = "idle"  #: waiting for the informer to replace or remove it
    #: another replica's trigger of this version is still running (``NS/inflight/NAME``)
    HANDOFF = "handoff"
    PAUSED = "paused"  #: paused (``Cron.pause``): fires nothing until resumed


#: Phases whose delivery is under way: its result (or its handoff) moves the job on.
IN_FLIGHT = frozenset({Phase.RUNNING, Phase.HANDOFF})


def _schedule_of(record: stored_pb2.Job) -> Schedule | None:
    return parse_schedule(record.job.schedule) if record.job.HasField("schedule") else None


@dataclass(frozen=True)
class Ownership:
    """What an election granted: the partitions this replica triggers, and its fence.

    :ivar total: the partition total.
    :ivar indices: the partition indices owned (``partition_id % total in indices``).
    :ivar fence_key: this replica's leadership key.
    :ivar fence_revision: the key's mod revision for this session; every counter write
        compares it, so nothing is written once the session is over.
    :ivar lease_generation: the lease this session was elected under; it triggers only while
        that very lease is valid.
    :ivar epoch: increments with every session of this replica.
    :ivar lease_id: the etcd lease of the session (triggers still running when it ends are
        handed over under it).
    :ivar replicas: every replica's ``replica_data`` (an ``Any`` or ``None``), in key order.
    """

    total: int
    indices: frozenset[int]
    fence_key: bytes
    fence_revision: int
    lease_generation: int = 0
    epoch: int = 0
    replicas: tuple[any_pb2.Any | None, ...] = field(default=(), compare=False)
    lease_id: int = 0

    def owns(self, partition_id: int) -> bool:
        return partition_id % self.total in self.indices


def decode_counter(value: bytes, name: str,
                   logger: logging.Logger = log) -> stored_pb2.Counter | None:
    counter = stored_pb2.Counter()
    try:
        counter.ParseFromString(value)
    except DecodeError:
        logger.warning("counter of job %r cannot be decoded; the job starts from its first tick", name)
        return None
    return counter


_COUNTER_TIMES = ("last_trigger", "last_skipped")
#: The seconds of 0001-01-01T00:00:00Z and of 9999-12-31T23:59:59Z: what a datetime holds.
_FIRST_SECOND, _LAST_SECOND = -62_135_596_800, 253_402_300_799


def check_times(record: stored_pb2.Job, counter: stored_pb2.Counter | None) -> None:
    """Raise ``ValueError`` if a time ``record`` or ``counter`` (if any) carries is out of
    range. Field by field: a listing of a million jobs checks each of them."""
    begin = record.WhichOneof("begin")
    if begin is not None:
        _check_time(begin, getattr(record, begin))
    if record.HasField("expiration"):
        _check_time("expiration", record.expiration)
    if record.HasField("resumed"):
        _check_time("resumed", record.resumed)
    if counter is not None:
        for name in _COUNTER_TIMES:
            if counter.HasField(name):
                _check_time(name, getattr(counter, name))


def _check_time(name: str, ts: Timestamp) -> None:
    if not _FIRST_SECOND <= ts.seconds <= _LAST_SECOND:
        raise ValueError(f"its {name} is out of range")


def counter_of(record: stored_pb2.Job, counter: stored_pb2.Counter | None) -> stored_pb2.Counter:
    """``counter`` if it belongs to this version of the job (same partition id), else a fresh
    one: a counter left by an older version of the name does not count."""
    if counter is None or counter.job_partition_id != record.partition_id:
        return stored_pb2.Counter(job_partition_id=record.partition_id)
    return counter


#: A counter nothing has happened to, for the tick math of a job never triggered (its
#: job_partition_id is left unset: only what happened counts there). Never changed.
_UNTOUCHED = stored_pb2.Counter()


class JobState:
    """One owned job version and where it is in its life.

    A replica may hold a million of these, so the record and the counter are kept as their
    serialized bytes (a decoded protobuf message takes a kilobyte): :attr:`record` decodes
    on first use and keeps the message until :meth:`compact` (called once the job is armed
    again), :attr:`counter` decodes on each use.
    """

    __slots__ = ("name", "raw", "partition_id", "paused", "catch_up", "timeout",
                 "mod_revision", "schedule", "counter_raw",
                 "counter_revision", "token", "phase", "next", "run", "deadline", "_record")

    def __init__(self, name: str, record: stored_pb2.Job, mod_revision: int,
                 schedule: Schedule | None, counter: stored_pb2.Counter | None,
                 counter_revision: int,
                 token: int, phase: Phase = Phase.IDLE, next: Pending | None = None,
                 raw: bytes | None = None):
        self.name = name
        self._record: stored_pb2.Job | None = None
        self.set_record(record, raw)
        self._record = None
        self.mod_revision = mod_revision  #: of NS/jobs/NAME, compared by every counter write
        self.schedule = schedule
        if counter is None:  # fresh
            self.counter_raw = b""
        else:
            self.counter = counter
        #: of NS/counters/NAME (0: absent), compared by every counter write
        self.counter_revision = counter_revision
        self.token = token
        self.phase = phase
        self.next = next
        self.run = 0  #: increments with every delivery; a result of an earlier one is stale
        #: wall time by which the current delivery must have a result (0: none)
        self.deadline = 0.0

    @property
    def record(self) -> stored_pb2.Job:
        """The stored job (decoded on first use; do not change it)."""
        record = self._record
        if record is None:
            record = self._record = decode_record(self.raw)
        return record

    def set_record(self, record: stored_pb2.Job, raw: bytes | None = None) -> None:
        """Take ``record`` (and what the hot paths read of it, so they need not decode it)."""
        self.raw = record.SerializeToString() if raw is None else raw
        self.partition_id = record.partition_id
        self.paused = record.paused
        job = record.job
        #: whether a catch-up policy may skip deliveries (catch_up_window or coalesce)
        self.catch_up = job.coalesce or job.HasField("catch_up_window")
        #: the job's own trigger_timeout in seconds, or None
        self.timeout = _timeout_of(job) if job.HasField("trigger_timeout") else None
        self._record = record

    @property
    def counter(self) -> stored_pb2.Counter:
        """This version's counter (a new message each time: changing it changes nothing)."""
        counter = stored_pb2.Counter()
        if self.counter_raw:
            counter.ParseFromString(self.counter_raw)
        else:
            counter.job_partition_id = self.partition_id
        return counter

    @counter.setter
    def counter(self, counter: stored_pb2.Counter) -> None:
        self.counter_raw = counter.SerializeToString()

    def compact(self) -> None:
        """Drop the decoded record: the state goes on waiting in a few hundred bytes."""
        self._record = None


def _timeout_of(job: api_pb2.Job) -> float | None:
    try:
        return parse_duration(job.trigger_timeout).total_seconds()
    except ValueError:
        return None  # validation refuses it; a foreign record's is ignored


def decode_record(raw: bytes) -> stored_pb2.Job:
    record = stored_pb2.Job()
    record.ParseFromString(raw)
    return record


class JobIndex:
    """The owned jobs of the current session, by name."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or log
        # Guards _jobs and every JobState in it, and _ownership.
        self.lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        # Jobs this replica deleted itself (finished one-shots), by the revision of the delete,
        # until the informer has caught up with it: a listing taken before that revision must
        # not load them again.
        self._deleted: dict[str, int] = {}
        self._ownership: Ownership | None = None
        self._tokens = itertools.count(1)
        #: How many jobs are RUNNING: triggered, their result not recorded yet.
        self.running = 0

    # -- session ---------------------------------------------------------------------------------

    @property
    def ownership(self) -> Ownership | None:
        return self._ownership

    def set_ownership_locked(self, ownership: Ownership | None) -> None:
        self._ownership = ownership

    def clear_locked(self) -> None:
        self._jobs.clear()
        self._deleted.clear()
        self.running = 0

    def set_phase_locked(self, state: JobState, phase: Phase) -> None:
        self.running += (phase is Phase.RUNNING) - (state.phase is Phase.RUNNING)
        state.phase = phase

    # -- lookups ---------------------------------------------------------------------------------

    def get_locked(self, name: str, token: int | None = None) -> JobState | None:
        """The state of ``name``; with ``token``, only if it is still that version."""
        state = self._jobs.get(name)
        if state is None or (token is not None and state.token != token):
            return None
        return state

    def __len__(self) -> int:
        return len(self._jobs)

    def names_locked(self) -> list[str]:
        return list(self._jobs)

    def running_locked(self) -> list[JobState]:
        """The states whose trigger (or result) is in flight."""
        return [state for state in self._jobs.values() if state.phase is Phase.RUNNING]

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._jobs)

    # -- changes from the informer ---------------------------------------------------------------

    def put_locked(self, name: str, record: stored_pb2.Job, mod_revision: int,
                   counter: stored_pb2.Counter | None, counter_revision: int,
                   raw: bytes | None = None) -> JobState | None:
        """Load a version of ``name`` (replacing any other) and return it, or ``None`` when that
        revision is already loaded. ``state.next`` is ``None`` for a job that has nothing left
        to do (the caller deletes it).

        A new revision of the loaded version (same partition id: a pause or a resume) updates
        that state in place and returns it; if it is in flight (:data:`IN_FLIGHT`), its
        ``next`` is left for the result to compute. ``counter`` is used only for a new version,
        and only if it belongs to it.

        :raises Exception: if this version cannot be scheduled (a schedule that does not parse,
            a time out of range, ...); the index is then unchanged.
        """
        old = self._jobs.get(name)
        if old is not None and old.mod_revision == mod_revision:
            return None
        if mod_revision <= self._deleted.get(name, 0):
            return None  # a stale listing: this version is already deleted
        if old is not None and old.partition_id == record.partition_id:
            # The same version rewritten (paused, resumed): updated in place, token and all,
            # so that a delivery in flight is still recorded, against the new revision.
            check_times(record, old.counter)
            schedule = _schedule_of(record)
            nxt = pending(record, old.counter, schedule)
            old.set_record(record, raw)
            old.mod_revision, old.schedule = mod_revision, schedule
            if old.phase not in IN_FLIGHT:
                old.next = nxt
            return old
        if counter is not None and counter.job_partition_id != record.partition_id:
            counter = None  # left by another version: it does not count
        untouched = _UNTOUCHED if counter is None else counter
        check_times(record, counter)
        schedule = _schedule_of(record)
        nxt = pending(record, untouched, schedule)
        if old is not None:
            self.set_phase_locked(old, Phase.IDLE)
        state = JobState(name=name, record=record, mod_revision=mod_revision, schedule=schedule,
                         counter=counter, counter_revision=counter_revision,
                         token=next(self._tokens), next=nxt, raw=raw)
        self._jobs[name] = state
        return state

    def remove_locked(self, name: str, token: int | None = None) -> JobState | None:
        state = self.get_locked(name, token)
        if state is not None:
            self.set_phase_locked(state, Phase.IDLE)
            del self._jobs[name]
        return state

    def mark_deleted_locked(self, name: str, revision: int) -> None:
        """Remember that this replica deleted ``name`` at ``revision``."""
        self._deleted[name] = revision

    def caught_up_locked(self, revision: int) -> None:
        """The informer has seen everything up to ``revision``: forget the deletions it now
        knows about."""
        if self._deleted:
            self._deleted = {n: rev for n, rev in self._deleted.items() if rev > revision}
