"""Prometheus metrics of a :class:`~etcdcron.Cron`, behind a small interface that is a no-op
when metrics are off.

The engine, the election and the etcd layer each hold one :class:`Metrics` and call it from
their own threads (workers, recorder, election, any thread calling etcd). Every method is cheap
and thread-safe; the no-op does nothing at all, so the hot path costs a method call. Gauges of
state (owned jobs, staged jobs, elected, partition) are read when the registry is scraped, from
callables the Cron binds, never pushed.

``prometheus_client`` (the ``etcdcron[metrics]`` extra) is imported only by
:func:`make_metrics`, and only when metrics are asked for: without it installed nothing changes.

Every series has the labels ``namespace`` and ``replica`` (the replica id), so that several
Crons of one process share one registry: the metric families are registered once per registry
and each Cron owns its label values, which :meth:`Metrics.close` removes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from etcdcron.options import DEFAULT_REGISTRY, check_metrics_registry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from etcdcron.api import TriggerResult

__all__ = ["Metrics", "NO_METRICS", "DEFAULT_REGISTRY", "make_metrics", "METRIC_NAMES"]

#: Buckets of ``etcdcron_trigger_lateness_seconds``: from a few ms (steady state) to an hour
#: (catching up after downtime).
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 1800.0, 3600.0)
#: Buckets of ``etcdcron_trigger_duration_seconds``.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0)

_RESULTS = ("success", "failed", "undeliverable")
_LABELS = ("namespace", "replica")

#: Every metric etcdcron exports (without the ``_total``/``_bucket`` suffixes).
METRIC_NAMES = (
    "etcdcron_triggers",
    "etcdcron_trigger_lateness_seconds",
    "etcdcron_trigger_duration_seconds",
    "etcdcron_owned_jobs",
    "etcdcron_staged_jobs",
    "etcdcron_elected",
    "etcdcron_partition_index",
    "etcdcron_partition_total",
    "etcdcron_etcd_errors",
    "etcdcron_etcd_retries",
    "etcdcron_rebalances",
    "etcdcron_unrecorded_results",
)


class Metrics:
    """What etcdcron reports. This base class is the no-op used when metrics are off."""

    #: Whether anything is recorded (callers may skip work that only feeds metrics).
    enabled = False

    def trigger_done(self, result: TriggerResult, lateness: float, duration: float) -> None:
        """A trigger returned (or its Future resolved).

        :param result: the :class:`~etcdcron.TriggerResult`.
        :param lateness: seconds from the tick to the moment the trigger was called.
        :param duration: seconds the trigger took, until its result was known.
        """

    def etcd_error(self, code: str) -> None:
        """An etcd request failed for good (not retried, or retried until its deadline);
        ``code`` is the gRPC status code name, e.g. ``"UNAVAILABLE"``."""

    def etcd_retry(self, code: str) -> None:
        """An etcd request failed transiently and is retried."""

    def rebalance(self, reason: str) -> None:
        """This replica left its partitions for a new election; ``reason`` is one of
        ``membership`` (a replica joined or left), ``lease`` (the lease was lost or renewed
        too late), ``key`` (the leadership key was deleted or written by another),
        ``blocked`` (the election cannot go on), ``resigned`` (a loop kept failing),
        ``restart`` (the election loop restarted)."""

    def unrecorded(self, count: int = 1) -> None:
        """``count`` trigger results could not be recorded in etcd (they fire again)."""

    def bind_state(self, *, owned_jobs: Callable[[], int], staged_jobs: Callable[[], int],
                   elected: Callable[[], bool],
                   partition: Callable[[], tuple[int, int] | None]) -> None:
        """Callables read at each scrape: owned and staged job counts, whether elected, and
        ``(index, total)`` of the partition owned (``None`` when not elected)."""

    def close(self) -> None:
        """Remove this Cron's series (on stop)."""


#: The shared no-op instance.
NO_METRICS = Metrics()


def make_metrics(registry: object = DEFAULT_REGISTRY, *, namespace: str,
                 replica_id: str) -> Metrics:
    """The metrics of one Cron.

    :param registry: a ``prometheus_client.CollectorRegistry``; :data:`DEFAULT_REGISTRY` for
        ``prometheus_client.REGISTRY`` if installed (else no metrics); ``None`` for none.
    :raises ValidationError: if ``registry`` is not a registry.
    """
    registry = check_metrics_registry(registry)
    if registry is None:
        return NO_METRICS
    return PrometheusMetrics(_families(cast("CollectorRegistry", registry)), namespace, replica_id)


class _Families:
    """The metric families of one registry, shared by every Cron exporting into it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def kw(name: str, text: str) -> dict[str, Any]:
            return {"name": name, "documentation": text, "labelnames": _LABELS,
                    "registry": registry}

        self.triggers = Counter(**{**kw("etcdcron_triggers", "Trigger calls by result"),
                                   "labelnames": (*_LABELS, "result")})
        self.lateness = Histogram(**kw("etcdcron_trigger_lateness_seconds",
                                       "Seconds from a tick to the call of its trigger"),
                                  buckets=LATENESS_BUCKETS)
        self.duration = Histogram(**kw("etcdcron_trigger_duration_seconds",
                                       "Seconds a trigger took, until its result was known"),
                                  buckets=DURATION_BUCKETS)
        self.owned = Gauge(**kw("etcdcron_owned_jobs", "Jobs this replica owns now"))
        self.staged = Gauge(**kw("etcdcron_staged_jobs", "Jobs parked as undeliverable"))
        self.elected = Gauge(**kw("etcdcron_elected", "1 while this replica owns its "
                                  "partition(s) and triggers, else 0"))
        self.index = Gauge(**kw("etcdcron_partition_index", "Partition index owned "
                                "(-1 when not elected)"))
        self.total = Gauge(**kw("etcdcron_partition_total", "Partition total of the current "
                                "election (0 when not elected)"))
        self.etcd_errors = Counter(**{**kw("etcdcron_etcd_errors",
                                           "etcd requests that failed for good, by gRPC code"),
                                      "labelnames": (*_LABELS, "code")})
        self.etcd_retries = Counter(**{**kw("etcdcron_etcd_retries",
                                            "etcd requests retried after a transient failure, "
                                            "by gRPC code"),
                                       "labelnames": (*_LABELS, "code")})
        self.rebalances = Counter(**{**kw("etcdcron_rebalances",
                                          "Times this replica left its partitions for a new "
                                          "election, by reason"),
                                     "labelnames": (*_LABELS, "reason")})
        self.unrecorded = Counter(**kw("etcdcron_unrecorded_results",
                                       "Trigger results that could not be recorded in etcd"))
        # Guards _users: (namespace, replica) -> [how many live Crons export those labels,
        # the (metric, extra label value) pairs used with them].
        self.lock = threading.Lock()
        self._users: dict[tuple[str, str], list[Any]] = {}

    def join(self, labels: tuple[str, str]) -> None:
        with self.lock:
            self._users.setdefault(labels, [0, set()])[0] += 1

    def child(self, metric: Any, labels: tuple[str, str], value: str) -> Any:
        """The series of ``metric`` with ``labels`` and one more label ``value``."""
        with self.lock:
            self._users[labels][1].add((metric, value))
        return metric.labels(*labels, value)

    def leave(self, labels: tuple[str, str]) -> None:
        """One Cron with these labels is gone; the last one removes their series."""
        with self.lock:
            entry = self._users[labels]
            entry[0] -= 1
            if entry[0] > 0:
                return
            del self._users[labels]
        for metric, value in entry[1]:
            metric.remove(*labels, value)
        for metric in (self.lateness, self.duration, self.owned, self.staged, self.elected,
                       self.index, self.total, self.unrecorded):
            try:
                metric.remove(*labels)
            except KeyError:
                pass  # never used


# Guards _by_registry: registry -> its _Families.
_registries_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = (
    weakref.WeakKeyDictionary())


def _families(registry: CollectorRegistry) -> _Families:
    with _registries_lock:
        families = _by_registry.get(registry)
        if families is None:
            families = _by_registry[registry] = _Families(registry)
        return families


class PrometheusMetrics(Metrics):
    """Metrics exported into a ``prometheus_client`` registry."""

    enabled = True

    def __init__(self, families: _Families, namespace: str, replica_id: str):
        self._families = families
        self._labels = (namespace, replica_id)
        families.join(self._labels)
        labels = self._labels
        # Present from the start, so that rate() sees the first trigger of each result.
        self._results = {r: families.child(families.triggers, labels, r) for r in _RESULTS}
        self._lateness = families.lateness.labels(*labels)
        self._duration = families.duration.labels(*labels)
        self._unrecorded = families.unrecorded.labels(*labels)
        # Guards _closed (close() is idempotent) and _children (extra label value -> series).
        self._lock = threading.Lock()
        self._closed = False
        self._children: dict[tuple[Any, str], Any] = {}

    def trigger_done(self, result: TriggerResult, lateness: float, duration: float) -> None:
        self._results[result.name.lower()].inc()
        self._lateness.observe(max(0.0, lateness))
        self._duration.observe(max(0.0, duration))

    def _child(self, metric: Any, value: str) -> Any:
        key = (metric, value)
        child = self._children.get(key)
        if child is None:
            child = self._families.child(metric, self._labels, value)
            with self._lock:
                self._children[key] = child
        return child

    def etcd_error(self, code: str) -> None:
        self._child(self._families.etcd_errors, code).inc()

    def etcd_retry(self, code: str) -> None:
        self._child(self._families.etcd_retries, code).inc()

    def rebalance(self, reason: str) -> None:
        self._child(self._families.rebalances, reason).inc()

    def unrecorded(self, count: int = 1) -> None:
        self._unrecorded.inc(count)

    def bind_state(self, *, owned_jobs: Callable[[], int], staged_jobs: Callable[[], int],
                   elected: Callable[[], bool],
                   partition: Callable[[], tuple[int, int] | None]) -> None:
        f, labels = self._families, self._labels
        f.owned.labels(*labels).set_function(owned_jobs)
        f.staged.labels(*labels).set_function(staged_jobs)
        f.elected.labels(*labels).set_function(lambda: 1.0 if elected() else 0.0)

        def index() -> float:
            owned = partition()
            return float(owned[0]) if owned else -1.0

        def total() -> float:
            owned = partition()
            return float(owned[1]) if owned else 0.0

        f.index.labels(*labels).set_function(index)
        f.total.labels(*labels).set_function(total)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._families.leave(self._labels)
