"""The :class:`Cron` façade: configuration, job CRUD, and the lifecycle of the threads.

CRUD calls run on the caller's thread and need no :meth:`Cron.start`. ``start()`` creates and
starts every thread (all named ``etcdcron-...``); ``stop()`` stops and joins them.

Lifecycle (State Transitions)::

    NEW --start()--> RUNNING --stop()--> STOPPING --> STOPPED
    NEW --stop()--> STOPPED            (start() after stop() raises LifecycleError)
"""

from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, cast

from google.protobuf import any_pb2
from google.protobuf.message import Message

from etcdcron import options
from etcdcron._etcd import connect
from etcdcron._pb import api_pb2
from etcdcron.engine import Engine
from etcdcron.errors import LifecycleError, StopTimeoutError, ValidationError
from etcdcron.gc import CounterCollector
from etcdcron.index import Ownership
from etcdcron.keys import Keys
from etcdcron.metrics import NO_METRICS, Metrics, make_metrics
from etcdcron.election import Elector, ElectionState
from etcdcron.lease import LeaseKeeper
from etcdcron.notify import Notifier
from etcdcron.staging import DeliverableHandle, Staging
from etcdcron.status import JobStatus, LocalView, job_status, job_statuses
from etcdcron.store import Store
from etcdcron.supervise import Health, Loop
from etcdcron.validation import validate_prefix

__all__ = ["Cron", "CronState"]

log = logging.getLogger(__name__)

#: Seconds a session's end waits for triggers in flight before handing them over (at most a
#: quarter of the lease TTL).
DEFAULT_DRAIN_TIMEOUT = 2.0


class CronState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_TRANSITIONS = {
    CronState.NEW: {CronState.RUNNING, CronState.STOPPED},
    CronState.RUNNING: {CronState.STOPPING},
    CronState.STOPPING: {CronState.STOPPED},
    CronState.STOPPED: set(),
}


class Cron:
    """A replica of a distributed cron scheduler whose jobs live in etcd.

    Every process that runs ``Cron(...).start()`` on the same ``namespace`` shares the jobs: each
    job fires on exactly one live replica, at its time, and the others take over its jobs when it
    goes away.

    Example::

        from etcdcron import Cron, Job

        def trigger(req):
            print("fired", req.name)

        cron = Cron(endpoints="127.0.0.1:2379", namespace="myapp", trigger=trigger)
        cron.start()
        cron.add("hello", Job(schedule="*/10 * * * * *", repeats=3))

    :param trigger: called with a :class:`TriggerRequest` on a worker thread; returns a
        :class:`TriggerResult`, ``True``/``False``/``None``, or a ``Future`` of one of those.
        An exception counts as FAILED.
    :param namespace: the key prefix shared by the replicas (``NS/jobs/...``).
    :param endpoints: ``"host:port"``, a comma-separated string or a list of them.
    :param client: an existing ``etcd3`` client (not logged in as a user) whose channel and TLS
        are reused, instead of ``endpoints`` and the TLS and auth options.
    :param replica_id: this replica's id in dynamic membership (default: unique); a second
        process with the same id waits passively and takes over when the first goes away.
    :param partition_id: static mode: this replica's partition (with ``partition_total``).
    :param partition_total: static mode: the number of partitions; every replica must agree.
    :param workers: how many threads call ``trigger`` (default ``min(32, cpus + 4)``).
    :param lease_ttl: the leadership lease TTL in seconds (default 20; at least 2).
    :param replica_data: a protobuf message published in this replica's leadership key.
    :param on_leadership: called with every replica's ``replica_data`` (``Any`` or ``None``),
        in key order, after each election.
    :param consumer_sink: called with an :class:`InformerEvent` for every job this replica
        starts or stops owning (``put``, ``delete``, ``drop_all`` before each rebalance and on
        stop).
    :param counter_gc_interval: seconds between sweeps of orphaned counters (default 180).
    :param drain_timeout: seconds a session's end (a rebalance, a lost lease, a stop) waits for
        triggers in flight; those still running then are handed over: their results are still
        recorded when they finish, and the job's next owner waits for them (default
        ``min(2, lease_ttl / 4)``).
    :param trigger_timeout: seconds a trigger may take (until it returns, or its ``Future``
        resolves) before it counts as FAILED and its failure policy applies; a result that
        comes later is ignored. A synchronous trigger cannot be interrupted: its worker is
        replaced (up to twice ``workers`` threads in all) and listed in ``health().stuck``
        until it returns. Default: no limit.
    :param metrics_registry: the ``prometheus_client`` registry this Cron exports its metrics
        into while it runs (from :meth:`start` to :meth:`stop`), with the labels ``namespace``
        and ``replica``; by default ``prometheus_client.REGISTRY`` if ``prometheus_client`` is
        installed (the ``etcdcron[metrics]`` extra), else none; ``None`` for none.
    :param logger: where etcdcron logs (default: one logger per module,
        ``logging.getLogger("etcdcron.<module>")``, e.g. ``etcdcron.election``).
    :param request_timeout: how long a CRUD call keeps retrying a failing etcd, in seconds.
    :param ca_cert: CA certificate file for TLS (``https://`` endpoints turn TLS on too).
    :param cert_key: client key file for TLS client authentication.
    :param cert_cert: client certificate file for TLS client authentication.
    :param user: etcd user (with ``password``); the auth token is renewed whenever etcd refuses
        it. See ``docs/security.rst``.
    :param clock: wall-clock seconds since the epoch (for tests; default ``time.time``).
    :raises ValidationError: if an option is invalid.
    """

    def __init__(
        self,
        *,
        trigger: Callable[[api_pb2.TriggerRequest], object],
        namespace: str,
        endpoints: str | Sequence[str] | None = None,
        client: Any = None,
        replica_id: str | None = None,
        partition_id: int | None = None,
        partition_total: int | None = None,
        workers: int | None = None,
        lease_ttl: float | timedelta = 20,
        replica_data: Message | None = None,
        on_leadership: Callable[[list[any_pb2.Any | None]], object] | None = None,
        consumer_sink: Callable[[api_pb2.InformerEvent], object] | None = None,
        counter_gc_interval: float | timedelta = 180,
        drain_timeout: float | timedelta | None = None,
        trigger_timeout: float | timedelta | None = None,
        metrics_registry: object = options.DEFAULT_REGISTRY,
        logger: logging.Logger | None = None,
        request_timeout: float | timedelta = 10,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        user: str | None = None,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(trigger):
            raise ValidationError(f"trigger must be callable, got {trigger!r}")
        namespace = options.check_namespace(namespace)
        options.callable_or_none("on_leadership", on_leadership)
        options.callable_or_none("consumer_sink", consumer_sink)
        options.check_logger(logger)
        self._trigger = trigger
        self._on_leadership = on_leadership
        self._consumer_sink = consumer_sink
        self._static = options.check_partitions(replica_id, partition_id, partition_total)
        if self._static is not None:
            replica_id = str(self._static[0])
        elif replica_id is None:
            replica_id = uuid.uuid4().hex
        self.replica_id = options.check_replica_id(replica_id)
        self._workers = options.check_workers(workers)
        self._lease_ttl = math.ceil(options.seconds("lease_ttl", lease_ttl, 2,
                                                    options.MAX_LEASE_TTL))
        self._drain_timeout = (min(DEFAULT_DRAIN_TIMEOUT, self._lease_ttl / 4)
                               if drain_timeout is None
                               else options.seconds("drain_timeout", drain_timeout, 0))
        self._trigger_timeout = (None if trigger_timeout is None
                                 else options.seconds("trigger_timeout", trigger_timeout, 0.001))
        self._gc_interval = options.seconds("counter_gc_interval", counter_gc_interval, 0.001)
        self._replica_data = options.pack_replica_data(replica_data)
        self._metrics_registry = options.check_metrics_registry(metrics_registry)
        self._metrics: Metrics = NO_METRICS
        # The user's logger receives every component's lines; by default each component logs
        # through its module's logger (etcdcron.election, etcdcron.engine, ...).
        self._logger = logger
        self._log = logger or log
        self._clock = options.check_clock(clock)

        self._keys = Keys(namespace, logger)
        self._client = connect(endpoints=endpoints, client=client, request_timeout=request_timeout,
                               ca_cert=ca_cert, cert_key=cert_key, cert_cert=cert_cert, user=user,
                               password=password)
        self._store = Store(self._client, self._keys,
                            lambda: datetime.fromtimestamp(self._clock(), timezone.utc))
        self._staging = Staging(self._release_staged)

        # Guards _state; notified when it changes.
        self._state_cond = threading.Condition(threading.Lock())
        self._state = CronState.NEW
        self._stop_event = threading.Event()
        self._stop_deadline = math.inf
        self._engine: Engine | None = None
        self._elector: Elector | None = None
        self._lease: LeaseKeeper | None = None
        self._notifier: Notifier | None = None
        self._collector: CounterCollector | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def state(self) -> CronState:
        return self._state

    def _set_state_locked(self, state: CronState) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise LifecycleError(f"Cron cannot go from {self._state.name} to {state.name}")
        self._state = state
        self._state_cond.notify_all()

    def start(self) -> Cron:
        """Start the background threads and return at once (idempotent).

        :raises LifecycleError: if this Cron was stopped; create a new one instead.
        """
        with self._state_cond:
            if self._state is CronState.RUNNING:
                return self
            if self._state is not CronState.NEW:
                raise LifecycleError("this Cron was stopped and cannot start again; "
                                     "create a new Cron")
            self._build()
            for thread in self._threads():
                thread.start()
            self._set_state_locked(CronState.RUNNING)
        return self

    def _build(self) -> None:
        stop = self._stop_event
        if self._metrics_registry is not None:
            self._metrics = make_metrics(self._metrics_registry,
                                         namespace=self._keys.namespace,
                                         replica_id=self.replica_id)
            self._client.metrics = self._metrics
        if self._on_leadership is not None or self._consumer_sink is not None:
            self._notifier = Notifier(self._logger)
        emit = None
        if self._consumer_sink is not None:
            # cast: the notifier was made just above, for the consumer sink
            emit = lambda event: cast(Notifier, self._notifier).call(  # noqa: E731
                self._consumer_sink, event)
        self._lease = LeaseKeeper(self._client, self._lease_ttl, stop, self._wake_elector,
                                  self._logger)
        self._engine = Engine(client=self._client, keys=self._keys, trigger=self._trigger,
                              workers=self._workers, lease_valid=self._lease.valid, emit=emit,
                              staging=self._staging, stop=stop, clock=self._clock,
                              trigger_timeout=self._trigger_timeout, metrics=self._metrics,
                              logger=self._logger)
        self._collector = CounterCollector(self._client, self._keys, self._gc_interval, stop,
                                           self._logger)
        # The loops without which an elected replica would fire nothing: one that keeps
        # failing makes the replica resign its partitions. They work only while elected, so
        # the replica claims again after its backoff to find out whether they work again.
        essential = [self._engine.informer.loop, self._engine.timer.loop,
                     *self._engine.recorder.loops]
        self._elector = Elector(client=self._client, keys=self._keys, lease=self._lease,
                                replica_id=self.replica_id, uid=random.getrandbits(64),
                                replica_data=self._replica_data, static=self._static,
                                activate=self._activate, deactivate=self._deactivate,
                                on_elected=self._elected, stop=stop, metrics=self._metrics,
                                logger=self._logger)
        for loop in essential:
            loop.on_stuck, loop.stuck_after = self._elector.resign, self._lease_ttl
        self._engine.on_fence_failed = self._elector.fence_failed
        if self._metrics.enabled:
            engine = self._engine
            self._metrics.bind_state(owned_jobs=lambda: len(engine.index),
                                     staged_jobs=lambda: len(self._staging),
                                     elected=self.is_elected, partition=self._partition)

    def _partition(self) -> tuple[int, int] | None:
        """``(index, total)`` of the partition this replica triggers, if elected."""
        # cast: is_elected() is False without an elector
        ownership = cast(Elector, self._elector).ownership if self.is_elected() else None
        if ownership is None or not ownership.indices:
            return None
        return min(ownership.indices), ownership.total

    def _threads(self) -> list[threading.Thread]:
        if TYPE_CHECKING:  # _build makes them all (a partly built Cron fails here as before)
            assert self._engine and self._collector and self._lease and self._elector
        threads = []
        if self._notifier is not None:
            threads.append(self._notifier.thread)
        threads += [*self._engine.threads, self._collector.thread, self._lease.thread,
                    self._elector.watch.thread, self._elector.thread]
        return threads

    def _wake_elector(self) -> None:
        if self._elector is not None:
            self._elector.wake()

    def _activate(self, ownership: Ownership) -> None:
        # only the elector calls it, so _build has made them
        assert self._engine is not None and self._collector is not None
        self._engine.activate(ownership)
        self._collector.activate(ownership)

    def _deactivate(self) -> None:
        # only the elector calls it, so _build has made them
        assert self._engine is not None and self._collector is not None
        self._collector.deactivate()
        remaining = self._stop_deadline - time.monotonic()
        self._engine.deactivate(max(0.0, min(remaining, self._drain_timeout)))

    def _elected(self, ownership: Ownership) -> None:
        if self._on_leadership is not None:
            # cast: the notifier is made with on_leadership
            cast(Notifier, self._notifier).call(self._on_leadership, list(ownership.replicas))

    def _release_staged(self, entries: list[tuple[str, int]]) -> None:
        if self._engine is not None:
            self._engine.release(entries)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop triggering, release the leadership key at once, and join every thread.

        Waits up to ``timeout`` seconds in all, first for triggers in flight to be recorded.
        Idempotent. Called from a trigger or a callback (one of this Cron's own threads, which
        stopping waits for), it starts the stop and returns at once; the Cron reaches STOPPED
        once that trigger or callback has returned, and :meth:`run` then returns.

        :raises StopTimeoutError: naming the threads that did not stop in time (for example a
            trigger that never returns).
        """
        deadline = time.monotonic() + timeout
        own = threading.current_thread() in self._threads_or_none()
        with self._state_cond:
            if self._state is CronState.NEW:
                self._set_state_locked(CronState.STOPPED)
                self._client.close()
                return
            if self._state is CronState.STOPPING:
                if not own:
                    self._state_cond.wait_for(lambda: self._state is CronState.STOPPED, timeout)
                return
            if self._state is CronState.STOPPED:
                return
            self._set_state_locked(CronState.STOPPING)
        self._stop_deadline = deadline
        if own:
            threading.Thread(target=self._shut_down, args=(deadline, timeout, True),
                             name="etcdcron-stop").start()
            return
        self._shut_down(deadline, timeout, False)

    def _threads_or_none(self) -> list[threading.Thread]:
        return self._threads() if self._engine is not None else []

    def _shut_down(self, deadline: float, timeout: float, detached: bool) -> None:
        # The election thread ends the session first, waiting for results in flight; only then
        # does the shared stop event make every other thread abandon its etcd retries.
        # Only a started (so fully built) Cron shuts down.
        assert self._elector is not None and self._engine is not None
        assert self._collector is not None and self._lease is not None
        self._elector.halt()
        self._elector.thread.join(max(0.0, deadline - time.monotonic()))
        # Triggers handed over when the session ended are still recorded, within the timeout.
        self._engine.wait_handed_over(max(0.0, deadline - time.monotonic()))
        self._stop_event.set()
        self._elector.watch.stop()
        self._engine.stop()
        self._collector.stop()
        self._lease.stop()
        if self._notifier is not None:
            self._notifier.stop()
        alive = []
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                alive.append(thread.name)
        self._client.close()
        self._metrics.close()
        with self._state_cond:
            self._set_state_locked(CronState.STOPPED)
        if alive:
            error = StopTimeoutError(f"threads still running {timeout}s after stop(): "
                                     f"{', '.join(alive)}")
            if not detached:
                raise error
            self._log.error("%s", error)

    def run(self) -> None:
        """Start, and block until :meth:`stop` is called from another thread (or Ctrl-C)."""
        self.start()
        try:
            with self._state_cond:
                self._state_cond.wait_for(lambda: self._state is CronState.STOPPED)
        except KeyboardInterrupt:
            self.stop()
            raise

    def __enter__(self) -> Cron:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _loops(self) -> list[Loop]:
        if self._engine is None:
            return []
        if TYPE_CHECKING:  # _build makes them all (a partly built Cron fails here as before)
            assert self._collector and self._lease and self._elector
        loops = [*self._lease.loops, *self._elector.loops, *self._engine.loops,
                 self._collector.loop]
        if self._notifier is not None:
            loops.append(self._notifier.loop)
        return loops

    def health(self) -> Health:
        """What every background thread is doing, and what could not be done.

        Per thread: whether it is alive, when it last made progress and its last error; plus
        the jobs whose results etcd refused (retried until written) and the owned jobs that
        cannot be scheduled. ``health().ok`` is what a readiness probe wants; ``problems``
        says what is wrong, a line each.
        """
        engine = self._engine
        return Health(
            state=self._state,
            election=self.election_state,
            elected=self.is_elected(),
            threads={loop.name: loop.health() for loop in self._loops()},
            unrecorded=tuple(engine.unrecorded) if engine else (),
            unschedulable=engine.unschedulable if engine else {},
            stuck=tuple(engine.pool.stuck()) if engine else (),
        )

    def is_elected(self) -> bool:
        """Whether this replica owns its partition(s) and is triggering."""
        return self._elector is not None and self._elector.is_elected()

    def wait_elected(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`is_elected`; returns False if ``timeout`` seconds pass first.

        :raises LifecycleError: if the Cron was never started.
        """
        if self._elector is None:
            raise LifecycleError("wait_elected() needs start() first")
        return self._elector.wait_elected(timeout)

    @property
    def election_state(self) -> ElectionState | None:
        return self._elector.state if self._elector is not None else None

    # -- jobs ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is CronState.STOPPED:
            raise LifecycleError("this Cron is stopped")

    def add(self, name: str, job: api_pb2.Job) -> None:
        """Create or replace the job ``name``; a replaced job starts afresh (new version).

        :raises ValidationError: if the name or the job is invalid (nothing is written).
        """
        self._check_open()
        self._store.add(name, job)

    def add_if_not_exists(self, name: str, job: api_pb2.Job) -> None:
        """Create the job ``name`` in one create-only transaction.

        :raises JobExistsError: if a job of that name exists.
        :raises ValidationError: if the name or the job is invalid.
        """
        self._check_open()
        self._store.add_if_not_exists(name, job)

    def get(self, name: str) -> api_pb2.Job | None:
        """The job ``name`` as stored (with its default failure policy), or ``None``."""
        self._check_open()
        return self._store.get(name)

    def delete(self, name: str) -> None:
        """Delete the job ``name`` (and its counter); a missing job is not an error."""
        self._check_open()
        self._store.delete(name)

    def pause(self, name: str) -> None:
        """Pause the job ``name`` on every replica, across restarts: it keeps its counter and
        fires nothing until :meth:`resume`. A trigger in flight finishes and is recorded.

        :raises JobNotFoundError: (a ``LookupError``) if there is no such job.
        """
        self._check_open()
        self._store.pause(name)

    def resume(self, name: str) -> None:
        """Resume the job ``name``. Ticks that came due while it was paused are skipped, never
        caught up (a one-shot whose time passed meanwhile is finished and deleted).

        :raises JobNotFoundError: (a ``LookupError``) if there is no such job.
        """
        self._check_open()
        self._store.resume(name)

    def delete_prefixes(self, *prefixes: str) -> None:
        """Delete every job whose name starts with one of ``prefixes``, in one transaction."""
        self._check_open()
        self._store.delete_prefixes(*prefixes)

    def list(self, prefix: str = "") -> list[api_pb2.NamedJob]:
        """Every job whose name starts with ``prefix``, as :class:`NamedJob`, sorted by name."""
        self._check_open()
        return self._store.list(prefix)

    def deliverable_prefixes(self, *prefixes: str) -> DeliverableHandle:
        """Mark job names starting with ``prefixes`` deliverable on this replica.

        Jobs parked after returning UNDELIVERABLE fire at once when a matching prefix is
        registered. Registrations are reference counted: the returned handle's ``cancel()`` (or
        leaving it as a context manager) removes this one.
        """
        if not prefixes:
            raise ValidationError("deliverable_prefixes needs at least one prefix")
        return self._staging.register(tuple(validate_prefix(p) for p in prefixes))

    def status(self, name: str) -> JobStatus | None:
        """Where the job ``name`` stands: its count, last and next trigger, owner; or ``None``.

        Read from etcd with the engine's own rules, so it needs no :meth:`start`. ``staged`` is
        known only on the replica that owns the job (``None`` elsewhere).

        :raises EtcdCronError: if its stored record cannot be read.
        """
        self._check_open()
        return job_status(self._client, self._keys, name, LocalView.of(self._elector,
                                                                       self._staging))

    def statuses(self, prefix: str = "") -> Iterator[JobStatus]:
        """The status of every job whose name starts with ``prefix``, in name order.

        An iterator that reads etcd page by page at one revision, so it suits namespaces of any
        size; a job whose record cannot be read is logged and left out.
        """
        self._check_open()
        return job_statuses(self._client, self._keys, prefix,
                            LocalView.of(self._elector, self._staging), logger=self._logger)

    def __repr__(self) -> str:
        return (f"<Cron namespace={self._keys.namespace!r} replica_id={self.replica_id!r} "
                f"state={self._state.name}>")
