"""Where things live in etcd: ``NS/jobs/NAME``, ``NS/counters/NAME``, ``NS/leadership/ID``.

Pure helpers; any thread.
"""

from __future__ import annotations

__all__ = ["Keys", "prefix_end"]


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

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.jobs = f"{namespace}/jobs/".encode()
        self.counters = f"{namespace}/counters/".encode()
        self.leadership = f"{namespace}/leadership/".encode()

    def job(self, name: str) -> bytes:
        return self.jobs + name.encode()

    def counter(self, name: str) -> bytes:
        return self.counters + name.encode()

    def leader(self, replica_id: str) -> bytes:
        return self.leadership + replica_id.encode()

    def job_name(self, key: bytes) -> str:
        """The job name of a ``NS/jobs/NAME`` key."""
        return key[len(self.jobs):].decode()

    def counter_name(self, key: bytes) -> str:
        """The job name of a ``NS/counters/NAME`` key."""
        return key[len(self.counters):].decode()

    def replica_id(self, key: bytes) -> str:
        """The replica id of a ``NS/leadership/ID`` key."""
        return key[len(self.leadership):].decode()
