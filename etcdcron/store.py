"""Job CRUD against etcd: add, add_if_not_exists, get, delete, delete_prefixes, list, pause,
resume.

Runs on the caller's thread (a web request, a trigger, a script); needs no running scheduler.
Every write is one etcd transaction, so nothing is ever half-written.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf.message import DecodeError

from etcdcron._etcd import EtcdClient, cmp_create, cmp_mod, length_delimited, op_delete, op_put
from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.errors import (
    EtcdCronError,
    EtcdError,
    JobExistsError,
    JobNotFoundError,
    ValidationError,
)
from etcdcron.keys import Keys, prefix_end
from etcdcron.ticks import to_timestamp
from etcdcron.validation import prepare_job, validate_name, validate_prefix

__all__ = ["Store", "decode_job", "MAX_PREFIXES", "list_jobs_and_counters",
           "stream_jobs_and_counters"]

log = logging.getLogger(__name__)

#: etcd's default --max-txn-ops is 128 and each prefix takes two deletions.
MAX_PREFIXES = 64
_MAX_TXN_OPS = 128
_DELETE_ATTEMPTS = 5
_UPDATE_ATTEMPTS = 10


def _cmp_created_before(key: bytes, range_end: bytes, revision: int) -> rpc.Compare:
    """Whether every key in ``[key, range_end)`` was created before ``revision`` (vacuously
    true for an empty range)."""
    return rpc.Compare(key=key, range_end=range_end, target=rpc.Compare.CREATE,
                       result=rpc.Compare.LESS, create_revision=revision)


def decode_job(value: bytes) -> stored_pb2.Job:
    """Parse a stored job. :raises DecodeError: if it is not one."""
    record = stored_pb2.Job()
    record.ParseFromString(value)
    return record


def decode_job_or_none(value: bytes, name: str, revision: int,
                       keys: Keys) -> stored_pb2.Job | None:
    """Parse a stored job, or log (once per revision) that ``name`` is skipped and return
    ``None``."""
    try:
        return decode_job(value)
    except DecodeError:
        keys.skip_once((name, revision), "skipping job %r (revision %d): its record cannot be "
                       "decoded", name, revision)
        return None


def list_jobs_and_counters(client: EtcdClient, keys: Keys,
                           **kw: Any) -> tuple[int, list[Any], dict[str, Any]]:
    """Every job and counter of the namespace at one revision: ``(revision, job kvs, {name:
    counter kv})``, both in key order."""
    revision, jobs = client.list_prefix(keys.jobs, **kw)
    _, counters = client.list_prefix(keys.counters, revision=revision, **kw)
    named = ((keys.counter_name(kv.key), kv) for kv in counters)
    return revision, jobs, {name: kv for name, kv in named if name is not None}


def stream_jobs_and_counters(client: EtcdClient, keys: Keys,
                             **kw: Any) -> tuple[int, Iterator[tuple[Any, Any | None]]]:
    """Every job of the namespace at one revision with its counter, read as it is consumed:
    ``(revision, iterator of (job kv, counter kv or None))``, in key order.

    Unlike :func:`list_jobs_and_counters`, a million jobs are never all in memory at once: the
    jobs and the counters are read page by page side by side (both are in name order) and
    matched as they go. The first page of jobs is read before this returns (it fixes the
    revision); the rest, and the counters, as the iterator is consumed.
    """
    job_pages = client.iter_prefix(keys.jobs, **kw)
    revision, first = next(job_pages)
    counter_pages = client.iter_prefix(keys.counters, revision=revision, **kw)
    jobs = itertools.chain(first, itertools.chain.from_iterable(page for _, page in job_pages))
    counters = itertools.chain.from_iterable(page for _, page in counter_pages)
    return revision, _matched(jobs, counters, len(keys.jobs), len(keys.counters))


def _matched(jobs: Iterator[Any], counters: Iterator[Any], job_prefix: int,
             counter_prefix: int) -> Iterator[tuple[Any, Any | None]]:
    """Each job kv with the counter kv of the same name (or ``None``): a merge of two
    listings in key order."""
    counter = next(counters, None)
    for kv in jobs:
        name = kv.key[job_prefix:]
        while counter is not None and counter.key[counter_prefix:] < name:
            counter = next(counters, None)
        if counter is not None and counter.key[counter_prefix:] == name:
            yield kv, counter
            counter = next(counters, None)
        else:
            yield kv, None


class Store:
    """The jobs of one namespace in etcd.

    :param clock: returns the current time as an aware datetime (injected for tests).
    """

    def __init__(self, client: EtcdClient, keys: Keys, clock: Callable[[], datetime],
                 logger: logging.Logger | None = None):
        self._client = client
        self._log = logger or log
        self._keys = keys
        self._clock = clock

    def add(self, name: str, job: api_pb2.Job) -> stored_pb2.Job:
        """Create or replace ``name``; a replaced job starts afresh (new version, no counter).

        Applied at most once: a retry after a lost answer never writes the job again (the record
        is unique to this call, so etcd's history tells whether it was written).
        """
        record = prepare_job(name, job, self._clock())
        key, value = self._keys.job(name), record.SerializeToString()
        self._client.txn_once([], [op_put(key, value), op_delete(self._keys.counter(name))],
                              witness=(key, value))
        return record

    def add_many(self, jobs: Mapping[str, api_pb2.Job], batch: int = 100) -> None:
        """Create or replace many jobs, ``batch`` per transaction, all validated first.

        Unlike :meth:`add`, a replaced job's old counter stays; it belongs to another version,
        so it does not count, and the counter GC deletes it.
        """
        now = self._clock()
        ops = [op_put(self._keys.job(name), prepare_job(name, job, now).SerializeToString())
               for name, job in jobs.items()]
        for start in range(0, len(ops), batch):
            self._client.txn([], ops[start:start + batch])

    def add_if_not_exists(self, name: str, job: api_pb2.Job) -> stored_pb2.Job:
        """Create ``name`` unless a job of that name exists, in one create-only transaction,
        applied at most once (as :meth:`add`).

        :raises JobExistsError: if it exists.
        """
        record = prepare_job(name, job, self._clock())
        key, value = self._keys.job(name), record.SerializeToString()
        response = self._client.txn_once(
            [cmp_create(key, 0)],
            [op_put(key, value), op_delete(self._keys.counter(name))],
            witness=(key, value),
        )
        if response is not None and not response.succeeded:
            raise JobExistsError(name)
        return record

    def get(self, name: str) -> api_pb2.Job | None:
        """The job called ``name``, or ``None``.

        :raises EtcdCronError: if the stored record cannot be decoded.
        """
        validate_name(name)
        kv = self._client.get(self._keys.job(name))
        if kv is None:
            return None
        try:
            return decode_job(kv.value).job
        except DecodeError as exc:
            raise EtcdCronError(f"job {name!r} is stored in a form etcdcron cannot decode") from exc

    def delete(self, name: str) -> None:
        """Delete ``name`` and its counter in one transaction; a missing job is not an error."""
        validate_name(name)
        self._client.txn([], [op_delete(self._keys.job(name)), op_delete(self._keys.counter(name))])

    def pause(self, name: str) -> None:
        """Mark ``name`` paused in its stored record: it keeps its counter and fires nothing.

        :raises JobNotFoundError: if there is no such job.
        """
        self._set_paused(name, True)

    def resume(self, name: str) -> None:
        """Resume ``name``; ticks that came due while it was paused are skipped.

        :raises JobNotFoundError: if there is no such job.
        """
        self._set_paused(name, False)

    def _set_paused(self, name: str, paused: bool) -> None:
        """Rewrite the record with ``paused``, keeping its version (partition id): a
        compare-and-swap on the key, tried again if the job changed meanwhile. Pausing a paused
        job, or resuming a running one, writes nothing, so a retried call changes nothing."""
        validate_name(name)
        key = self._keys.job(name)
        for _ in range(_UPDATE_ATTEMPTS):
            kv = self._client.get(key)
            if kv is None:
                raise JobNotFoundError(name)
            try:
                record = decode_job(kv.value)
            except DecodeError as exc:
                raise EtcdCronError(f"job {name!r} is stored in a form etcdcron cannot "
                                    "decode") from exc
            if record.paused == paused:
                return
            record.paused = paused
            if not paused:
                record.resumed.CopyFrom(to_timestamp(self._clock()))
            if self._client.txn([cmp_mod(key, kv.mod_revision)],
                                [op_put(key, record.SerializeToString())]).succeeded:
                return
        raise EtcdError(f"job {name!r} kept changing while being "
                        f"{'paused' if paused else 'resumed'}; nothing was written")

    def delete_prefixes(self, *prefixes: str) -> None:
        """Delete every job (and counter) whose name starts with one of ``prefixes``, atomically.

        ``""`` deletes every job of the namespace. Keys of a nested namespace that lie in the
        same ranges (``app/jobs/jobs/x`` under ``app``'s ``app/jobs/``) are left alone: the
        ranges are deleted around them, in one transaction that fails, and is tried again, if
        a key was created in them since they were listed.

        :raises EtcdError: if keys kept being created under the prefixes while trying.
        """
        unique = sorted({validate_prefix(p) for p in prefixes})
        if len(unique) > MAX_PREFIXES:
            raise ValidationError(
                f"delete_prefixes takes at most {MAX_PREFIXES} prefixes at once, got {len(unique)}"
            )
        # A prefix covers every longer one that starts with it; sorted, it comes first.
        covering = [p for i, p in enumerate(unique) if not any(p.startswith(q) for q in unique[:i])]
        for _ in range(_DELETE_ATTEMPTS):
            revision, ranges = self._own_ranges(covering)
            created_before = [_cmp_created_before(start, end, revision + 1) for start, end in ranges]
            ops = [op_delete(start, end) for start, end in ranges]
            if len(ops) > _MAX_TXN_OPS:
                raise EtcdCronError(f"delete_prefixes{tuple(prefixes)!r}: too many nested "
                                    "namespaces inside these prefixes to delete around them")
            if not ops or self._client.txn(created_before, ops).succeeded:
                return
        raise EtcdError(f"delete_prefixes{tuple(prefixes)!r}: keys kept being created under "
                        "the prefixes; nothing was deleted")

    def _own_ranges(self, prefixes: list[str]) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The key ranges holding this namespace's jobs and counters under ``prefixes``, around
        any nested namespace's keys, as listed at one revision."""
        revision, ranges = 0, []
        for prefix in prefixes:
            for base in (self._keys.jobs, self._keys.counters):
                start = base + prefix.encode()
                end = prefix_end(start)
                holes = set()
                for revision, kvs in self._client.iter_prefix(start, revision=revision,
                                                              keys_only=True):
                    for kv in kvs:
                        part = kv.key[len(base):]
                        if b"/" in part:
                            holes.add(base + part.partition(b"/")[0] + b"/")
                for hole in sorted(holes):
                    if start < hole:
                        ranges.append((start, hole))
                    start = max(start, prefix_end(hole))
                if start < end:
                    ranges.append((start, end))
        return revision, ranges

    def list(self, prefix: str = "") -> list[api_pb2.NamedJob]:
        """Every job whose name starts with ``prefix``, sorted by name.

        Reads page by page at one revision. Records that cannot be decoded are logged and left
        out (never deleted).
        """
        validate_prefix(prefix)
        jobs: list[api_pb2.NamedJob] = []
        for _, kvs in self._client.iter_prefix(self._keys.job(prefix)):
            jobs.extend(self._named_page(kvs))
        return jobs

    def _named_page(self, kvs: Any) -> Any:
        """The jobs of one listed page as ``NamedJob`` messages.

        A million jobs are a million messages: built one by one, each takes its own arena (a
        kilobyte, and most of the listing's time). So the page is assembled in the wire format
        of a ``ListResponse`` and parsed once, and its messages share that one's memory.
        """
        parts: list[bytes] = []
        jobs_prefix = len(self._keys.jobs)
        for kv in kvs:
            name = self._keys.job_name(kv.key)
            record = (None if name is None
                      else decode_job_or_none(kv.value, name, kv.mod_revision, self._keys))
            if record is None:
                continue
            named = (length_delimited(1, kv.key[jobs_prefix:])
                     + length_delimited(2, record.job.SerializeToString()))
            parts.append(length_delimited(1, named))  # NamedJob name = 1, job = 2; jobs = 1
        return api_pb2.ListResponse.FromString(b"".join(parts)).jobs
