"""The counter garbage collector (``etcdcron-gc``): deletes counters nobody will read again.

A counter is garbage when its job is gone, or when the job's ``partition_id`` is not the
counter's ``job_partition_id`` (a counter of an older version). Such counters are left behind by
crashes and by other writers; etcdcron's own deletions remove the counter with the job.

Only the replica that owns partition index 0 sweeps, every ``counter_gc_interval`` seconds. A
sweep lists jobs and counters at one revision and deletes in batched transactions, each
deletion guarded by the counter's and the job's mod revisions, so a counter that came back to
life in the meantime is kept. Records it cannot decode are never deleted.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from google.protobuf.message import DecodeError

from etcdcron._etcd import EtcdClient, Stopped, cmp_mod, op_delete, op_txn
from etcdcron._pb import stored_pb2
from etcdcron.errors import EtcdError
from etcdcron.index import Ownership
from etcdcron.keys import Keys
from etcdcron.recorder import MAX_BATCH
from etcdcron.store import decode_job, list_jobs_and_counters
from etcdcron.supervise import Loop

__all__ = ["CounterCollector", "find_garbage"]

log = logging.getLogger(__name__)


def find_garbage(jobs: dict[str, tuple[int | None, int]],
                 counters: list[tuple[str, Any]]) -> list[tuple[str, int, int]]:
    """The garbage among ``counters`` (``(name, KeyValue)`` pairs of ``NS/counters/``).

    :param jobs: ``name -> (partition_id or None if undecodable, mod_revision)``.
    :returns: ``(name, counter mod revision, job mod revision or 0)`` per garbage counter.
    """
    garbage = []
    for name, kv in counters:
        counter = stored_pb2.Counter()
        try:
            counter.ParseFromString(kv.value)
        except DecodeError:
            continue
        job = jobs.get(name)
        if job is None:
            garbage.append((name, kv.mod_revision, 0))
        elif job[0] is not None and counter.job_partition_id != job[0]:
            garbage.append((name, kv.mod_revision, job[1]))
    return garbage


class CounterCollector:
    def __init__(self, client: EtcdClient, keys: Keys, interval: float, stop: threading.Event,
                 logger: logging.Logger | None = None):
        self._client = client
        self._keys = keys
        self._interval = interval
        self._stop = stop
        self._log = logger or log
        # Guards _ownership; notified when it changes and on stop.
        self._cond = threading.Condition(threading.Lock())
        self._ownership: Ownership | None = None
        #: Counters deleted so far (for tests and curiosity).
        self.deleted = 0
        self.loop = Loop("etcdcron-gc", self._run, stopping=stop.is_set, wait=stop.wait,
                         logger=self._log)
        self.thread = self.loop.thread

    def start(self) -> None:
        self.loop.start()

    def activate(self, ownership: Ownership) -> None:
        with self._cond:
            self._ownership = ownership if 0 in ownership.indices else None
            self._cond.notify_all()

    def deactivate(self) -> None:
        with self._cond:
            self._ownership = None
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self, loop: Loop) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._ownership is not None or self._stop.is_set())
                ownership = self._ownership
                if self._cond.wait_for(lambda: self._ownership is not ownership
                                       or self._stop.is_set(), self._interval):
                    continue
            try:
                self.sweep()
                loop.progress()
            except Stopped:
                return
            except EtcdError as exc:
                self._log.warning("counter garbage collection failed: %s", exc)
                loop.failed(exc)

    def sweep(self) -> int:
        """Delete the garbage counters of the namespace; returns how many were deleted."""
        kw: dict[str, Any] = {"stop": self._stop, "forever": True}
        _, job_kvs, counters = list_jobs_and_counters(self._client, self._keys, **kw)
        jobs = {}
        for kv in job_kvs:
            name = self._keys.job_name(kv.key)
            if name is None:
                continue
            try:
                partition_id = decode_job(kv.value).partition_id
            except DecodeError:
                partition_id = None
            jobs[name] = (partition_id, kv.mod_revision)
        garbage = find_garbage(jobs, list(counters.items()))
        deleted = 0
        for start in range(0, len(garbage), MAX_BATCH):
            ops = []
            for name, counter_revision, job_revision in garbage[start:start + MAX_BATCH]:
                counter_key = self._keys.counter(name)
                ops.append(op_txn([cmp_mod(counter_key, counter_revision),
                                   cmp_mod(self._keys.job(name), job_revision)],
                                  [op_delete(counter_key)]))
            response = self._client.txn([], ops, **kw)
            batch = sum(reply.response_txn.succeeded for reply in response.responses)
            self.deleted += batch
            deleted += batch
        if deleted:
            self._log.info("deleted %d orphaned counters", deleted)
        return deleted
