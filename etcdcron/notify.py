"""The notifier thread (``etcdcron-notify``): runs ``on_leadership`` and ``consumer_sink``.

User callbacks never run on the lease, election or watch threads: those threads only queue a
call here, and this thread runs the calls in order, logging any exception they raise.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

_STOP = object()


class Notifier:
    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="etcdcron-notify", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def call(self, function: Callable, *args) -> None:
        """Run ``function(*args)`` on the notifier thread, after every call queued before it."""
        self._queue.put((function, args))

    def stop(self) -> None:
        """Stop after running every call queued so far."""
        self._queue.put(_STOP)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            function, args = item
            try:
                function(*args)
            except Exception:
                self._log.exception("etcdcron callback %r raised", function)
