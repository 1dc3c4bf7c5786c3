"""Staging for undeliverable jobs, and the deliverable prefixes that release them.

Jobs whose trigger returned UNDELIVERABLE wait here (by name and token) until
:meth:`Cron.deliverable_prefixes` registers a prefix of their name. Registrations are
reference counted. Called from worker threads (park), the informer (discard) and the user's
thread (register/cancel); every access holds one lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

__all__ = ["Staging", "DeliverableHandle"]


class DeliverableHandle:
    """A registration of deliverable prefixes; :meth:`cancel` (or leaving ``with``) removes it."""

    def __init__(self, staging: Staging, prefixes: tuple[str, ...]):
        self._staging = staging
        self.prefixes = prefixes
        # Guards _cancelled, so that cancel() is idempotent across threads.
        self._lock = threading.Lock()
        self._cancelled = False

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
        self._staging._unregister(self.prefixes)

    def __enter__(self) -> DeliverableHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class Staging:
    """Parked jobs and deliverable prefixes.

    :param release: called (outside the lock) with the ``(name, token)`` of parked jobs that a
        new registration makes deliverable.
    """

    def __init__(self, release: Callable[[list[tuple[str, int]]], None]):
        self._release = release
        # Guards _prefixes (prefix -> registrations) and _parked (name -> token).
        self._lock = threading.Lock()
        self._prefixes: Counter[str] = Counter()
        self._parked: dict[str, int] = {}

    def _deliverable_locked(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self._prefixes)

    def register(self, prefixes: tuple[str, ...]) -> DeliverableHandle:
        with self._lock:
            self._prefixes.update(prefixes)
            released = [(n, t) for n, t in self._parked.items()
                        if any(n.startswith(p) for p in prefixes)]
            for name, _ in released:
                del self._parked[name]
        if released:
            self._release(released)
        return DeliverableHandle(self, prefixes)

    def _unregister(self, prefixes: tuple[str, ...]) -> None:
        with self._lock:
            self._prefixes.subtract(prefixes)
            for prefix in prefixes:
                if self._prefixes[prefix] <= 0:
                    del self._prefixes[prefix]

    def park(self, name: str, token: int) -> bool:
        """Park ``name``, unless a registered prefix makes it deliverable: then return False and
        the caller triggers it again at once."""
        with self._lock:
            if self._deliverable_locked(name):
                return False
            self._parked[name] = token
            return True

    def discard(self, name: str) -> None:
        if not self._parked:  # the common case, on every load: nothing parked (a racy read
            return            # is fine: a job is parked only by its own delivery)
        with self._lock:
            self._parked.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._parked.clear()

    def __len__(self) -> int:
        """How many jobs are parked (read without the lock, for metrics)."""
        return len(self._parked)

    def parked(self) -> list[str]:
        with self._lock:
            return sorted(self._parked)
