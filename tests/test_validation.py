"""Tests for etcdcron.validation: job names, prefixes, and prepare_job (DESIGN.md section 3)."""

from __future__ import annotations

import re
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
from etcdcron.schedule import parse_point_in_time
from etcdcron.ticks import DEFAULT_FAILURE_POLICY, to_timestamp
from etcdcron.validation import (
    MAX_NAME_BYTES,
    MAX_RECORD_BYTES,
    prepare_job,
    validate_name,
    validate_prefix,
)

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

# Valid under DESIGN.md's old DNS-1123 rule, and still valid: no name valid before is refused now.
DNS1123_NAMES = [
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
    "a_" * 200 + "a",
]
# Invalid under the old rule, valid under go-etcd-cron's relaxed one (v0.12.6).
RELAXED_NAMES = [
    "fo...o",
    ".foo",
    "foo.",
    "...",
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
    "\u65e5\u672c\u8a9e",
    "user@example.com",
    "a%2Fb",
    "emoji \U0001f600",
    "zero\u200bwidth",
    "a" * MAX_NAME_BYTES,
    "\u00e9" * (MAX_NAME_BYTES // 2),
]


@pytest.mark.parametrize("name", DNS1123_NAMES + RELAXED_NAMES, ids=lambda n: repr(n[:30]))
def test_validate_name_accepts_and_returns_the_name(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name, reason", [
    ("/", "'/'"),
    ("foo/", "'/'"),
    ("foo/bar", "'/'"),
    ("./.", "'/'"),
    ("a\\b", "'\\\\'"),
    ("a#b", "'#'"),
    ("what?", "'?'"),
    ("foo\n", "'\\n'"),
    ("nul\x00", "'\\x00'"),
    ("tab\there", "'\\t'"),
    ("del\x7f", "'\\x7f'"),
    ("c1\x85", "'\\x85'"),
    ("lone\ud800", "lone surrogate"),
    (".", "'.' and '..' are not job names"),
    ("..", "'.' and '..' are not job names"),
], ids=repr)
def test_validate_name_rejects_and_quotes_the_name(name, reason):
    with pytest.raises(ValidationError) as info:
        validate_name(name)
    message = str(info.value)
    assert message.startswith(f"invalid job name {name!r}: ")
    assert reason in message


@pytest.mark.parametrize("name", ["a" * (MAX_NAME_BYTES + 1), "\u00e9" * (MAX_NAME_BYTES // 2 + 1),
                                  "\U0001f600" * (MAX_NAME_BYTES // 4 + 1), "x" * 330_000],
                         ids=lambda n: f"{len(n)} chars")
def test_validate_name_rejects_a_name_longer_than_the_limit_in_utf8(name):
    with pytest.raises(ValidationError) as info:
        validate_name(name)
    message = str(info.value)
    assert message.startswith(f"invalid job name {name[:60]!r}... ({len(name):,} characters): ")
    assert f"{len(name.encode()):,} bytes" in message
    assert f"{MAX_NAME_BYTES:,}" in message
    assert len(message) < 300


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

@pytest.mark.parametrize("prefix", ["", "tenant-a||", "foo", "a.b", ".", "..", "caf\u00e9", "|"])
def test_validate_prefix_accepts(prefix):
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "a/b", "tenant/", "a\\", "#", "a?", "x\n", "\ud800"],
                         ids=repr)
def test_validate_prefix_rejects_what_no_name_contains(prefix):
    with pytest.raises(ValidationError) as info:
        validate_prefix(prefix)
    assert str(info.value).startswith(f"invalid prefix {prefix!r}: it contains ")


def test_validate_prefix_rejects_a_prefix_longer_than_any_name():
    assert validate_prefix("p" * MAX_NAME_BYTES)
    with pytest.raises(ValidationError, match="invalid prefix 'ppp.*more than the 32,768 allowed"):
        validate_prefix("p" * (MAX_NAME_BYTES + 1))


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


# -- prepare_job: times the engine can compute (issue 6, item 5) -----------------------------------

@pytest.mark.parametrize("job, field, value", [
    (Job(schedule="TZ=America/New_York @daily", due_time="0001-01-01T00:00:00Z"),
     "due_time", "0001-01-01T00:00:00Z"),
    (Job(schedule="@every 1s", due_time="9999-12-31T23:59:59Z"), "due_time", "9999-12-31T23:59:59Z"),
    (Job(due_time="1969-12-31T23:59:59.999999Z"), "due_time", "1969-12-31T23:59:59.999999Z"),
    (Job(due_time="9999-01-01T00:00:00Z"), "due_time", "9999-01-01T00:00:00Z"),
    (Job(due_time="9998-12-31T23:00:00-01:00"), "due_time", "9998-12-31T23:00:00-01:00"),
    (Job(due_time="-P57Y"), "due_time", "-P57Y"),
    (Job(schedule="@every 1s", ttl="9999-06-01T00:00:00Z"), "ttl", "9999-06-01T00:00:00Z"),
    (Job(schedule="@every 1s", ttl="P7973Y"), "ttl", "P7973Y"),
    (Job(schedule="@every 1s", due_time="9998-12-31T00:00:00Z", ttl="P1D"), "ttl", "P1D"),
], ids=lambda v: str(v).replace("\n", " ")[:60])
def test_times_outside_the_accepted_range_are_rejected(job, field, value):
    message = rejected("x", job)
    assert message.startswith(f"invalid {field} {value!r}: ")
    assert "outside the times a job may have, from 1970-01-01T00:00:00+00:00 to before " \
           "9999-01-01T00:00:00+00:00" in message


@pytest.mark.parametrize("job", [
    Job(due_time="1970-01-01T00:00:00Z"),
    Job(due_time="9998-12-31T23:59:59.999999Z"),
    Job(schedule="TZ=Pacific/Kiritimati * * * * * *", due_time="9998-12-31T23:59:59.999999Z",
        ttl="9998-12-31T23:59:59.999999Z"),
    Job(schedule="TZ=America/New_York @daily", due_time="1970-01-01T00:00:00Z"),
    Job(schedule="@every 2562047h47m16.854775807s", due_time="9998-12-31T23:59:59Z"),
], ids=lambda j: str(j).replace("\n", " ")[:60])
def test_times_at_the_ends_of_the_accepted_range_are_accepted(job):
    assert prepare_job("x", job, NOW).job.due_time == job.due_time


@pytest.mark.parametrize("now", [datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
                                 datetime(9999, 1, 1, tzinfo=UTC)])
def test_a_clock_outside_the_accepted_range_gives_no_start(now):
    message = rejected("x", Job(schedule="@every 1s"), now)
    assert message.startswith(f"invalid start (the current time) {now.isoformat()!r}: ")


@pytest.mark.parametrize("value", ["P1000000000D", "PT1000000000000000000H", "P439456786.5W",
                                   "P99999999999999999999Y", "PT" + "9" * 5000 + "S",
                                   "9" * 5000 + "h"])
@pytest.mark.parametrize("field", ["due_time", "ttl"])
def test_huge_durations_are_validation_errors(field, value):
    job = Job(schedule="@every 1s", **{field: value})
    with pytest.raises(ValidationError) as info:
        prepare_job("x", job, NOW)
    assert str(info.value).startswith(f"invalid {field} {value!r}: ")


# -- prepare_job: durations the engine can compute (issue 11, item 9) -----------------------------

def policy(interval: timedelta | Duration, max_retries: int | None = None) -> FailurePolicy:
    duration = interval if isinstance(interval, Duration) else Duration()
    if isinstance(interval, timedelta):
        duration.FromTimedelta(interval)
    constant = FailurePolicyConstant(interval=duration)
    if max_retries is not None:
        constant.max_retries = max_retries
    return FailurePolicy(constant=constant)


GO_MAX = Duration(seconds=9_223_372_036, nanos=854_775_807)


@pytest.mark.parametrize("failure_policy, expected", [
    (policy(timedelta(days=3_000_000)), "interval of 2.592e+11s is longer than Go's longest"),
    (policy(timedelta(days=3_000_000), max_retries=0), "is longer than Go's longest"),
    (policy(Duration(seconds=9_223_372_036, nanos=854_775_808)), "is longer than Go's longest"),
    (policy(Duration(seconds=315_576_000_000)), "is longer than Go's longest"),
    (policy(timedelta(days=1), max_retries=106_752), "106752 retries every 86400s last longer"),
    (policy(timedelta(hours=1), max_retries=2**32 - 1), "leave max_retries unset to retry forever"),
], ids=lambda v: str(v).replace("\n", " ")[:60])
def test_failure_policy_intervals_the_engine_cannot_compute_are_rejected(failure_policy, expected):
    message = rejected("x", Job(schedule="@every 1s", failure_policy=failure_policy))
    assert message.startswith("failure_policy.constant")
    assert expected in message
    assert "2562047h47m16.854775807s" in message


@pytest.mark.parametrize("failure_policy", [
    policy(GO_MAX),
    policy(GO_MAX, max_retries=1),
    policy(timedelta(days=1), max_retries=106_751),
    policy(timedelta(seconds=1), max_retries=2**32 - 1),
], ids=lambda v: str(v).replace("\n", " ")[:60])
def test_failure_policy_intervals_up_to_gos_longest_duration_are_accepted(failure_policy):
    job = Job(schedule="@every 1s", failure_policy=failure_policy)
    assert prepare_job("x", job, NOW).job.failure_policy == failure_policy


def test_an_interval_with_nanos_of_a_second_or_more_is_rejected():
    message = rejected("x", Job(schedule="@every 1s",
                                failure_policy=policy(Duration(seconds=1, nanos=1_000_000_000))))
    assert message == "failure_policy.constant.interval has nanos=1000000000, more than 999999999"


def test_every_interval_is_bounded_like_a_go_duration():
    rejected_message = rejected("x", Job(schedule="@every 2562047h47m16.854775808s"))
    assert "out of range" in rejected_message
    prepare_job("x", Job(schedule="@every 2562047h47m16.854775807s"), NOW)


# -- prepare_job: sizes etcd accepts (issue 6, item 8) --------------------------------------------

def blob(size: int) -> Any:
    """An Any of exactly ``size`` bytes when serialized (a varint length may take one byte more
    or less, so the type URL evens it out)."""
    value = Any(value=b"x" * (size - 16))
    value.type_url = "t" * (size - value.ByteSize() - 2)  # 2: its tag and length
    assert value.ByteSize() == size
    return value


@pytest.mark.parametrize("field", ["payload", "metadata"])
def test_a_payload_or_metadata_over_the_limit_is_rejected(field):
    message = rejected("x", Job(due_time="1s", **{field: blob(2 * 1024 * 1024)}))
    assert message == (f"{field} takes 2,097,152 bytes, more than the 1,310,720 a job may store "
                       "(etcd refuses requests over 1.5 MiB by default)")
    rejected("x", Job(due_time="1s", **{field: blob(MAX_RECORD_BYTES + 1)}))


def test_a_record_over_the_limit_is_rejected_though_each_part_fits():
    half = blob(MAX_RECORD_BYTES // 2)
    message = rejected("x", Job(due_time="1s", payload=half, metadata=half))
    assert message.startswith("the stored record of job 'x' takes 1,3")
    assert "more than the 1,310,720 a job may store" in message


def job_of_size(size: int, now: datetime = NOW, **fields) -> Job:
    """A job (``fields`` and a payload) whose stored record, added at ``now``, takes exactly
    ``size`` bytes with the longest partition id (so at most ``size`` with any)."""
    job = Job(**(fields or {"schedule": "@every 1s", "due_time": "1s", "ttl": "1h", "repeats": 5}))
    job.payload.CopyFrom(blob(1000))
    for _ in range(3):  # varint lengths grow with the payload: converge
        job.payload.CopyFrom(blob(job.payload.ByteSize() + size - record_size(job, now)))
    assert record_size(job, now) == size
    return job


def record_size(job: Job, now: datetime) -> int:
    """The size of ``job``'s stored record as prepare_job builds it at ``now``, with the longest
    partition id, whether or not it is over the limit."""
    record = stored_pb2.Job(partition_id=2**64 - 1, job=job)
    due = parse_point_in_time(job.due_time, now) if job.HasField("due_time") else None
    (record.due_time if due else record.start).CopyFrom(to_timestamp(due or now))
    if job.HasField("ttl"):
        record.expiration.CopyFrom(to_timestamp(parse_point_in_time(job.ttl, due or now)))
    if not job.HasField("failure_policy"):
        record.job.failure_policy.CopyFrom(DEFAULT_FAILURE_POLICY)
    return record.ByteSize()


def test_the_largest_record_is_accepted():
    assert prepare_job("x", job_of_size(MAX_RECORD_BYTES), NOW).ByteSize() <= MAX_RECORD_BYTES
    # a random partition id takes 1 to 10 bytes: 10 more is over the limit whatever it is
    message = rejected("x", job_of_size(MAX_RECORD_BYTES + 10))
    assert re.match(r"the stored record of job 'x' takes 1,310,7[23]\d bytes, more than the "
                    r"1,310,720 a job may store", message)


def test_size_limits_come_after_the_design_order_checks():
    huge = blob(2 * 1024 * 1024)
    assert "due_time 'bogus'" in rejected("x", Job(due_time="bogus", payload=huge))
    assert "failure_policy" in rejected("x", Job(due_time="1s", payload=huge,
                                                 failure_policy=FailurePolicy()))
