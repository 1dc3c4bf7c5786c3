"""Tests for etcdcron.validation: job names, prefixes, and prepare_job (DESIGN.md section 3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from etcdcron import (
    EtcdCronError,
    FailurePolicy,
    FailurePolicyConstant,
    FailurePolicyDrop,
    Job,
    ValidationError,
)
from etcdcron._pb import stored_pb2
from etcdcron.validation import prepare_job, validate_name, validate_prefix

pytestmark = pytest.mark.unit

UTC = timezone.utc
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def rejected(name: str, job: object, now: datetime = NOW) -> str:
    """The message of the ValidationError that prepare_job raises."""
    with pytest.raises(ValidationError) as info:
        prepare_job(name, job, now)
    return str(info.value)


def constant(seconds: int = 1, nanos: int = 0, max_retries: int | None = None) -> FailurePolicy:
    policy = FailurePolicyConstant(interval=Duration(seconds=seconds, nanos=nanos))
    if max_retries is not None:
        policy.max_retries = max_retries
    return FailurePolicy(constant=policy)


# -- names ---------------------------------------------------------------------------------------

VALID_NAMES = [
    "fo.o",
    "foo||foo",
    "foo.BAR_f-oo||foo",
    "hello world",
    "a",
    "A",
    "a:b",
    "0",
    "tenant-a||job-1",
    "a" * 253,
    "a" * 253 + "||" + "b" * 253,
    "a_" * 200 + "a",  # 401 chars, 201 after removing '_': the limit applies after removal
]


@pytest.mark.parametrize("name", VALID_NAMES, ids=lambda n: n[:30])
def test_validate_name_accepts_and_returns_the_name(name):
    assert validate_name(name) == name


INVALID_NAMES = [
    "/",
    "foo/",
    "foo/bar",
    ".",
    "..",
    "./.",
    "fo...o",
    ".foo",
    "foo.",
    "||",
    "foo||",
    "||foo",
    "foo||||bar",
    "foo|bar",
    " ",
    "_",
    "a" * 254,
    "foo||" + "b" * 254,
    "caf\u00e9",
    "foo\n",
]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_validate_name_rejects_and_quotes_the_name(name):
    with pytest.raises(ValidationError) as info:
        validate_name(name)
    message = str(info.value)
    assert "job name" in message
    assert repr(name) in message


def test_validate_name_rejects_empty():
    with pytest.raises(ValidationError) as info:
        validate_name("")
    assert "job name" in str(info.value)
    assert "empty" in str(info.value)


@pytest.mark.parametrize("name", [None, 5, b"foo", ["foo"]], ids=repr)
def test_validate_name_rejects_non_str(name):
    with pytest.raises(ValidationError) as info:
        validate_name(name)
    message = str(info.value)
    assert "job name" in message
    assert type(name).__name__ in message
    assert repr(name) in message


def test_validation_error_is_a_value_error():
    with pytest.raises(ValueError):
        validate_name("foo/")
    with pytest.raises(EtcdCronError):
        validate_name("foo/")


# -- prefixes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "tenant-a||", "foo", "a.b"])
def test_validate_prefix_accepts(prefix):
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "a/b", "tenant/"])
def test_validate_prefix_rejects_slash(prefix):
    with pytest.raises(ValidationError) as info:
        validate_prefix(prefix)
    assert "prefix" in str(info.value)
    assert repr(prefix) in str(info.value)


@pytest.mark.parametrize("prefix", [None, 3, b"foo"], ids=repr)
def test_validate_prefix_rejects_non_str(prefix):
    with pytest.raises(ValidationError) as info:
        validate_prefix(prefix)
    assert "prefix" in str(info.value)
    assert type(prefix).__name__ in str(info.value)


# -- prepare_job: single failures ----------------------------------------------------------------

@pytest.mark.parametrize("job, expected", [
    (Job(), ["'x'", "schedule", "due_time"]),
    (Job(ttl="10s", repeats=1), ["schedule", "due_time"]),
    (Job(schedule="@every 1s", repeats=0), ["repeats", "0"]),
    (Job(due_time="1s", repeats=0), ["repeats", "0"]),
    (Job(due_time="1s", repeats=2), ["repeats=2", "schedule"]),
    (Job(due_time="1s", ttl="10s"), ["ttl='10s'", "schedule"]),
    (Job(schedule="bogus"), ["schedule", "'bogus'"]),
    (Job(schedule="0 0 0 30 2 *"), ["schedule", "'0 0 0 30 2 *'", "never"]),
    (Job(schedule="@every 0s"), ["schedule", "'@every 0s'", "positive"]),
    (Job(schedule="@every -1s"), ["schedule", "'@every -1s'", "positive"]),
    (Job(schedule="* * * * *"), ["schedule", "'* * * * *'", "seconds"]),
    (Job(schedule="0 0 0 * * * *"), ["schedule", "'0 0 0 * * * *'", "6 fields"]),
    (Job(due_time="bogus"), ["due_time", "'bogus'"]),
    (Job(due_time="R5/2026-01-02T00:00:00Z/PT1H"), ["due_time", "'R5/2026-01-02T00:00:00Z/PT1H'"]),
    (Job(due_time="2026-01-02T15:04:05"), ["due_time", "'2026-01-02T15:04:05'"]),
    (Job(schedule="@every 1s", ttl="bogus"), ["ttl", "'bogus'"]),
    (Job(schedule="@every 1s", due_time="10s", ttl="-1s"), ["ttl", "'-1s'", "before the due time"]),
    (Job(schedule="@every 1s", due_time="2026-01-02T04:00:00Z", ttl="2026-01-02T03:59:59Z"),
     ["ttl", "'2026-01-02T03:59:59Z'", "before the due time"]),
    (Job(schedule="@every 1s", failure_policy=FailurePolicy()),
     ["failure_policy", "drop", "constant"]),
    (Job(schedule="@every 1s", failure_policy=constant(seconds=-1)),
     ["failure_policy.constant.interval", "negative"]),
    (Job(schedule="@every 1s", failure_policy=constant(seconds=0, nanos=-1)),
     ["failure_policy.constant.interval", "negative"]),
], ids=lambda v: str(v).replace("\n", " ")[:60] if not isinstance(v, list) else "")
def test_prepare_job_rejects(job, expected):
    message = rejected("x", job)
    for part in expected:
        assert part in message


def test_prepare_job_rejection_names_the_expiration_and_due_time():
    message = rejected("x", Job(schedule="@every 1s", due_time="10s", ttl="-1s"))
    assert (NOW + timedelta(seconds=9)).isoformat() in message
    assert (NOW + timedelta(seconds=10)).isoformat() in message


def test_prepare_job_negative_interval_message_shows_the_value_readably():
    message = rejected("x", Job(schedule="@every 1s", failure_policy=constant(seconds=-1)))
    assert "got -1s" in message


@pytest.mark.parametrize("job", ["x", {"schedule": "@every 1s"}, None, FailurePolicy(),
                                 stored_pb2.Job()], ids=lambda v: type(v).__name__)
def test_prepare_job_rejects_non_job(job):
    message = rejected("x", job)
    assert "job" in message
    assert "Job" in message
    assert type(job).__name__ in message


def test_prepare_job_rejects_a_bad_name():
    message = rejected("foo/", Job(schedule="@every 1s"))
    assert "job name" in message
    assert "'foo/'" in message


# -- prepare_job: the first failure in DESIGN order wins ----------------------------------------

@pytest.mark.parametrize("name, job, first, not_reported", [
    # 1 name before everything
    ("foo/", Job(), "'foo/'", "due_time"),
    ("foo/", "not a job", "'foo/'", "etcdcron.Job"),
    # 2 schedule-or-due_time before 3 repeats
    ("x", Job(repeats=0), "must have a schedule or a due_time", "repeats"),
    # 2 before 4 ttl
    ("x", Job(ttl="bogus"), "must have a schedule or a due_time", "ttl"),
    # 3 repeats before 4 ttl
    ("x", Job(due_time="1s", repeats=2, ttl="5s"), "repeats=2", "ttl"),
    ("x", Job(due_time="1s", repeats=0, ttl="5s"), "repeats must be greater than 0", "ttl"),
    # 3 repeats before 6 due_time parse
    ("x", Job(due_time="bogus", repeats=0), "repeats", "due_time"),
    # 4 ttl-needs-schedule before 6 due_time parse
    ("x", Job(due_time="bogus", ttl="5s"), "ttl='5s' needs a schedule", "bogus"),
    # 5 schedule before 6 due_time / ttl
    ("x", Job(schedule="bogus", due_time="nonsense"), "'bogus'", "nonsense"),
    ("x", Job(schedule="0 0 0 30 2 *", due_time="nonsense"), "never", "nonsense"),
    ("x", Job(schedule="@every 0s", ttl="nonsense"), "'@every 0s'", "nonsense"),
    # 6 due_time before ttl
    ("x", Job(schedule="@every 1s", due_time="bogus", ttl="nonsense"), "due_time 'bogus'", "nonsense"),
    # 6 ttl before 7 failure policy
    ("x", Job(schedule="@every 1s", ttl="bogus", failure_policy=FailurePolicy()), "ttl 'bogus'",
     "failure_policy"),
    ("x", Job(schedule="@every 1s", due_time="10s", ttl="-1s", failure_policy=constant(-5)),
     "before the due time", "failure_policy"),
])
def test_prepare_job_reports_the_first_failure_in_design_order(name, job, first, not_reported):
    message = rejected(name, job)
    assert first in message
    assert not_reported not in message


# -- prepare_job: accepted jobs and their records ------------------------------------------------

@pytest.mark.parametrize("job", [
    Job(due_time="10s"),
    Job(due_time="10s", repeats=1),
    Job(schedule="@every 1s", repeats=1),
    Job(schedule="@every 1s", repeats=5),
    Job(schedule="*/5 * * * * *", ttl="1h"),
    Job(schedule="@daily", due_time="2026-01-03T00:00:00Z", ttl="P1D"),
    Job(schedule="@every 1s", due_time="10s", ttl="0s"),
    Job(schedule="@every 1s", failure_policy=FailurePolicy(drop=FailurePolicyDrop())),
    Job(schedule="@every 1s", failure_policy=constant(seconds=0)),
    Job(schedule="TZ=America/New_York 0 30 2 * * *"),
], ids=lambda j: str(j).replace("\n", " ")[:60])
def test_prepare_job_accepts(job):
    record = prepare_job("x", job, NOW)
    assert isinstance(record, stored_pb2.Job)
    assert record.job.schedule == job.schedule
    assert record.job.due_time == job.due_time


def test_schedule_job_starts_now():
    record = prepare_job("x", Job(schedule="@every 1s"), NOW)
    assert record.WhichOneof("begin") == "start"
    assert record.start == ts(NOW)
    assert not record.HasField("due_time")
    assert not record.HasField("expiration")


def test_start_is_the_instant_of_now_in_any_zone():
    tokyo = timezone(timedelta(hours=9))
    record = prepare_job("x", Job(schedule="@every 1s"), NOW.astimezone(tokyo))
    assert record.start == ts(NOW)


@pytest.mark.parametrize("due_time, expected", [
    ("10s", NOW + timedelta(seconds=10)),
    ("1h30m", NOW + timedelta(hours=1, minutes=30)),
    ("250ms", NOW + timedelta(milliseconds=250)),
    ("-5s", NOW - timedelta(seconds=5)),
    ("0s", NOW),
    ("PT1H", NOW + timedelta(hours=1)),
    ("P1DT2H", NOW + timedelta(days=1, hours=2)),
    ("2026-03-04T05:06:07Z", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)),
    ("2026-03-04T05:06:07.5+02:00", datetime(2026, 3, 4, 3, 6, 7, 500000, tzinfo=UTC)),
])
def test_due_time_is_stored_as_an_instant(due_time, expected):
    for job in (Job(due_time=due_time), Job(schedule="@every 1s", due_time=due_time)):
        record = prepare_job("x", job, NOW)
        assert record.WhichOneof("begin") == "due_time"
        assert record.due_time == ts(expected)
        assert not record.HasField("start")


@pytest.mark.parametrize("job, expiration", [
    # counted from now without a due time
    (Job(schedule="@every 1s", ttl="10s"), NOW + timedelta(seconds=10)),
    (Job(schedule="@every 1s", ttl="PT2H"), NOW + timedelta(hours=2)),
    (Job(schedule="@every 1s", ttl="2026-05-06T07:08:09Z"), datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)),
    # counted from the due time when there is one
    (Job(schedule="@every 1s", due_time="1m", ttl="10s"), NOW + timedelta(minutes=1, seconds=10)),
    (Job(schedule="@every 1s", due_time="2026-02-01T00:00:00Z", ttl="1h"),
     datetime(2026, 2, 1, 1, 0, 0, tzinfo=UTC)),
    (Job(schedule="@every 1s", due_time="2026-01-31T00:00:00Z", ttl="P1M"),
     datetime(2026, 2, 28, 0, 0, 0, tzinfo=UTC)),
    # an absolute ttl is absolute even with a due time
    (Job(schedule="@every 1s", due_time="1m", ttl="2026-05-06T07:08:09Z"),
     datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)),
    # equal to the due time is allowed
    (Job(schedule="@every 1s", due_time="10s", ttl="0s"), NOW + timedelta(seconds=10)),
    (Job(schedule="@every 1s", due_time="2026-02-01T00:00:00Z", ttl="2026-02-01T00:00:00Z"),
     datetime(2026, 2, 1, tzinfo=UTC)),
], ids=lambda v: str(v).replace("\n", " ")[:50])
def test_expiration(job, expiration):
    record = prepare_job("x", job, NOW)
    assert record.HasField("expiration")
    assert record.expiration == ts(expiration)


def test_missing_failure_policy_is_stored_as_constant_1s_3_retries():
    job = Job(schedule="@every 1s")
    record = prepare_job("x", job, NOW)
    policy = record.job.failure_policy
    assert record.job.HasField("failure_policy")
    assert policy.WhichOneof("policy") == "constant"
    assert policy.constant.interval == Duration(seconds=1)
    assert policy.constant.HasField("max_retries")
    assert policy.constant.max_retries == 3
    assert not job.HasField("failure_policy"), "the caller's job must not be modified"


def test_record_job_is_the_input_plus_the_default_policy():
    payload, metadata = Any(), Any()
    payload.Pack(Duration(seconds=42))
    metadata.Pack(Timestamp(seconds=7))
    job = Job(schedule="*/5 * * * * *", due_time="10s", ttl="1h", repeats=3, payload=payload,
              metadata=metadata)
    expected = Job()
    expected.CopyFrom(job)
    expected.failure_policy.CopyFrom(constant(seconds=1, max_retries=3))
    assert prepare_job("x", job, NOW).job == expected


@pytest.mark.parametrize("policy", [
    FailurePolicy(drop=FailurePolicyDrop()),
    constant(seconds=5),
    constant(seconds=0, nanos=500_000_000, max_retries=0),
    constant(seconds=2, max_retries=10),
], ids=lambda p: str(p).replace("\n", " "))
def test_explicit_failure_policy_is_kept(policy):
    job = Job(schedule="@every 1s", failure_policy=policy)
    record = prepare_job("x", job, NOW)
    assert record.job == job
    assert record.job.failure_policy == policy


def test_partition_id_is_random_per_call():
    job = Job(schedule="@every 1s")
    ids = {prepare_job("x", job, NOW).partition_id for _ in range(5)}
    assert len(ids) == 5
    assert all(0 <= pid < 2 ** 64 for pid in ids)


def test_record_round_trips_through_the_wire():
    record = prepare_job("x", Job(schedule="@every 1s", due_time="1s", ttl="1m"), NOW)
    decoded = stored_pb2.Job.FromString(record.SerializeToString())
    assert decoded == record
