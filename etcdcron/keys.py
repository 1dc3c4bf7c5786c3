"""Where things live in etcd: ``NS/jobs/NAME``, ``NS/counters/NAME``, ``NS/leadership/ID``,
``NS/inflight/NAME`` (a trigger still running after its replica's session ended), and
``NS/jobs\0/ID`` (a replica's read barrier, see :mod:`etcdcron.informer`).

Any thread. A key under one of these prefixes is this namespace's only if its last part is a
name: UTF-8 and without ``/``. Anything else is skipped wherever keys are read: a key whose part
is not UTF-8 is logged once, and a key with a ``/`` in it belongs to a nested namespace (``app``
and ``app/jobs`` side by side: ``app/jobs/jobs/x`` is ``app/jobs``'s job ``x``, not ``app``'s job
``jobs/x``), which is logged once per nested prefix.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["Keys", "prefix_end"]

log = logging.getLogger(__name__)

_MAX_SKIPPED = 10_000


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # the whole keyspace


class Keys:
    """The key layout of one namespace."""

    def __init__(self, namespace: str, logger: logging.Logger | None = None):
        self.namespace = namespace
        self.jobs = f"{namespace}/jobs/".encode()
        self.counters = f"{namespace}/counters/".encode()
        self.leadership = f"{namespace}/leadership/".encode()
        # Sorts just before jobs/, so that one watch of [inflight, end of jobs) sees both.
        self.inflight = f"{namespace}/inflight/".encode()
        # NS/jobs\0/ID: a replica's read barrier. Inside the watched range (it sorts just before
        # jobs/), yet no nested namespace's key (none has a NUL there); and where a namespace
        # nested as NS/jobs puts its own, NS/jobs/jobs\0/ID, the "/" makes it a nested key.
        self.barriers = f"{namespace}/jobs".encode() + b"\0/"
        self._log = logger or log
        # Guards _skipped: the keys (or nested prefixes) already logged as skipped.
        self._lock = threading.Lock()
        self._skipped: set[object] = set()

    def job(self, name: str) -> bytes:
        return self.jobs + name.encode()

    def counter(self, name: str) -> bytes:
        return self.counters + name.encode()

    def in_flight(self, name: str) -> bytes:
        return self.inflight + name.encode()

    def leader(self, replica_id: str) -> bytes:
        return self.leadership + replica_id.encode()

    def barrier(self, fence_key: bytes) -> bytes:
        """The read-barrier key of the replica whose leadership key is ``fence_key``."""
        return self.barriers + fence_key[len(self.leadership):]

    def job_name(self, key: bytes) -> str | None:
        """The job name of a ``NS/jobs/NAME`` key, or ``None`` if it is not one of ours."""
        return self._name(key, self.jobs, "job")

    def counter_name(self, key: bytes) -> str | None:
        """The job name of a ``NS/counters/NAME`` key, or ``None`` if it is not one of ours."""
        return self._name(key, self.counters, "counter")

    def in_flight_name(self, key: bytes) -> str | None:
        """The job name of a ``NS/inflight/NAME`` key, or ``None`` if it is not one of ours."""
        return self._name(key, self.inflight, "in-flight")

    def replica_id(self, key: bytes) -> str | None:
        """The replica id of a ``NS/leadership/ID`` key, or ``None`` if it is not one of ours."""
        return self._name(key, self.leadership, "leadership")

    def _name(self, key: bytes, prefix: bytes, kind: str) -> str | None:
        part = key[len(prefix):]
        if b"/" in part or not part:
            nested = prefix + part.partition(b"/")[0] + b"/"
            self.skip_once(nested, "skipping keys under %r: they belong to another (nested) "
                            "namespace", nested.decode(errors="replace"), level=logging.INFO)
            return None
        try:
            return part.decode()
        except UnicodeDecodeError:
            self.skip_once(key, "skipping %s key %r: its name is not UTF-8", kind, key)
            return None

    def skip_once(self, what: object, message: str, *args: object,
                  level: int = logging.WARNING) -> None:
        """Log ``message`` the first time ``what`` (a key, or a key and a revision) is skipped."""
        with self._lock:
            if what in self._skipped:
                return
            if len(self._skipped) >= _MAX_SKIPPED:
                self._skipped.clear()  # bounded: at worst a key is logged once more
            self._skipped.add(what)
        self._log.log(level, message, *args)
