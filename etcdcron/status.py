"""Job status and cluster membership, read from etcd: what ``Cron.status()``, ``statuses()`` and
the ``etcdcron status`` command show.

Runs on the caller's thread and needs no running scheduler. Everything is computed from the
stored job and counter with the engine's own functions (:func:`~etcdcron.store.decode_job`,
:func:`~etcdcron.index.counter_of`, :func:`~etcdcron.ticks.pending`), so a status can never
disagree with what the owner of the job will do. Each answer is read at one etcd revision.

Who owns a job follows from the leadership keys (DESIGN.md section 5): when every key agrees on
one total N (and, with dynamic membership, there are N keys), the owner of a job is the replica
whose index among the sorted keys is ``partition_id % N``; in static mode the keys are the
partition numbers themselves. While the replicas disagree (a rebalance) the owner is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import grpc
from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from etcdcron._etcd import EtcdClient, op_range
from etcdcron._pb import stored_pb2
from etcdcron.errors import EtcdCronError, EtcdError
from etcdcron.index import counter_of, decode_counter
from etcdcron.keys import Keys, prefix_end
from etcdcron.schedule import parse_schedule
from etcdcron.store import decode_job
from etcdcron.ticks import pending, to_datetime
from etcdcron.validation import validate_name, validate_prefix

if TYPE_CHECKING:
    from etcdcron.election import Elector
    from etcdcron.index import Ownership
    from etcdcron.staging import Staging

__all__ = ["JobStatus", "ReplicaStatus", "Membership", "LocalView", "job_status", "job_statuses",
           "membership", "count_jobs"]

log = logging.getLogger(__name__)

#: Jobs read per etcd request by :func:`job_statuses`.
PAGE_SIZE = 500


@dataclass(frozen=True, slots=True)
class JobStatus:
    """Where a job stands, as stored in etcd.

    :ivar name: the job name.
    :ivar count: ticks done so far (a tick that failed past its retries counts too).
    :ivar attempts: failed deliveries of the current tick.
    :ivar last_trigger: the scheduled time of the last tick done (not the wall-clock time it
        ran), an aware UTC ``datetime``, or ``None`` if none is done yet.
    :ivar next_trigger: the scheduled time of the next tick (the one being retried, after a
        failure), or ``None`` when the job is finished (it is then about to be deleted).
    :ivar next_attempt: when that tick is delivered: ``next_trigger``, or later for a retry.
    :ivar expiration: when a job with a ``ttl`` expires, or ``None``.
    :ivar partition_id: the random partition id of this version of the job.
    :ivar owner: the replica id that owns the job, or ``None`` while the replicas do not agree
        on a partition total (a rebalance), or when no replica is running.
    :ivar staged: whether the job is parked as undeliverable. Only the replica owning a job knows
        this: ``True``/``False`` when asked on that replica while it is elected, ``None``
        anywhere else (another replica, a Cron that is not started, the CLI).
    :ivar paused: whether the job is paused (:meth:`Cron.pause`).
    :ivar skipped: ticks skipped by the job's ``catch_up_window`` or ``coalesce`` (not
        triggers: they do not count toward ``repeats``).
    :ivar last_skipped: the scheduled time of the last tick skipped, or ``None``.
    """

    name: str
    count: int
    attempts: int
    last_trigger: datetime | None
    next_trigger: datetime | None
    next_attempt: datetime | None
    expiration: datetime | None
    partition_id: int
    owner: str | None
    staged: bool | None
    paused: bool = False
    skipped: int = 0
    last_skipped: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One leadership key.

    :ivar replica_id: the key's id (the partition number in static mode).
    :ivar index: the partition index it owns once the replicas agree, else ``None``.
    :ivar total: the partition total written in its key (``None``: the key cannot be decoded).
    :ivar replica_data: its published ``replica_data`` (an ``Any``) or ``None``.
    :ivar lease: the id of the lease that holds the key.
    """

    replica_id: str
    index: int | None
    total: int | None
    replica_data: any_pb2.Any | None
    lease: int


@dataclass(frozen=True, slots=True)
class Membership:
    """Every leadership key of a namespace, in key order, and the total they agree on.

    :ivar total: the partition total every replica agrees on, or ``None`` (a rebalance, or no
        replica).
    :ivar static: whether the keys look like static mode (every id is a partition number).
    """

    replicas: tuple[ReplicaStatus, ...]
    total: int | None
    static: bool

    def owner(self, partition_id: int) -> str | None:
        """The replica id owning ``partition_id``, or ``None`` when that is not known."""
        if self.total is None:
            return None
        index = partition_id % self.total
        for replica in self.replicas:
            if replica.index == index:
                return replica.replica_id
        return None


@dataclass(frozen=True, slots=True)
class LocalView:
    """What the asking replica itself knows: the partitions it triggers and what it staged.

    :ivar ownership: an object with ``owns(partition_id)`` while this replica is elected.
    :ivar staged: the names this replica has parked as undeliverable.
    """

    ownership: Ownership | None = None
    staged: frozenset[str] = frozenset()

    @classmethod
    def of(cls, elector: Elector | None, staging: Staging) -> LocalView:
        """The view of a Cron's elector (``None`` if never started) and staging area."""
        if elector is None or not elector.is_elected():
            return cls()
        ownership = elector.ownership
        return cls(ownership, frozenset(staging.parked())) if ownership else cls()

    def staged_flag(self, record: stored_pb2.Job, name: str) -> bool | None:
        if self.ownership is None or not self.ownership.owns(record.partition_id):
            return None
        return name in self.staged


def _membership(kvs: Iterable[Any], keys: Keys) -> Membership:
    members: list[tuple[str, stored_pb2.Leadership | None, int]] = []
    for kv in kvs:
        try:
            found = keys.replica_id(kv.key)
        except UnicodeDecodeError:
            found = kv.key[len(keys.leadership):].decode(errors="replace")
        if found is None:
            continue  # a nested namespace's key, as the leadership watch skips it
        replica_id = found
        record: stored_pb2.Leadership | None
        record = stored_pb2.Leadership()
        try:
            record.ParseFromString(kv.value)
        except DecodeError:
            record = None
        members.append((replica_id, record, kv.lease))
    totals = {record.total if record is not None else None for _, record, _ in members}
    total = totals.pop() if len(totals) == 1 else None
    if not total:
        total = None
    ids = [replica_id for replica_id, _, _ in members]
    static = bool(ids) and total is not None and all(
        i.isdigit() and str(int(i)) == i and int(i) < total for i in ids)
    if total is not None and not static and len(ids) != total:
        total = None  # dynamic membership: every replica counts every key
    replicas = []
    for position, (replica_id, record, lease) in enumerate(members):
        index = None
        if total is not None:
            index = int(replica_id) if static else position
        data = None
        if record is not None and record.HasField("replica_data"):
            data = record.replica_data
        total_seen = record.total if record is not None else None
        replicas.append(ReplicaStatus(replica_id, index, total_seen, data, lease))
    return Membership(tuple(replicas), total, static)


def membership(client: EtcdClient, keys: Keys, revision: int = 0) -> Membership:
    """Every leadership key of the namespace (at ``revision``, default now)."""
    _, kvs = client.list_prefix(keys.leadership, revision=revision)
    return _membership(kvs, keys)


def lease_ttl(client: EtcdClient, lease: int) -> int | None:
    """Seconds left on ``lease`` (``None``: it is gone)."""
    response = client.call(client._lease.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=lease),
                           "lease time-to-live")
    return response.TTL if response.TTL >= 0 else None


def count_jobs(client: EtcdClient, keys: Keys, prefix: str = "") -> int:
    """How many job keys start with ``prefix`` (records that do not decode included)."""
    key = keys.job(validate_prefix(prefix))
    return cast(int, client.range(key, prefix_end(key), count_only=True).count)


def _status(name: str, kv: Any, counter_kv: Any, members: Membership,
            local: LocalView) -> JobStatus:
    """The status of one job. :raises DecodeError, ValueError, OverflowError: if its record
    cannot be read (does not decode, a schedule or a time that does not parse)."""
    record = decode_job(kv.value)
    stored = decode_counter(counter_kv.value, name) if counter_kv is not None else None
    counter = counter_of(record, stored)
    schedule = parse_schedule(record.job.schedule) if record.job.HasField("schedule") else None
    nxt = pending(record, counter, schedule)
    return JobStatus(
        name=name,
        count=counter.count,
        attempts=counter.attempts,
        last_trigger=_time(counter, "last_trigger"),
        next_trigger=nxt.tick if nxt else None,
        next_attempt=nxt.due if nxt else None,
        expiration=_time(record, "expiration"),
        partition_id=record.partition_id,
        owner=members.owner(record.partition_id),
        staged=local.staged_flag(record, name),
        paused=record.paused,
        skipped=counter.skipped,
        last_skipped=_time(counter, "last_skipped"),
    )


def _time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as a datetime; ``None`` if unset, or out of ``datetime``'s range (a
    foreign record's)."""
    if not message.HasField(field):
        return None
    try:
        return to_datetime(getattr(message, field))
    except OverflowError:
        return None


def job_status(client: EtcdClient, keys: Keys, name: str,
               local: LocalView = LocalView()) -> JobStatus | None:
    """The status of ``name``, or ``None`` if there is no such job.

    :raises EtcdCronError: if its record cannot be read.
    """
    validate_name(name)
    leadership = keys.leadership
    response = client.txn([], [op_range(keys.job(name)), op_range(keys.counter(name)),
                               op_range(leadership, prefix_end(leadership))])
    jobs, counters, leaders = (r.response_range.kvs for r in response.responses)
    if not jobs:
        return None
    try:
        return _status(name, jobs[0], counters[0] if counters else None,
                       _membership(leaders, keys), local)
    except (DecodeError, ValueError, OverflowError) as exc:
        raise EtcdCronError(f"job {name!r} is stored in a form etcdcron cannot read: "
                            f"{exc}") from exc


def job_statuses(client: EtcdClient, keys: Keys, prefix: str = "", local: LocalView = LocalView(),
                 page_size: int = PAGE_SIZE,
                 logger: logging.Logger | None = None) -> Iterator[JobStatus]:
    """The status of every job whose name starts with ``prefix``, in name order, read page by
    page at one revision (so memory stays bounded by ``page_size``).

    A job whose record cannot be read is logged and left out, as :meth:`Cron.list` does.

    :raises EtcdError: if etcd fails, or compacts the revision of the first page before the
        last one is read (for very long iterations).
    """
    validate_prefix(prefix)
    return _iter_statuses(client, keys, prefix, local, page_size, logger or log)


def _iter_statuses(client: EtcdClient, keys: Keys, prefix: str, local: LocalView,
                   page_size: int, logger: logging.Logger) -> Iterator[JobStatus]:
    members = None
    for revision, kvs in client.iter_prefix(keys.job(prefix), page_size=page_size):
        if members is None:
            members = membership(client, keys, revision)
        if not kvs:
            return
        counters = _counters(client, keys, kvs[0].key, kvs[-1].key, revision, page_size)
        for kv in kvs:
            try:
                found = keys.job_name(kv.key)
            except UnicodeDecodeError:
                logger.warning("skipping job key %r: it is not UTF-8", kv.key)
                continue
            if found is None:
                continue  # a nested namespace's key, as Store.list skips it
            name = found
            try:
                yield _status(name, kv, counters.get(name), members, local)
            except (DecodeError, ValueError, OverflowError) as exc:
                logger.warning("skipping job %r: its record cannot be read (%s)", name, exc)


def _counters(client: EtcdClient, keys: Keys, first: bytes, last: bytes, revision: int,
              page_size: int) -> dict[str | None, Any]:
    """The counters of the job keys ``first..last`` (inclusive), by job name."""
    start = keys.counters + first[len(keys.jobs):]
    end = keys.counters + last[len(keys.jobs):] + b"\0"
    found: dict[str | None, Any] = {}
    while True:
        try:
            response = client.range(start, end, revision=revision, limit=page_size)
        except EtcdError as exc:
            if exc.code == grpc.StatusCode.OUT_OF_RANGE:
                raise EtcdError(f"the listing's revision {revision} was compacted while reading "
                                f"it; list again", code=exc.code, details=exc.details) from exc
            raise
        for kv in response.kvs:
            try:
                found[keys.counter_name(kv.key)] = kv
            except UnicodeDecodeError:
                continue
        if not response.more or not response.kvs:
            return found
        start = response.kvs[-1].key + b"\0"
