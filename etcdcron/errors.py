"""The exceptions etcdcron raises. Every one derives from :class:`EtcdCronError`.

Where an error resembles a builtin, it also derives from that builtin, so ``except ValueError``
keeps working for callers that do not know etcdcron.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

__all__ = [
    "EtcdCronError",
    "ValidationError",
    "JobExistsError",
    "JobNotFoundError",
    "EtcdError",
    "EtcdUnavailableError",
    "LifecycleError",
    "StopTimeoutError",
]


class EtcdCronError(Exception):
    """Root of every error raised by etcdcron."""


class ValidationError(EtcdCronError, ValueError):
    """A job, a name or an option is invalid. Nothing was written to etcd."""


class JobExistsError(EtcdCronError):
    """:meth:`Cron.add_if_not_exists` found a job of that name."""

    def __init__(self, name: str):
        super().__init__(f"job already exists: {name!r}")
        self.name = name


class JobNotFoundError(EtcdCronError, LookupError):
    """:meth:`Cron.pause` or :meth:`Cron.resume` named a job that does not exist."""

    def __init__(self, name: str):
        super().__init__(f"no such job: {name!r}")
        self.name = name


class EtcdError(EtcdCronError):
    """etcd refused or failed a request.

    :ivar code: the :class:`grpc.StatusCode` of the failure, or ``None``.
    :ivar details: the server's or the transport's description of the failure.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class EtcdUnavailableError(EtcdError, ConnectionError):
    """etcd could not be reached, or kept failing, until the request's deadline passed."""


class LifecycleError(EtcdCronError, RuntimeError):
    """A :class:`Cron` was used in a state that does not allow it (e.g. started after stop)."""


class StopTimeoutError(EtcdCronError, TimeoutError):
    """:meth:`Cron.stop` gave up waiting for some of its threads; their names are in the message."""
