"""etcdcron: distributed, fault-tolerant cron jobs for Python processes, stored in etcd.

Every process that runs ``Cron(...).start()`` on one namespace shares the jobs; each job fires on
exactly one live replica, at its time, across restarts, crashes, rebalancing and etcd failover.
"""

from etcdcron.api import (
    FailurePolicy,
    FailurePolicyConstant,
    FailurePolicyDrop,
    Job,
    ListResponse,
    NamedJob,
    TriggerRequest,
    TriggerResponse,
    TriggerResult,
)
from etcdcron._pb.api_pb2 import InformerEvent
from etcdcron.cron import Cron, CronState
from etcdcron.errors import (
    EtcdCronError,
    EtcdError,
    EtcdUnavailableError,
    JobExistsError,
    JobNotFoundError,
    LifecycleError,
    StopTimeoutError,
    ValidationError,
)
from etcdcron.election import ElectionState
from etcdcron.status import JobStatus

__version__ = "0.1.0"

__all__ = [
    "Cron",
    "CronState",
    "ElectionState",
    "EtcdCronError",
    "EtcdError",
    "EtcdUnavailableError",
    "FailurePolicy",
    "FailurePolicyConstant",
    "FailurePolicyDrop",
    "InformerEvent",
    "Job",
    "JobExistsError",
    "JobStatus",
    "LifecycleError",
    "ListResponse",
    "NamedJob",
    "StopTimeoutError",
    "TriggerRequest",
    "TriggerResponse",
    "TriggerResult",
    "ValidationError",
]
