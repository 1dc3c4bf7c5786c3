"""Job CRUD against etcd: add, add_if_not_exists, get, delete, delete_prefixes, list.

Runs on the caller's thread (a web request, a trigger, a script); needs no running scheduler.
Every write is one etcd transaction, so nothing is ever half-written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime

from google.protobuf.message import DecodeError

from etcdcron._etcd import EtcdClient, cmp_create, op_delete, op_put
from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.errors import EtcdCronError, JobExistsError, ValidationError
from etcdcron.keys import Keys, prefix_end
from etcdcron.validation import prepare_job, validate_name, validate_prefix

__all__ = ["Store", "decode_job", "MAX_PREFIXES"]

log = logging.getLogger(__name__)

#: etcd's default --max-txn-ops is 128 and each prefix takes two deletions.
MAX_PREFIXES = 64


def decode_job(value: bytes) -> stored_pb2.Job:
    """Parse a stored job. :raises DecodeError: if it is not one."""
    record = stored_pb2.Job()
    record.ParseFromString(value)
    return record


def decode_job_or_none(value: bytes, name: str, logger: logging.Logger) -> stored_pb2.Job | None:
    """Parse a stored job, or log that ``name`` is skipped and return ``None``."""
    try:
        return decode_job(value)
    except DecodeError:
        logger.warning("skipping job %r: its record cannot be decoded", name)
        return None


def list_jobs_and_counters(client: EtcdClient, keys: Keys, **kw) -> tuple[int, list, dict]:
    """Every job and counter of the namespace at one revision: ``(revision, job kvs, {name:
    counter kv})``, both in key order."""
    revision, jobs = client.list_prefix(keys.jobs, **kw)
    _, counters = client.list_prefix(keys.counters, revision=revision, **kw)
    return revision, jobs, {keys.counter_name(kv.key): kv for kv in counters}


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

    def delete_prefixes(self, *prefixes: str) -> None:
        """Delete every job (and counter) whose name starts with one of ``prefixes``, atomically."""
        unique = sorted({validate_prefix(p) for p in prefixes})
        if len(unique) > MAX_PREFIXES:
            raise ValidationError(
                f"delete_prefixes takes at most {MAX_PREFIXES} prefixes at once, got {len(unique)}"
            )
        ops = []
        for prefix in unique:
            for key in (self._keys.job(prefix), self._keys.counter(prefix)):
                ops.append(op_delete(key, prefix_end(key)))
        if ops:
            self._client.txn([], ops)

    def list(self, prefix: str = "") -> list[api_pb2.NamedJob]:
        """Every job whose name starts with ``prefix``, sorted by name.

        Reads page by page at one revision. Records that cannot be decoded are logged and left
        out (never deleted).
        """
        validate_prefix(prefix)
        jobs = []
        for _, kvs in self._client.iter_prefix(self._keys.job(prefix)):
            for kv in kvs:
                name = self._keys.job_name(kv.key)
                record = decode_job_or_none(kv.value, name, self._log)
                if record is None:
                    continue
                jobs.append(api_pb2.NamedJob(name=name, job=record.job))
        return jobs
