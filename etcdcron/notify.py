"""The notifier thread (``etcdcron-notify``): runs ``on_leadership`` and ``consumer_sink``.

User callbacks never run on the lease, election or watch threads: those threads only queue a
call here, and this thread runs the calls in order, logging any exception they raise
(``BaseException`` included: a callback's ``SystemExit`` does not end the thread).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from etcdcron.supervise import Loop

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

_STOP = object()


class Notifier:
    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or log
        # (function, args) to call, or _STOP
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self.loop = Loop("etcdcron-notify", self._loop, stopping=self._stopped.is_set,
                         wait=self._stopped.wait, logger=self._log)
        self.thread = self.loop.thread

    def start(self) -> None:
        self.loop.start()

    def call(self, function: Callable[..., object], *args: object) -> None:
        """Run ``function(*args)`` on the notifier thread, after every call queued before it."""
        self._queue.put((function, args))

    def stop(self) -> None:
        """Stop after running every call queued so far."""
        self._stopped.set()
        self._queue.put(_STOP)

    def _loop(self, loop: Loop) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            function, args = item
            try:
                function(*args)
            except BaseException as exc:  # noqa: BLE001 - user code must not end this thread
                self._log.error("etcdcron callback %r raised", function, exc_info=exc)
            loop.progress()
