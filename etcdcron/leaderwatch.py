"""The leadership watch: what the keys under ``NS/leadership/`` are, for the election.

:class:`LeaderWatch` runs its loop on the ``etcdcron-leader-watch`` thread, under a supervising
:class:`~etcdcron.supervise.Loop`: it lists the leadership keys, then watches them, and hands
what it sees to the election thread (:mod:`etcdcron.election`); after a compaction, an error, or
:meth:`LeaderWatch.relist` it lists again.

Only keys ``NS/leadership/ID`` whose ``ID`` is a replica id (:meth:`Keys.replica_id
<etcdcron.keys.Keys.replica_id>`) reach the election: a key whose id part holds a ``/`` belongs
to a nested namespace (``NS/leadership/leadership/x`` is namespace ``NS/leadership``'s), one
whose id is empty or not UTF-8 is no replica's; they are logged once and ignored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from etcdcron._etcd import Backoff, Compacted, EtcdClient, Stopped, WatchStream
from etcdcron.errors import EtcdError
from etcdcron.keys import Keys, prefix_end
from etcdcron.supervise import Loop

__all__ = ["LeaderWatch"]

log = logging.getLogger(__name__)

class LeaderWatch:
    """Lists and watches ``NS/leadership/``; delivers ``("snapshot", kvs, revision)`` and
    ``("events", events, revision)`` to the elector, with only replicas' keys in them.

    :param on_stuck: called with a reason when the watch keeps failing (the elector resigns:
        a replica that cannot follow the membership must not hold partitions).
    """

    def __init__(self, client: EtcdClient, keys: Keys, stop: threading.Event,
                 deliver: Callable[[tuple[Any, ...]], None], logger: logging.Logger | None = None, *,
                 on_stuck: Callable[[str], None] | None = None, stuck_after: float = 0.0):
        self._client = client
        self._log = logger or log
        self._keys = keys
        self._stop = stop
        self._deliver = deliver
        # Guards _stream, which stop() and relist() cancel from other threads, and _relist:
        # whether a relist() came since the listing now delivered or under way began.
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._relist = False
        self.loop = Loop("etcdcron-leader-watch", self._run, stopping=stop.is_set,
                         wait=stop.wait, on_stuck=on_stuck, stuck_after=stuck_after,
                         logger=self._log)
        self.thread = self.loop.thread

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self._cancel()

    def relist(self) -> None:
        """List the keys again and deliver a fresh snapshot (any thread): one listed after this
        call, however it races the loop."""
        with self._lock:
            self._relist = True
        self._cancel()

    def _cancel(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def _is_member_key(self, key: bytes) -> bool:
        return self._keys.replica_id(key) is not None

    def _run(self, loop: Loop) -> None:
        prefix = self._keys.leadership
        backoff = Backoff(cap=5.0)
        while not self._stop.is_set():
            stream = None
            try:
                with self._lock:
                    self._relist = False
                revision, kvs = self._client.list_prefix(prefix, stop=self._stop, forever=True)
                self._deliver(("snapshot", [kv for kv in kvs if self._is_member_key(kv.key)],
                               revision))
                loop.progress()
                stream = self._client.watch(prefix, prefix_end(prefix), revision + 1)
                with self._lock:
                    self._stream = stream
                    relist = self._relist
                if self._stop.is_set():
                    return
                if relist:
                    continue  # asked for while listing: list again (finally cancels the stream)
                for events in stream:
                    self._deliver(("events", [e for e in events if self._is_member_key(e.kv.key)],
                                   events[-1].kv.mod_revision))
                    loop.progress()
                    backoff.reset()
            except Stopped:
                return
            except Compacted as exc:
                self._log.info("leadership watch fell behind compaction (%s); listing again", exc)
            except EtcdError as exc:
                self._log.warning("leadership watch failed: %s; listing again", exc)
                loop.failed(exc)
                self._stop.wait(backoff.next_delay())
            finally:
                if stream is not None:
                    stream.cancel()
                    with self._lock:
                        if self._stream is stream:
                            self._stream = None
