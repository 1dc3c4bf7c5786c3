"""What a job does next: its next tick, when that tick is delivered, and its counter after a result.

Pure functions of a stored job, its counter and its parsed schedule (DESIGN.md section 3). They
run on whichever thread calls them (the informer, the recorder) and never read a clock.

They never raise, whatever the record (one written by another implementation included): a time
later than ``datetime`` holds (year 9999) is never reached, so a tick or a delivery there is
none and the job is finished; a time earlier than it holds is long past; counts stop at the
largest ``uint32``.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from google.protobuf.timestamp_pb2 import Timestamp

from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.api import TriggerResult
from etcdcron.schedule import Schedule

__all__ = [
    "DEFAULT_FAILURE_POLICY",
    "Pending",
    "next_tick",
    "pending",
    "after_result",
    "to_datetime",
    "to_timestamp",
]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_UINT32_MAX = 2**32 - 1

#: What a job without a failure policy gets: retry every second, at most 3 times.
DEFAULT_FAILURE_POLICY = api_pb2.FailurePolicy(
    constant=api_pb2.FailurePolicyConstant(interval={"seconds": 1}, max_retries=3)
)


def to_datetime(ts: Timestamp) -> datetime:
    """``ts`` as an aware datetime in UTC, truncated to microseconds.

    :raises OverflowError: if ``ts`` is outside ``datetime``'s range.
    """
    return EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def _moment(ts: Timestamp) -> datetime | None:
    """``ts`` as a datetime, the earliest datetime if it is earlier, ``None`` if it is later than
    any datetime."""
    try:
        return to_datetime(ts)
    except OverflowError:
        return None if ts.seconds > 0 else _EARLIEST


def to_timestamp(dt: datetime) -> Timestamp:
    delta = dt - EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return Timestamp(seconds=seconds, nanos=delta.microseconds * 1000)


class Pending(NamedTuple):
    """The delivery a job waits for: ``tick`` is the scheduled time, ``due`` when to deliver it
    (later than ``tick`` for a retry)."""

    tick: datetime
    due: datetime


def next_tick(job: stored_pb2.Job, counter: stored_pb2.Counter,
              schedule: Schedule | None) -> datetime | None:
    """The next scheduled time of ``job`` given ``counter``, or ``None`` when it is finished."""
    if schedule is None:
        if counter.count > 0:
            return None
        tick = _moment(job.due_time)
    else:
        if job.job.HasField("repeats") and counter.count >= job.job.repeats:
            return None
        if counter.HasField("last_trigger"):
            tick = _after(schedule, counter.last_trigger)
        elif job.HasField("due_time"):
            tick = _moment(job.due_time)
        else:
            tick = _after(schedule, job.start)
    if tick is None:
        return None
    if job.HasField("expiration"):
        expiration = _moment(job.expiration)
        if expiration is not None and tick > expiration:
            return None
    return tick


def _after(schedule: Schedule, ts: Timestamp) -> datetime | None:
    moment = _moment(ts)
    return None if moment is None else schedule.next_after(moment)


def _constant_policy(job: stored_pb2.Job) -> api_pb2.FailurePolicyConstant | None:
    """The job's Constant failure policy (the default one if it has none), or ``None``."""
    policy = job.job.failure_policy if job.job.HasField("failure_policy") else DEFAULT_FAILURE_POLICY
    return policy.constant if policy.WhichOneof("policy") == "constant" else None


def _retry_interval(job: stored_pb2.Job) -> timedelta:
    constant = _constant_policy(job)
    return constant.interval.ToTimedelta() if constant is not None else timedelta(0)


def pending(job: stored_pb2.Job, counter: stored_pb2.Counter,
            schedule: Schedule | None) -> Pending | None:
    """The next delivery of ``job``: its tick, retried ``attempts`` intervals later."""
    tick = next_tick(job, counter, schedule)
    if tick is None:
        return None
    if not counter.attempts:
        return Pending(tick, tick)
    try:
        return Pending(tick, tick + counter.attempts * _retry_interval(job))
    except OverflowError:  # a retry after the year 9999 (or before the year 1) never comes
        return None


def _retries_left(job: stored_pb2.Job, attempts: int) -> bool:
    """Whether a tick that failed ``attempts`` times is delivered again."""
    constant = _constant_policy(job)
    if constant is None:
        return False
    return not constant.HasField("max_retries") or attempts <= constant.max_retries


def after_result(job: stored_pb2.Job, counter: stored_pb2.Counter, tick: datetime,
                 result: TriggerResult) -> stored_pb2.Counter:
    """The counter after delivering ``tick`` with ``result`` (SUCCESS or FAILED)."""
    new = stored_pb2.Counter()
    new.CopyFrom(counter)
    new.job_partition_id = job.partition_id
    if result == TriggerResult.FAILED:
        new.attempts = min(new.attempts + 1, _UINT32_MAX)
        if _retries_left(job, new.attempts):
            return new
    new.last_trigger.CopyFrom(to_timestamp(tick))
    new.count = min(new.count + 1, _UINT32_MAX)
    new.attempts = 0
    return new
