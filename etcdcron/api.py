"""The public message types: generated protobuf classes, plus :class:`TriggerResult`.

``Job``, ``FailurePolicy``, ``FailurePolicyConstant``, ``FailurePolicyDrop``, ``TriggerRequest``,
``TriggerResponse``, ``NamedJob`` and ``ListResponse`` are the classes generated from
``protos/etcdcron/_pb/api.proto`` (wire-compatible with go-etcd-cron's ``api`` package).
"""

from __future__ import annotations

import enum

from etcdcron._pb.api_pb2 import (
    FailurePolicy,
    FailurePolicyConstant,
    FailurePolicyDrop,
    Job,
    ListResponse,
    NamedJob,
    TriggerRequest,
    TriggerResponse,
)

__all__ = [
    "FailurePolicy",
    "FailurePolicyConstant",
    "FailurePolicyDrop",
    "Job",
    "ListResponse",
    "NamedJob",
    "TriggerRequest",
    "TriggerResponse",
    "TriggerResult",
]


class TriggerResult(enum.IntEnum):
    """What a trigger reports back; the numbers are ``TriggerResponseResult``'s."""

    #: The tick is done; the job moves on to its next tick.
    SUCCESS = 0
    #: The tick failed; the job's failure policy decides whether and when it is retried.
    FAILED = 1
    #: The trigger could not be delivered now; the job waits in staging until a matching
    #: :meth:`Cron.deliverable_prefixes` is registered, then fires at once.
    UNDELIVERABLE = 2
