"""Checks a job and its name, and computes the record to store (DESIGN.md section 3).

Pure: the caller passes ``now``. Runs on the thread that calls :meth:`Cron.add`.
"""

from __future__ import annotations

import random
import re
from datetime import datetime

from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.errors import ValidationError
from etcdcron.schedule import parse_point_in_time, parse_schedule
from etcdcron.ticks import DEFAULT_FAILURE_POLICY, to_timestamp

__all__ = ["validate_name", "validate_prefix", "prepare_job"]

# A DNS-1123 subdomain: dot-separated labels of lowercase alphanumerics and '-', each starting and
# ending with an alphanumeric.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_IGNORED_IN_NAMES = str.maketrans("", "", "_:- ")


def validate_name(name: object) -> str:
    """Check a job name and return it unchanged.

    The name, with ``_ : -`` and spaces removed and lowercased, split on ``||``, must be a
    sequence of DNS-1123 subdomains (so ``foo.BAR_f-oo||foo`` and ``hello world`` are fine).

    :raises ValidationError: naming the job name and what is wrong with it.
    """
    if not isinstance(name, str):
        raise ValidationError(f"job name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValidationError("job name must not be empty")
    for segment in name.translate(_IGNORED_IN_NAMES).lower().split("||"):
        if len(segment) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(segment):
            raise ValidationError(
                f"invalid job name {name!r}: each '||'-separated part must be a DNS-1123 "
                "subdomain (letters, digits, '-', '_', ':', spaces and '.', starting and ending "
                "with a letter or digit, at most 253 characters)"
            )
    return name


def validate_prefix(prefix: object) -> str:
    """Check a job-name prefix (for :meth:`Cron.delete_prefixes` and the like)."""
    if not isinstance(prefix, str):
        raise ValidationError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    if "/" in prefix:
        raise ValidationError(f"invalid prefix {prefix!r}: job names never contain '/'")
    return prefix


def _check_failure_policy(job: api_pb2.Job) -> None:
    if not job.HasField("failure_policy"):
        return
    policy = job.failure_policy
    kind = policy.WhichOneof("policy")
    if kind is None:
        raise ValidationError("failure_policy must set either 'drop' or 'constant'")
    if kind == "constant":
        interval = policy.constant.interval
        if interval.seconds < 0 or interval.nanos < 0:
            seconds = interval.seconds + interval.nanos / 1e9
            raise ValidationError(
                f"failure_policy.constant.interval must not be negative, got {seconds:g}s"
            )


def prepare_job(name: str, job: object, now: datetime) -> stored_pb2.Job:
    """Validate ``job`` (checks in DESIGN.md order, first failure wins) and build its record.

    :param now: the current time (aware); relative times count from it.
    :returns: the record for ``NS/jobs/NAME``, with a fresh random partition id.
    :raises ValidationError: naming the offending field and value.
    """
    validate_name(name)
    if not isinstance(job, api_pb2.Job):
        raise ValidationError(f"job must be an etcdcron.Job, got {type(job).__name__}")
    has_schedule, has_due = job.HasField("schedule"), job.HasField("due_time")
    if not (has_schedule or has_due):
        raise ValidationError(f"job {name!r} must have a schedule or a due_time")
    if job.HasField("repeats"):
        if job.repeats == 0:
            raise ValidationError(f"repeats must be greater than 0, got {job.repeats}")
        if job.repeats > 1 and not has_schedule:
            raise ValidationError(f"repeats={job.repeats} needs a schedule")
    if job.HasField("ttl") and not has_schedule:
        raise ValidationError(f"ttl={job.ttl!r} needs a schedule")

    if has_schedule:
        try:
            schedule = parse_schedule(job.schedule)
        except ValueError as exc:
            raise ValidationError(f"invalid schedule {job.schedule!r}: {exc}") from exc
        if schedule.next_after(now) is None:
            raise ValidationError(f"schedule {job.schedule!r} never fires")

    record = stored_pb2.Job(partition_id=random.getrandbits(64))
    due = None
    if has_due:
        due = _point_in_time("due_time", job.due_time, now)
        record.due_time.CopyFrom(to_timestamp(due))
    else:
        record.start.CopyFrom(to_timestamp(now))
    if job.HasField("ttl"):
        expiration = _point_in_time("ttl", job.ttl, due or now)
        if due is not None and expiration < due:
            raise ValidationError(
                f"ttl={job.ttl!r} expires at {expiration.isoformat()}, before the due time "
                f"{due.isoformat()}"
            )
        record.expiration.CopyFrom(to_timestamp(expiration))
    _check_failure_policy(job)

    record.job.CopyFrom(job)
    if not job.HasField("failure_policy"):
        record.job.failure_policy.CopyFrom(DEFAULT_FAILURE_POLICY)
    return record


def _point_in_time(field: str, value: str, now: datetime) -> datetime:
    try:
        return parse_point_in_time(value, now)
    except ValueError as exc:
        raise ValidationError(f"invalid {field} {value!r}: {exc}") from exc
