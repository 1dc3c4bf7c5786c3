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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from etcd3.etcdrpc import kv_pb2

import grpc

from etcdcron._etcd import EtcdClient, Stopped, cmp_mod, op_delete, op_put, op_range, op_txn
from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.api import TriggerResult
from etcdcron.errors import EtcdError, EtcdUnavailableError
from etcdcron.index import JobIndex, JobState, Ownership, Phase, counter_of, decode_counter
from etcdcron.informer import Informer
from etcdcron.keys import Keys
from etcdcron.recorder import Outcome, Recorder
from etcdcron.staging import Staging
from etcdcron.store import decode_job_or_none
from etcdcron.ticks import Pending, after_result, pending
from etcdcron.timer import Timer
from etcdcron.workers import WorkerPool, to_result

__all__ = ["Engine"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Plan:
    """One outcome turned into an inner transaction, with what to apply if it succeeds."""

    outcome: Outcome
    counter: stored_pb2.Counter
    next: Pending | None
    op: object


class Engine:
    """Owned jobs, their timer, the worker pool and the recorder of one :class:`Cron`.

    :param trigger: the user's callable.
    :param lease_valid: whether the lease of a generation is still valid by this process's
        clock; checked right before every trigger.
    :param emit: queues an ``InformerEvent`` for the consumer sink (or ``None``).
    """

    def __init__(self, *, client: EtcdClient, keys: Keys, trigger: Callable, workers: int,
                 lease_valid: Callable[[int], bool], emit: Callable | None, staging: Staging,
                 stop: threading.Event, clock: Callable[[], float] = time.time,
                 logger: logging.Logger | None = None):
        self._log = logger or log
        self._client = client
        self._keys = keys
        self._trigger = trigger
        self._lease_valid = lease_valid
        self._emit = emit
        self._stop = stop
        self._clock = clock
        self.index = JobIndex(self._log)
        # Notified (under the index lock) whenever a job leaves RUNNING.
        self._drained = threading.Condition(self.index.lock)
        self.staging = staging
        self.timer = Timer(self._dispatch, clock, self._log)
        self.pool = WorkerPool(workers, self._run, self._log)
        self.recorder = Recorder(self._commit, self._log)
        self.informer = Informer(client, keys, self, stop, self._log)

    @property
    def threads(self) -> list[threading.Thread]:
        return [self.informer.thread, self.timer.thread, self.recorder.thread, *self.pool.threads]

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
        """Stop triggering, wait up to ``timeout`` for results in flight, drop every job.

        :returns: whether every result in flight was recorded in time.
        """
        with self.index.lock:
            if self.index.ownership is None:
                return True
            self.index.set_ownership_locked(None)
        self.informer.deactivate()
        self.timer.clear()
        self.staging.clear()
        with self._drained:
            drained = self._drained.wait_for(lambda: self.index.running == 0, timeout)
            if not drained:
                self._log.warning("%d triggers still running after %.1fs; their results will be "
                                  "ignored", self.index.running, timeout)
            self.index.clear_locked()
        self._send(api_pb2.InformerEvent(drop_all=api_pb2.InformerEventDropAll()))
        return drained

    # -- informer thread -------------------------------------------------------------------------

    def load(self, ownership: Ownership, jobs: list, counters: dict, revision: int) -> None:
        """Take a full listing at ``revision``: load owned jobs, forget the ones not listed."""
        owned = []  # decoded before taking the lock: the timer and workers wait on it
        for kv in jobs:
            name = self._keys.job_name(kv.key)
            record = decode_job_or_none(kv.value, name, self._log)
            if record is None or not ownership.owns(record.partition_id):
                continue
            counter_kv = counters.get(name)
            counter = decode_counter(counter_kv.value, name, self._log) if counter_kv else None
            owned.append((name, record, kv.mod_revision, counter,
                          counter_kv.mod_revision if counter_kv else 0))
        listed = {entry[0] for entry in owned}
        arms: list = []
        with self.index.lock:
            if self.index.ownership is not ownership:
                return
            self.index.caught_up_locked(revision)
            for entry in owned:
                state = self.index.put_locked(*entry)
                if state is not None:
                    self._loaded_locked(state, ownership, arms)
            for name in self.index.names_locked():
                if name not in listed:
                    self._forget_locked(name)
        self.timer.arm_many(arms)
        self._log.debug("loaded %d owned jobs at revision %d", len(listed), revision)

    def apply_events(self, ownership: Ownership, events: list) -> None:
        arms: list = []
        with self.index.lock:
            if self.index.ownership is not ownership:
                return
            for event in events:
                name = self._keys.job_name(event.kv.key)
                if event.type == kv_pb2.Event.DELETE:
                    self._forget_locked(name)
                    continue
                record = decode_job_or_none(event.kv.value, name, self._log)
                if record is None or not ownership.owns(record.partition_id):
                    self._forget_locked(name)
                    continue
                state = self.index.put_locked(name, record, event.kv.mod_revision, None, 0)
                if state is not None:
                    self._loaded_locked(state, ownership, arms)
            self.index.caught_up_locked(events[-1].kv.mod_revision)
        self.timer.arm_many(arms)

    def _loaded_locked(self, state: JobState, ownership: Ownership, arms: list) -> None:
        self.staging.discard(state.name)
        if self._emit is not None:
            put = api_pb2.InformerEventJobPut(name=state.name, mod_revision=state.mod_revision)
            if state.request.HasField("metadata"):
                put.metadata.CopyFrom(state.request.metadata)
            if state.request.HasField("payload"):
                put.payload.CopyFrom(state.request.payload)
            self._emit(api_pb2.InformerEvent(put=put))
        self._arm_locked(state, ownership, arms)

    def _forget_locked(self, name: str, token: int | None = None) -> None:
        state = self.index.remove_locked(name, token)
        if state is None:
            return
        self._drained.notify_all()
        self.staging.discard(name)
        self._send(api_pb2.InformerEvent(delete=api_pb2.InformerEventJobDelete(
            name=name, mod_revision=state.mod_revision)))

    def _send(self, event: api_pb2.InformerEvent) -> None:
        if self._emit is not None:
            self._emit(event)

    def _arm_locked(self, state: JobState, ownership: Ownership, arms: list) -> None:
        """Put ``state`` where its ``next`` says: the timer, or the recorder to be deleted."""
        if self.index.ownership is not ownership:
            self.index.set_phase_locked(state, Phase.IDLE)
        elif state.next is None:
            self.index.set_phase_locked(state, Phase.RUNNING)
            self.recorder.put(Outcome(state.name, state.token, ownership))
        else:
            self.index.set_phase_locked(state, Phase.ARMED)
            arms.append((state.next.due.timestamp(), state.name, state.token))

    # -- timer thread ----------------------------------------------------------------------------

    def _dispatch(self, entries: list[tuple[str, int]]) -> None:
        now = self._clock()
        ready = []
        with self.index.lock:
            if self.index.ownership is None:
                return
            for name, token in entries:
                state = self.index.get_locked(name, token)
                if (state is None or state.phase is not Phase.ARMED
                        or state.next.due.timestamp() > now):
                    continue
                self.index.set_phase_locked(state, Phase.RUNNING)
                ready.append((name, token))
        self.pool.submit(ready)

    # -- worker threads --------------------------------------------------------------------------

    def _run(self, name: str, token: int) -> None:
        with self.index.lock:
            state = self.index.get_locked(name, token)
            if state is None or state.phase is not Phase.RUNNING or state.next is None:
                return
            ownership = self.index.ownership
            if ownership is None or not self._lease_valid(ownership.lease_generation):
                self.index.set_phase_locked(state, Phase.IDLE)
                self._drained.notify_all()
                return
            request, tick = state.request, state.next.tick
        try:
            value = self._trigger(request)
        except Exception:
            self._log.exception("trigger for job %r raised; counting it as FAILED", name)
            value = TriggerResult.FAILED
        if isinstance(value, Future):
            value.add_done_callback(
                lambda future: self._finish(name, token, tick, ownership,
                                            self._future_value(name, future))
            )
        else:
            self._finish(name, token, tick, ownership, value)

    def _finish(self, name: str, token: int, tick, ownership: Ownership, value: object) -> None:
        try:
            result = to_result(value)
        except TypeError as exc:
            self._log.error("job %r: %s; counting it as FAILED", name, exc)
            result = TriggerResult.FAILED
        if result is not TriggerResult.UNDELIVERABLE:
            self.recorder.put(Outcome(name, token, ownership, tick, result))
            return
        with self.index.lock:
            state = self.index.get_locked(name, token)
            if state is None or state.phase is not Phase.RUNNING:
                return
            if self.staging.park(name, token):
                self.index.set_phase_locked(state, Phase.STAGED)
                self._drained.notify_all()
                return
        self.pool.submit([(name, token)])

    # -- deliverable prefixes (user's thread) ----------------------------------------------------

    def release(self, entries: list[tuple[str, int]]) -> None:
        ready = []
        with self.index.lock:
            for name, token in entries:
                state = self.index.get_locked(name, token)
                if state is not None and state.phase is Phase.STAGED:
                    self.index.set_phase_locked(state, Phase.RUNNING)
                    ready.append((name, token))
        self.pool.submit(ready)

    # -- recorder thread -------------------------------------------------------------------------

    def _commit(self, batch: list[Outcome]) -> None:
        groups: dict[Ownership, list[Outcome]] = {}
        for outcome in batch:
            groups.setdefault(outcome.ownership, []).append(outcome)
        for ownership, outcomes in groups.items():
            plans = self._plan(outcomes)
            if plans:
                self._write(ownership, plans)

    def _plan(self, outcomes: list[Outcome]) -> list[_Plan]:
        with self.index.lock:
            running = [(outcome, state) for outcome in outcomes
                       if (state := self.index.get_locked(outcome.name, outcome.token)) is not None
                       and state.phase is Phase.RUNNING]
        # The schedule math runs without the lock: a state's counter and counter revision change
        # only on this thread, and _apply checks the token again.
        plans = []
        for outcome, state in running:
            if outcome.result is None:
                counter, nxt = state.counter, None
            else:
                counter = after_result(state.record, state.counter, outcome.tick, outcome.result)
                nxt = pending(state.record, counter, state.schedule)
            job_key, counter_key = self._keys.job(state.name), self._keys.counter(state.name)
            if nxt is None:
                success = [op_delete(job_key), op_delete(counter_key)]
            else:
                success = [op_put(counter_key, counter.SerializeToString())]
            op = op_txn([cmp_mod(job_key, state.mod_revision),
                         cmp_mod(counter_key, state.counter_revision)],
                        success, [op_range(job_key), op_range(counter_key)])
            plans.append(_Plan(outcome, counter, nxt, op))
        return plans

    def _write(self, ownership: Ownership, plans: list[_Plan]) -> None:
        """Commit ``plans`` in one transaction fenced by ``ownership``; split it if etcd finds it
        too big; give up only once the session is over."""
        fence = [cmp_mod(ownership.fence_key, ownership.fence_revision)]
        while True:
            try:
                response = self._client.txn(fence, [plan.op for plan in plans], [],
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
                self._abandon(plans, str(exc))
                return
            except Stopped:
                self._abandon(plans, "stopping")
                return
        if not response.succeeded:
            self._abandon(plans, "this replica's leadership changed (fence failed)")
            return
        self._apply(ownership, plans, response)

    def _abandon(self, plans: list[_Plan], why: str) -> None:
        self._log.warning("not recording %d trigger results: %s", len(plans), why)
        with self.index.lock:
            for plan in plans:
                state = self.index.get_locked(plan.outcome.name, plan.outcome.token)
                if state is not None and state.phase is Phase.RUNNING:
                    self.index.set_phase_locked(state, Phase.IDLE)
            self._drained.notify_all()

    def _apply(self, ownership: Ownership, plans: list[_Plan], response) -> None:
        arms: list = []
        with self.index.lock:
            for plan, reply in zip(plans, response.responses):
                name, token = plan.outcome.name, plan.outcome.token
                state = self.index.get_locked(name, token)
                if state is None:
                    continue
                inner = reply.response_txn
                if inner.succeeded and plan.next is None:
                    self._forget_locked(name, token)
                    self.index.mark_deleted_locked(name, response.header.revision)
                    continue
                if inner.succeeded:
                    state.counter, state.counter_revision = plan.counter, response.header.revision
                    state.next = plan.next
                elif not self._adopt_locked(state, inner):
                    self.index.set_phase_locked(state, Phase.IDLE)
                    continue
                self._arm_locked(state, ownership, arms)
            self._drained.notify_all()
        self.timer.arm_many(arms)

    def _adopt_locked(self, state: JobState, inner) -> bool:
        """After a failed compare: take the counter etcd holds if the job is unchanged.

        :returns: False when the job itself changed (the informer brings the new version).
        """
        job_kvs = inner.responses[0].response_range.kvs
        counter_kvs = inner.responses[1].response_range.kvs
        if not job_kvs or job_kvs[0].mod_revision != state.mod_revision:
            return False
        self._log.info("counter of job %r was changed by another writer; continuing from it",
                       state.name)
        stored, state.counter_revision = None, 0
        if counter_kvs:
            stored = decode_counter(counter_kvs[0].value, state.name, self._log)
            state.counter_revision = counter_kvs[0].mod_revision
        state.counter = counter_of(state.record, stored)
        state.next = pending(state.record, state.counter, state.schedule)
        return True

    def _future_value(self, name: str, future: Future) -> object:
        if future.cancelled():
            self._log.error("trigger future of job %r was cancelled; counting it as FAILED", name)
            return TriggerResult.FAILED
        exc = future.exception()
        if exc is not None:
            self._log.error("trigger future of job %r failed; counting it as FAILED", name,
                            exc_info=exc)
            return TriggerResult.FAILED
        return future.result()
