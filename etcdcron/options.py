"""Checks of :class:`~etcdcron.Cron`'s options, all made once, at construction.

Pure functions, run on the thread that builds the Cron. Every check raises a
:class:`~etcdcron.ValidationError` that names the option and the value, so that nothing can
fail later on a background thread because of an option (a total that does not fit a uint64, an
infinite TTL, a clock that returns text).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import cast

from google.protobuf import any_pb2
from google.protobuf.message import Message

from etcdcron.errors import ValidationError

__all__ = [
    "MAX_LEASE_TTL",
    "MAX_PARTITIONS",
    "MAX_WORKERS",
    "MAX_REPLICA_DATA",
    "seconds",
    "callable_or_none",
    "check_namespace",
    "check_replica_id",
    "check_partitions",
    "check_workers",
    "check_logger",
    "check_clock",
    "check_metrics_registry",
    "DEFAULT_REGISTRY",
    "pack_replica_data",
]

#: A lease longer than a day would leave a dead replica's jobs unfired for that long.
MAX_LEASE_TTL = 86_400
#: ``partition_id`` and ``partition_total`` are stored as uint64.
MAX_PARTITIONS = 2**64 - 1
#: More trigger threads than this is a mistake (use Futures for slow triggers).
MAX_WORKERS = 4096
#: The leadership key holds ``replica_data``; keep it well inside etcd's request limit.
MAX_REPLICA_DATA = 64 * 1024
#: A namespace or replica id is part of every key; keep keys short.
MAX_KEY_PART = 256

#: The default of ``Cron(metrics_registry=...)``: ``prometheus_client.REGISTRY`` when
#: ``prometheus_client`` is installed, no metrics when it is not.
DEFAULT_REGISTRY = object()


def seconds(name: str, value: object, minimum: float, maximum: float | None = None) -> float:
    """``value`` (a number of seconds or a timedelta) as float seconds, checked."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValidationError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    if value < minimum:
        raise ValidationError(f"{name} must be at least {minimum} seconds, got {value!r}")
    # Every duration ends up as a wait on a lock or an event, which has its own limit.
    limit = threading.TIMEOUT_MAX if maximum is None else min(maximum, threading.TIMEOUT_MAX)
    if value > limit:
        raise ValidationError(f"{name} must be at most {limit:g} seconds, got {value!r}")
    return float(value)


def callable_or_none(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ValidationError(f"{name} must be callable, got {value!r}")


def _key_part(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{name} must be a non-empty str, got {value!r}")
    if len(value) > MAX_KEY_PART:
        raise ValidationError(f"{name} must be at most {MAX_KEY_PART} characters, "
                              f"got {len(value)}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValidationError(f"{name} must be valid Unicode text, got {value!r}") from None
    if not value.isprintable():
        raise ValidationError(f"{name} must not contain control characters, got {value!r}")
    return value


def check_namespace(namespace: object) -> str:
    """A namespace: printable text, ``/``-separated parts none of which is empty."""
    namespace = _key_part("namespace", namespace)
    if "" in namespace.split("/"):
        raise ValidationError(f"namespace must not start or end with '/' or contain '//', "
                              f"got {namespace!r}")
    return namespace


def check_replica_id(replica_id: object) -> str:
    replica_id = _key_part("replica_id", replica_id)
    if "/" in replica_id:
        raise ValidationError(f"replica_id must not contain '/', got {replica_id!r}")
    return replica_id


def check_partitions(replica_id: object, partition_id: object,
                     partition_total: object) -> tuple[int, int] | None:
    """``(partition_id, partition_total)`` for static mode, or ``None`` for dynamic."""
    if partition_id is None and partition_total is None:
        return None
    if partition_id is None or partition_total is None:
        raise ValidationError("static mode needs both partition_id and partition_total")
    if replica_id is not None:
        raise ValidationError("give either replica_id (dynamic membership) or "
                              "partition_id/partition_total (static mode), not both")
    for name, value in (("partition_id", partition_id), ("partition_total", partition_total)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"{name} must be an int, got {value!r}")
    partition_id, partition_total = cast(int, partition_id), cast(int, partition_total)
    if not 1 <= partition_total <= MAX_PARTITIONS:
        raise ValidationError(f"partition_total must be in [1, 2**64 - 1], got {partition_total}")
    if not 0 <= partition_id < partition_total:
        raise ValidationError(f"partition_id must be in [0, {partition_total}), "
                              f"got {partition_id}")
    return partition_id, partition_total


def check_workers(workers: object) -> int:
    if workers is None:
        return min(32, (os.cpu_count() or 1) + 4)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ValidationError(f"workers must be an int >= 1 and <= {MAX_WORKERS}, got {workers!r}")
    return workers


def check_logger(logger: object) -> None:
    if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        raise ValidationError(f"logger must be a logging.Logger, got {logger!r}")


def check_clock(clock: object) -> Callable[[], float]:
    """A clock must be callable and return finite seconds since the epoch."""
    if not callable(clock):
        raise ValidationError(f"clock must be callable, got {clock!r}")
    try:
        now = clock()
    except Exception as exc:
        raise ValidationError(f"clock raised {exc!r}") from exc
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValidationError(f"clock must return seconds since the epoch, got {now!r}")
    return clock


def check_metrics_registry(registry: object) -> object | None:
    """The ``prometheus_client`` registry to export into, or ``None`` for no metrics.

    ``prometheus_client`` is imported only for :data:`DEFAULT_REGISTRY`; any other registry
    is checked by its shape (``register`` and ``collect``), so ``None`` imports nothing.
    """
    if registry is None:
        return None
    if registry is DEFAULT_REGISTRY:
        try:
            import prometheus_client
        except ImportError:
            return None
        return prometheus_client.REGISTRY
    if not (callable(getattr(registry, "register", None))
            and callable(getattr(registry, "collect", None))):
        raise ValidationError(f"metrics_registry must be a prometheus_client CollectorRegistry "
                              f"or None, got {registry!r}")
    return registry


def pack_replica_data(replica_data: object) -> any_pb2.Any | None:
    """``replica_data`` as an ``Any`` (or ``None``), checked to serialize within bounds."""
    if replica_data is None:
        return None
    if not isinstance(replica_data, Message):
        raise ValidationError(f"replica_data must be a protobuf message, got {replica_data!r}")
    packed = replica_data
    try:
        if not isinstance(replica_data, any_pb2.Any):
            packed = any_pb2.Any()
            packed.Pack(replica_data)
        size = packed.ByteSize()
        packed.SerializeToString()
    except Exception as exc:
        raise ValidationError(f"replica_data cannot be serialized: {exc}") from exc
    if size > MAX_REPLICA_DATA:
        raise ValidationError(f"replica_data must serialize to at most {MAX_REPLICA_DATA} bytes, "
                              f"got {size}")
    return cast(any_pb2.Any, packed)
