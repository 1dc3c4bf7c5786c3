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
from etcdcron.schedule import LAST_TICK, EverySchedule, Schedule, parse_duration

__all__ = [
    "DEFAULT_FAILURE_POLICY",
    "SKIP_BUDGET",
    "Pending",
    "next_tick",
    "pending",
    "after_result",
    "after_skip",
    "catch_up",
    "to_datetime",
    "to_timestamp",
]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1

#: Ticks :func:`catch_up` skips at most in one go; the rest are skipped by the next delivery.
SKIP_BUDGET = 10_000

#: What a job without a failure policy gets: retry every second, at most 3 times.
DEFAULT_FAILURE_POLICY = api_pb2.FailurePolicy(
    constant=api_pb2.FailurePolicyConstant(interval={"seconds": 1}, max_retries=3)
)


def to_datetime(ts: Timestamp) -> datetime:
    """``ts`` as an aware datetime in UTC, truncated to microseconds.

    :raises OverflowError: if ``ts`` is outside ``datetime``'s range.
    """
    return EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)  # positional: twice as fast


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
    """The next scheduled time of ``job`` given ``counter``, or ``None`` when it is finished.

    Ticks come after the later of the last tick triggered and the last tick skipped; after a
    resume, ticks up to the resume (due while the job was paused) are skipped too.
    """
    return _next(job, counter, schedule)[0]


def _next(job: stored_pb2.Job, counter: stored_pb2.Counter,
          schedule: Schedule | None) -> tuple[datetime | None, bool]:
    """``(next tick, whether it skipped the counter's pending tick)``: in the latter case the
    counter's ``attempts`` belong to a tick that was skipped, not to this one."""
    moved = False
    if schedule is None:
        if counter.count > 0 or counter.HasField("last_skipped"):
            return None, False
        tick = _moment(job.due_time)
        resumed = _resumed(job)
        if tick is not None and resumed is not None and tick <= resumed:
            return None, True  # came due while paused: skipped, so the one-shot is over
    else:
        if job.job.HasField("repeats") and counter.count >= job.job.repeats:
            return None, False
        if counter.HasField("last_trigger") or counter.HasField("last_skipped"):
            tick = _after_moment(schedule, _anchor(counter))
        elif job.HasField("due_time"):
            tick = _moment(job.due_time)
        else:
            tick = _after(schedule, job.start)
        resumed = _resumed(job)
        if tick is not None and resumed is not None and tick <= resumed:
            tick, moved = _first_after(schedule, tick, resumed), True
    if tick is None:
        return None, moved
    if job.HasField("expiration"):
        expiration = _moment(job.expiration)
        if expiration is not None and tick > expiration:
            return None, moved
    return tick, moved


def _first_after(schedule: Schedule, tick: datetime, moment: datetime) -> datetime | None:
    """The first tick after ``moment``, on the rhythm of ``tick`` (an ``@every`` schedule keeps
    its phase; a cron schedule's ticks are where they are)."""
    if isinstance(schedule, EverySchedule):
        steps = (moment - tick) // schedule.interval + 1
        try:
            following = tick + steps * schedule.interval
        except OverflowError:
            return None
        return following if following <= LAST_TICK else None
    return schedule.next_after(moment)


def _anchor(counter: stored_pb2.Counter) -> datetime | None:
    """The later of the last tick triggered and the last tick skipped (at least one is set);
    ``None`` if it is past the end of ``datetime``."""
    moments = [_moment(getattr(counter, field)) for field in ("last_trigger", "last_skipped")
               if counter.HasField(field)]
    return None if None in moments else max(m for m in moments if m is not None)


def _resumed(job: stored_pb2.Job) -> datetime | None:
    return _moment(job.resumed) if job.HasField("resumed") else None


def _after_moment(schedule: Schedule, moment: datetime | None) -> datetime | None:
    return None if moment is None else schedule.next_after(moment)


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
    tick, moved = _next(job, counter, schedule)
    if tick is None:
        return None
    if not counter.attempts or moved:
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
                 result: TriggerResult, schedule: Schedule | None = None) -> stored_pb2.Counter:
    """The counter after delivering ``tick`` with ``result`` (SUCCESS or FAILED).

    :param schedule: the job's parsed schedule; with it, attempts left by a tick that a resume
        skipped do not count for ``tick``.
    """
    new = stored_pb2.Counter()
    new.CopyFrom(counter)
    new.job_partition_id = job.partition_id
    if new.attempts and job.HasField("resumed") and _next(job, counter, schedule)[1]:
        new.attempts = 0
    if result == TriggerResult.FAILED:
        new.attempts = min(new.attempts + 1, _UINT32_MAX)
        if _retries_left(job, new.attempts):
            return new
    new.last_trigger.CopyFrom(to_timestamp(tick))
    new.count = min(new.count + 1, _UINT32_MAX)
    new.attempts = 0
    return new


def after_skip(job: stored_pb2.Job, counter: stored_pb2.Counter, last: datetime,
               count: int) -> stored_pb2.Counter:
    """The counter after skipping ``count`` ticks, the latest of them ``last``: not triggers, so
    ``count`` and ``last_trigger`` stay; the next tick comes after ``last``."""
    new = stored_pb2.Counter()
    new.CopyFrom(counter)
    new.job_partition_id = job.partition_id
    new.skipped = min(new.skipped + count, _UINT64_MAX)
    new.last_skipped.CopyFrom(to_timestamp(last))
    new.attempts = 0
    return new


def catch_up(job: stored_pb2.Job, schedule: Schedule | None, delivery: Pending, now: datetime,
             budget: int = SKIP_BUDGET) -> tuple[datetime, int] | None:
    """Whether ``delivery``, due at ``now``, is to be skipped by the job's catch-up policy.

    - ``coalesce``: while a later tick is due too, this one is skipped (a run of missed ticks
      fires once, for the latest of them);
    - ``catch_up_window``: a delivery later than the window is skipped, with every later tick
      that is also later than the window.

    :returns: ``(latest tick skipped, ticks skipped)``, or ``None`` to deliver it. At most
        ``budget`` ticks are skipped at once; the next delivery goes on from there.
    """
    api = job.job
    coalesce = api.coalesce
    window = _window(api.catch_up_window) if api.HasField("catch_up_window") else None
    if not coalesce and window is None:
        return None
    expiration = _moment(job.expiration) if job.HasField("expiration") else None

    def later(tick: datetime) -> datetime | None:
        if schedule is None:
            return None
        following = schedule.next_after(tick)
        if following is None or (expiration is not None and following > expiration):
            return None
        return following

    tick, due, skipped, last = delivery.tick, delivery.due, 0, None
    if coalesce:
        while skipped < budget and (following := later(tick)) is not None and following <= now:
            last, tick, due, skipped = tick, following, following, skipped + 1
        if skipped == budget:
            return last, skipped  # type: ignore[return-value]  # set: skipped > 0
    if window is not None and now - due > window:
        last, skipped = tick, skipped + 1
        while skipped < budget and (following := later(tick)) is not None and \
                now - following > window:
            last, tick, skipped = following, following, skipped + 1
    return (last, skipped) if skipped else None  # type: ignore[return-value]  # set: skipped


def _window(text: str) -> timedelta | None:
    try:
        return parse_duration(text)
    except ValueError:
        return None  # validation refuses it; a foreign record's is ignored
