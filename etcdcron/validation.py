"""Checks a job and its name, and computes the record to store (DESIGN.md section 3).

Pure: the caller passes ``now``. Runs on the thread that calls :meth:`Cron.add`.

Limits, so that whatever ``add()`` accepts, etcd also accepts and the engine can compute:

* Sizes, against etcd's default request limit (``--max-request-bytes``, 1.5 MiB): a job name
  takes at most :data:`MAX_NAME_BYTES`; its payload, its metadata and its whole stored record
  each at most :data:`MAX_RECORD_BYTES`. The largest ``add()`` request (record, job key twice,
  counter key twice) and a job's own result transaction (job key twice, counter key three
  times, the counter, the leadership fence) then fit with room for a namespace and a replica
  id of up to 16 KiB each.
* Times: the start (now), the due time and the expiration lie from :data:`EARLIEST_TIME` to
  before :data:`LATEST_TIME`, well inside the range ticks are computed in.
* Durations: a failure policy's retry interval, and the interval times ``max_retries``, are at
  most Go's longest duration (2562047h47m16.854775807s, about 292 years), as ``@every`` is.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone

from google.protobuf.message import Message

from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.errors import ValidationError
from etcdcron.schedule import parse_duration, parse_point_in_time, parse_schedule
from etcdcron.ticks import DEFAULT_FAILURE_POLICY, to_timestamp

__all__ = [
    "EARLIEST_TIME",
    "LATEST_TIME",
    "MAX_NAME_BYTES",
    "MAX_RECORD_BYTES",
    "validate_name",
    "validate_prefix",
    "prepare_job",
]

#: The longest job name, in bytes of UTF-8.
MAX_NAME_BYTES = 32 * 1024
#: The largest payload, metadata or stored record of one job, in bytes.
MAX_RECORD_BYTES = 1280 * 1024
#: The earliest start, due time or expiration a job may have (the Unix epoch).
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: Every start, due time and expiration of a job is before this.
LATEST_TIME = datetime(9999, 1, 1, tzinfo=timezone.utc)

_GO_MAX_NANOS = 2**63 - 1
_GO_MAX_TEXT = "2562047h47m16.854775807s (about 292 years)"

# What a job name (or a prefix of one) may not contain: '/' (it separates the key's parts),
# '\', '#', '?', control characters, and lone surrogates (not Unicode, so never UTF-8).
_FORBIDDEN = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def validate_name(name: object) -> str:
    """Check a job name and return it unchanged.

    As in go-etcd-cron (v0.12.6 on): any characters except ``/ \\ # ?`` and control
    characters, not ``.`` or ``..``, at most :data:`MAX_NAME_BYTES` in UTF-8. ``||`` has no
    special meaning here (``tenant-a||Report 1`` is one name).

    :raises ValidationError: naming the job name and what is wrong with it.
    """
    if not isinstance(name, str):
        raise ValidationError(f"job name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValidationError("job name must not be empty")
    if name in (".", ".."):
        raise ValidationError(f"invalid job name {name!r}: '.' and '..' are not job names")
    _check_characters("job name", name)
    return name


def validate_prefix(prefix: object) -> str:
    """Check a job-name prefix (for :meth:`Cron.delete_prefixes` and the like): it may be empty,
    and otherwise follows the character and length rules of :func:`validate_name`."""
    if not isinstance(prefix, str):
        raise ValidationError(f"prefix must be a str, got {type(prefix).__name__}: {prefix!r}")
    _check_characters("prefix", prefix)
    return prefix


def _check_characters(what: str, text: str) -> None:
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        char = bad.group()
        reason = ("which is not valid Unicode (a lone surrogate)" if "\ud800" <= char <= "\udfff"
                  else "which job names never contain: they may contain any character except "
                       "'/', '\\', '#', '?' and control characters")
        raise ValidationError(f"invalid {what} {_preview(text)}: it contains {char!r}, {reason}")
    # A character takes at most 4 bytes of UTF-8: encode only names that might be too long.
    if len(text) > MAX_NAME_BYTES // 4 and (size := len(text.encode())) > MAX_NAME_BYTES:
        raise ValidationError(f"invalid {what} {_preview(text)}: it takes {size:,} bytes of "
                              f"UTF-8, more than the {MAX_NAME_BYTES:,} allowed")


def _preview(text: str) -> str:
    """``repr(text)``, cut short for a long text."""
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text):,} characters)"


def _check_failure_policy(job: api_pb2.Job) -> None:
    if not job.HasField("failure_policy"):
        return
    policy = job.failure_policy
    kind = policy.WhichOneof("policy")
    if kind is None:
        raise ValidationError("failure_policy must set either 'drop' or 'constant'")
    if kind != "constant":
        return
    constant = policy.constant
    interval = constant.interval
    seconds = interval.seconds + interval.nanos / 1e9
    if interval.seconds < 0 or interval.nanos < 0:
        raise ValidationError(
            f"failure_policy.constant.interval must not be negative, got {seconds:g}s"
        )
    if interval.nanos > 999_999_999:
        raise ValidationError(
            f"failure_policy.constant.interval has nanos={interval.nanos}, more than 999999999"
        )
    nanos = interval.seconds * 1_000_000_000 + interval.nanos
    if nanos > _GO_MAX_NANOS:
        raise ValidationError(f"failure_policy.constant.interval of {seconds:g}s is longer than "
                              f"Go's longest duration, {_GO_MAX_TEXT}")
    if constant.HasField("max_retries") and nanos * constant.max_retries > _GO_MAX_NANOS:
        raise ValidationError(
            f"failure_policy.constant: {constant.max_retries} retries every {seconds:g}s last "
            f"longer than Go's longest duration, {_GO_MAX_TEXT}; leave max_retries unset to "
            "retry forever"
        )


def _check_size(field: str, message: Message) -> None:
    size = message.ByteSize()
    if size > MAX_RECORD_BYTES:
        raise ValidationError(
            f"{field} takes {size:,} bytes, more than the {MAX_RECORD_BYTES:,} a job may store "
            "(etcd refuses requests over 1.5 MiB by default)"
        )


def _check_time(field: str, value: str | None, moment: datetime) -> None:
    """:param value: the text ``moment`` was parsed from, or ``None`` for ``moment`` itself."""
    if not EARLIEST_TIME <= moment < LATEST_TIME:
        value = moment.isoformat() if value is None else value
        raise ValidationError(
            f"invalid {field} {value!r}: {moment.isoformat()} is outside the times a job may "
            f"have, from {EARLIEST_TIME.isoformat()} to before {LATEST_TIME.isoformat()}"
        )


def prepare_job(name: str, job: object, now: datetime) -> stored_pb2.Job:
    """Validate ``job`` (checks in DESIGN.md order, first failure wins; then the limits of the
    module docstring) and build its record.

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
        _check_time("start (the current time)", None, now)
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
    for field in ("catch_up_window", "trigger_timeout"):
        if job.HasField(field):
            try:
                duration = parse_duration(getattr(job, field))
            except ValueError as exc:
                raise ValidationError(f"invalid {field} {getattr(job, field)!r}: {exc}") from exc
            if field == "trigger_timeout" and not duration:
                raise ValidationError(f"trigger_timeout must be positive, got {job.trigger_timeout!r}")
    if job.HasField("payload"):
        _check_size("payload", job.payload)
    if job.HasField("metadata"):
        _check_size("metadata", job.metadata)

    record.job.CopyFrom(job)
    if not job.HasField("failure_policy"):
        record.job.failure_policy.CopyFrom(DEFAULT_FAILURE_POLICY)
    _check_size(f"the stored record of job {_preview(name)}", record)
    return record


def _point_in_time(field: str, value: str, now: datetime) -> datetime:
    try:
        moment = parse_point_in_time(value, now)
    except ValueError as exc:
        raise ValidationError(f"invalid {field} {value!r}: {exc}") from exc
    _check_time(field, value, moment)
    return moment
