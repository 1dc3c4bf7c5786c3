"""The informer thread (``etcdcron-watch``): keeps the job index in step with etcd.

While this replica holds an ownership (a session), it lists ``NS/jobs/``, ``NS/counters/`` and
``NS/inflight/`` page by page at one revision R, hands the owned jobs to the engine, then watches
``NS/inflight/`` and ``NS/jobs/`` (one range: the first sorts just before the second) from R + 1. A broken stream resumes from the last revision seen; a compacted one re-lists (the engine
reconciles). It never calls user code and never blocks on anything but etcd.
"""

from __future__ import annotations

import logging
import threading

import grpc

from etcdcron._etcd import Backoff, Compacted, EtcdClient, Stopped, WatchStream
from etcdcron.errors import EtcdError
from etcdcron.index import Ownership
from etcdcron.keys import Keys, prefix_end
from etcdcron.store import list_jobs_and_counters
from etcdcron.supervise import Loop

__all__ = ["Informer"]

log = logging.getLogger(__name__)


class Informer:
    """Feeds ``engine.load`` and ``engine.apply_events`` for the current ownership.

    :param engine: has ``load(ownership, jobs, counters, claims, revision)`` and
        ``apply_events(ownership, events)``.
    """

    def __init__(self, client: EtcdClient, keys: Keys, engine, stop: threading.Event,
                 logger: logging.Logger | None = None):
        self._client = client
        self._log = logger or log
        self._keys = keys
        self._engine = engine
        self._stop = stop
        # Guards _ownership and _stream; notified when the ownership changes or on stop.
        self._cond = threading.Condition(threading.Lock())
        self._ownership: Ownership | None = None
        self._stream: WatchStream | None = None
        self.loop = Loop("etcdcron-watch", self._run, stopping=stop.is_set, wait=stop.wait,
                         logger=self._log)
        self.thread = self.loop.thread

    def start(self) -> None:
        self.loop.start()

    def activate(self, ownership: Ownership) -> None:
        with self._cond:
            self._ownership = ownership
            self._cond.notify_all()

    def deactivate(self) -> None:
        with self._cond:
            self._ownership = None
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    def stop(self) -> None:
        self.deactivate()
        with self._cond:
            self._cond.notify_all()

    def _wait_ownership(self) -> Ownership | None:
        with self._cond:
            while self._ownership is None and not self._stop.is_set():
                self._cond.wait()
            return self._ownership

    def _run(self, loop: Loop) -> None:
        backoff = Backoff(cap=5.0)
        while not self._stop.is_set():
            ownership = self._wait_ownership()
            if ownership is None:
                return
            try:
                self._follow(ownership, loop)
                backoff.reset()
            except Stopped:
                return
            except Compacted as exc:
                self._log.info("job watch fell behind compaction (%s); listing again", exc)
            except EtcdError as exc:
                if exc.code != grpc.StatusCode.OUT_OF_RANGE:  # a page read at a compacted revision
                    self._log.warning("job watch failed: %s; listing again", exc)
                    loop.failed(exc)
                    self._stop.wait(backoff.next_delay())

    def _follow(self, ownership: Ownership, loop: Loop) -> None:
        revision = self._load(ownership)
        loop.progress()
        stream = self._client.watch(self._keys.inflight, prefix_end(self._keys.jobs),
                                    revision + 1)
        with self._cond:
            if self._ownership is not ownership:
                stream.cancel()
                return
            self._stream = stream
        for events in stream:
            self._engine.apply_events(ownership, events)
            loop.progress()

    def _load(self, ownership: Ownership) -> int:
        """List jobs, counters and in-flight keys at one revision and hand them to the engine;
        return the revision."""
        kw = {"stop": self._stop, "forever": True}
        revision, jobs, counters = list_jobs_and_counters(self._client, self._keys, **kw)
        _, claims = self._client.list_prefix(self._keys.inflight, revision=revision, **kw)
        self._engine.load(ownership, jobs, counters, claims, revision)
        return revision
