"""The leadership watch: what the keys under ``NS/leadership/`` are, for the election.

:class:`LeaderWatch` runs on the ``etcdcron-leader-watch`` thread: it lists the leadership keys,
then watches them, and hands what it sees to the election thread (:mod:`etcdcron.election`);
after a broken stream or a compaction it lists again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from etcdcron._etcd import Backoff, Compacted, EtcdClient, Stopped, WatchStream
from etcdcron.errors import EtcdError
from etcdcron.keys import Keys, prefix_end

__all__ = ["LeaderWatch"]

log = logging.getLogger(__name__)


class LeaderWatch:
    """Lists and watches ``NS/leadership/``; queues ``("snapshot", kvs, revision)`` and
    ``("events", events)`` for the elector."""

    def __init__(self, client: EtcdClient, keys: Keys, stop: threading.Event,
                 deliver: Callable[[tuple], None], logger: logging.Logger | None = None):
        self._client = client
        self._log = logger or log
        self._keys = keys
        self._stop = stop
        self._deliver = deliver
        # Guards _stream, which stop() cancels from another thread.
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self.thread = threading.Thread(target=self._run, name="etcdcron-leader-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def _run(self) -> None:
        prefix = self._keys.leadership
        backoff = Backoff(cap=5.0)
        while not self._stop.is_set():
            try:
                revision, kvs = self._client.list_prefix(prefix, stop=self._stop, forever=True)
                self._deliver(("snapshot", kvs, revision))
                stream = self._client.watch(prefix, prefix_end(prefix), revision + 1)
                with self._lock:
                    self._stream = stream
                if self._stop.is_set():
                    return
                for events in stream:
                    self._deliver(("events", events))
                    backoff.reset()
            except Stopped:
                return
            except Compacted as exc:
                self._log.info("leadership watch fell behind compaction (%s); listing again", exc)
            except EtcdError as exc:
                self._log.warning("leadership watch failed: %s; listing again", exc)
                self._stop.wait(backoff.next_delay())
