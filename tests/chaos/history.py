"""The run's ground truth: every change under the namespace, in revision order, as committed.

One thread per etcd member (``chaos-history-N``) watches the whole namespace directly on that
member (never through a proxy), with raw gRPC stubs rather than etcdcron's own etcd layer, so
that a bug there cannot hide from the audit. The threads' events are merged by revision; each
revision is stamped with the wall time it first arrived on any of them, an upper bound of its
commit time that stays tight while one member is killed or frozen.

A broken stream resumes from the revision after the last one it saw. Completeness: the merged
events are complete up to :attr:`History.complete` (the highest revision any stream has seen
contiguously), so the run only ever compacts up to there; a stream that finds its revision
compacted (its member was down or frozen meanwhile) resumes after :attr:`History.complete`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass

import grpc
from etcd3.etcdrpc import kv_pb2
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

_OPTIONS = [
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True)
class Change:
    """One event: ``kind`` is ``"put"`` or ``"delete"``; ``at`` the first arrival (wall time)."""

    revision: int
    at: float
    kind: str
    key: bytes
    value: bytes

    def to_json(self) -> str:
        return json.dumps({"rev": self.revision, "at": self.at, "kind": self.kind,
                           "key": self.key.hex(), "value": self.value.hex()})

    @staticmethod
    def from_json(line: str) -> Change:
        d = json.loads(line)
        return Change(d["rev"], d["at"], d["kind"], bytes.fromhex(d["key"]),
                      bytes.fromhex(d["value"]))


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class History:
    """Records every change under ``prefix`` from ``start_revision`` on, from all ``endpoints``."""

    def __init__(self, endpoints: list[str], prefix: bytes, start_revision: int):
        self._endpoints = endpoints
        self._prefix = prefix
        # Guards _changes, _revisions, complete and _seen; _grew is notified when complete moves.
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)
        self._changes: list[Change] = []
        self._revisions: set[int] = set()
        self.complete = start_revision - 1
        self._stopping = threading.Event()
        self._calls: dict[int, object] = {}
        self._threads = [threading.Thread(target=self._follow, args=(i, start_revision),
                                          name=f"chaos-history-{i}", daemon=True)
                         for i in range(len(endpoints))]

    def start(self) -> History:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        for thread in self._threads:
            thread.join(10)

    def changes(self) -> list[Change]:
        with self._lock:
            return sorted(self._changes, key=lambda c: c.revision)

    def wait_complete(self, revision: int, timeout: float) -> bool:
        with self._grew:
            return self._grew.wait_for(lambda: self.complete >= revision, timeout)

    def _record(self, revision_seen: int, events, at: float) -> None:
        with self._lock:
            for event in events:
                kv = event.kv
                if kv.mod_revision in self._revisions:
                    continue  # a revision comes whole, from whichever stream was first
                kind = "delete" if event.type == kv_pb2.Event.DELETE else "put"
                self._changes.append(Change(kv.mod_revision, at, kind, kv.key, kv.value))
            for event in events:
                self._revisions.add(event.kv.mod_revision)
            if revision_seen > self.complete:
                self.complete = revision_seen
                self._grew.notify_all()

    def _follow(self, index: int, start_revision: int) -> None:
        channel = grpc.insecure_channel(self._endpoints[index], options=_OPTIONS)
        stub = rpc_grpc.WatchStub(channel)
        next_revision = start_revision
        while not self._stopping.is_set():
            requests: queue.SimpleQueue = queue.SimpleQueue()
            requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=self._prefix, range_end=prefix_end(self._prefix),
                start_revision=next_revision, progress_notify=True)))

            def request_iter(q=requests):
                while True:
                    item = q.get()
                    if item is None:
                        return
                    yield item

            call = stub.Watch(request_iter())
            with self._lock:
                self._calls[index] = call
            try:
                for response in call:
                    at = time.time()
                    if response.compact_revision:
                        # Compacted only up to what the merged history holds: go on from there.
                        with self._lock:
                            next_revision = max(next_revision, self.complete + 1)
                        break
                    if response.canceled:
                        break
                    if response.events:
                        seen = response.events[-1].kv.mod_revision
                        self._record(seen, response.events, at)
                        next_revision = seen + 1
                    elif not response.created:
                        self._record(response.header.revision, [], at)
                        next_revision = max(next_revision, response.header.revision + 1)
            except grpc.RpcError:
                pass
            finally:
                requests.put(None)
                call.cancel()
            if self._stopping.wait(0.2):
                break
        channel.close()
