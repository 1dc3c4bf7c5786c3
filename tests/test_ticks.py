"""Tests for etcdcron.ticks: next ticks, retries, counters after results (DESIGN.md section 3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from etcdcron import FailurePolicy, FailurePolicyConstant, FailurePolicyDrop, Job, TriggerResult
from etcdcron._pb import stored_pb2
from etcdcron.schedule import parse_schedule
from etcdcron.ticks import (
    DEFAULT_FAILURE_POLICY,
    Pending,
    after_result,
    next_tick,
    pending,
    to_datetime,
    to_timestamp,
)
from etcdcron.validation import prepare_job

pytestmark = pytest.mark.unit

UTC = timezone.utc
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SECOND = timedelta(seconds=1)
SUCCESS, FAILED = TriggerResult.SUCCESS, TriggerResult.FAILED


def setup(job: Job, now: datetime = NOW):
    """``(record, schedule)`` of ``job`` added at ``now``."""
    record = prepare_job("job", job, now)
    schedule = parse_schedule(job.schedule) if job.HasField("schedule") else None
    return record, schedule


def counter(**fields) -> stored_pb2.Counter:
    if "last_trigger" in fields:
        fields["last_trigger"] = to_timestamp(fields["last_trigger"])
    return stored_pb2.Counter(**fields)


def policy_constant(seconds: float, max_retries: int | None = None) -> FailurePolicy:
    whole = int(seconds)
    constant = FailurePolicyConstant(
        interval=Duration(seconds=whole, nanos=round((seconds - whole) * 1e9)))
    if max_retries is not None:
        constant.max_retries = max_retries
    return FailurePolicy(constant=constant)


DROP = FailurePolicy(drop=FailurePolicyDrop())


# -- conversions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("moment, seconds, nanos", [
    (datetime(1970, 1, 1, tzinfo=UTC), 0, 0),
    (datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=UTC), 1, 500_000_000),
    (datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), -1, 500_000_000),
    (NOW, 1767323045, 0),
    (NOW.replace(microsecond=123456), 1767323045, 123_456_000),
    (datetime(2026, 1, 2, 12, 4, 5, tzinfo=timezone(timedelta(hours=9))), 1767323045, 0),
])
def test_to_timestamp(moment, seconds, nanos):
    assert to_timestamp(moment) == Timestamp(seconds=seconds, nanos=nanos)
    back = to_datetime(Timestamp(seconds=seconds, nanos=nanos))
    assert back == moment
    assert back.utcoffset() == timedelta(0)


@pytest.mark.parametrize("moment", [
    datetime(2000, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    NOW + timedelta(microseconds=1),
])
def test_round_trip(moment):
    assert to_datetime(to_timestamp(moment)) == moment


def test_to_datetime_truncates_nanoseconds_to_microseconds():
    assert to_datetime(Timestamp(seconds=10, nanos=1_999)) == datetime(1970, 1, 1, 0, 0, 10, 1, tzinfo=UTC)


def test_default_failure_policy_is_constant_1s_3_retries():
    assert DEFAULT_FAILURE_POLICY.WhichOneof("policy") == "constant"
    assert DEFAULT_FAILURE_POLICY.constant.interval == Duration(seconds=1)
    assert DEFAULT_FAILURE_POLICY.constant.HasField("max_retries")
    assert DEFAULT_FAILURE_POLICY.constant.max_retries == 3


# -- next_tick -----------------------------------------------------------------------------------

def test_one_shot_fires_at_its_due_time_once():
    record, schedule = setup(Job(due_time="10s"))
    assert schedule is None
    due = NOW + 10 * SECOND
    assert next_tick(record, counter(), None) == due
    assert pending(record, counter(), None) == Pending(due, due)
    assert next_tick(record, counter(count=1, last_trigger=due), None) is None
    assert next_tick(record, counter(count=2), None) is None
    assert pending(record, counter(count=1), None) is None


def test_one_shot_in_the_past_is_still_due():
    record, _ = setup(Job(due_time="-1h"))
    assert next_tick(record, counter(), None) == NOW - timedelta(hours=1)


def test_one_shot_is_done_after_a_success():
    record, _ = setup(Job(due_time="10s"))
    done = after_result(record, counter(), NOW + 10 * SECOND, SUCCESS)
    assert next_tick(record, done, None) is None


@pytest.mark.parametrize("spec, first", [
    ("@every 1s", NOW + SECOND),
    ("@every 1m30s", NOW + timedelta(minutes=1, seconds=30)),
    ("* * * * * *", NOW + SECOND),  # strictly after start, which is itself a match
    ("5 4 3 * * *", NOW + timedelta(days=1)),  # start is a match; the next one is a day later
    ("0 * * * * *", datetime(2026, 1, 2, 3, 5, 0, tzinfo=UTC)),
    ("@hourly", datetime(2026, 1, 2, 4, 0, 0, tzinfo=UTC)),
    ("@daily", datetime(2026, 1, 3, tzinfo=UTC)),
])
def test_first_tick_without_due_time_is_the_first_schedule_time_after_start(spec, first):
    record, schedule = setup(Job(schedule=spec))
    assert next_tick(record, counter(), schedule) == first
    assert pending(record, counter(), schedule) == Pending(first, first)


@pytest.mark.parametrize("due_time, first", [
    ("2.5s", NOW + timedelta(seconds=2.5)),  # not a schedule time: fires at it anyway
    ("-10s", NOW - 10 * SECOND),
    ("2026-01-05T00:00:00.250Z", datetime(2026, 1, 5, 0, 0, 0, 250000, tzinfo=UTC)),
])
def test_first_tick_with_due_time_is_the_due_time(due_time, first):
    record, schedule = setup(Job(schedule="0 0 * * * *", due_time=due_time))
    assert next_tick(record, counter(), schedule) == first


@pytest.mark.parametrize("spec, last, following", [
    ("@every 1s", NOW + timedelta(seconds=2.5), NOW + timedelta(seconds=3.5)),
    ("@every 1h", NOW - timedelta(days=3), NOW - timedelta(days=3) + timedelta(hours=1)),
    ("0 * * * * *", datetime(2026, 1, 2, 3, 5, 0, tzinfo=UTC), datetime(2026, 1, 2, 3, 6, 0, tzinfo=UTC)),
    ("0 0 12 * * *", datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2026, 1, 2, 12, tzinfo=UTC)),
])
def test_later_ticks_follow_last_trigger(spec, last, following):
    record, schedule = setup(Job(schedule=spec))
    assert next_tick(record, counter(count=1, last_trigger=last), schedule) == following


def test_later_ticks_follow_last_trigger_not_the_due_time():
    record, schedule = setup(Job(schedule="@every 10s", due_time="5s"))
    last = NOW + 5 * SECOND
    assert next_tick(record, counter(count=1, last_trigger=last), schedule) == last + 10 * SECOND


@pytest.mark.parametrize("repeats, count, expected", [
    (1, 0, NOW + SECOND),
    (1, 1, None),
    (3, 2, NOW + SECOND),
    (3, 3, None),
    (3, 4, None),
])
def test_repeats(repeats, count, expected):
    record, schedule = setup(Job(schedule="@every 1s", repeats=repeats))
    c = counter(count=count)
    if count:
        c.last_trigger.CopyFrom(to_timestamp(NOW))
    assert next_tick(record, c, schedule) == expected
    assert (pending(record, c, schedule) is None) == (expected is None)


def test_repeats_with_due_time_first_tick_counts():
    record, schedule = setup(Job(schedule="@every 1s", due_time="10s", repeats=1))
    assert next_tick(record, counter(), schedule) == NOW + 10 * SECOND
    done = after_result(record, counter(), NOW + 10 * SECOND, SUCCESS)
    assert next_tick(record, done, schedule) is None


@pytest.mark.parametrize("last_offset, expected_offset", [
    (1, 2),
    (2, 3),  # the next tick equals the expiration: allowed
    (3, None),  # the next tick is after the expiration
    (10, None),
])
def test_expiration(last_offset, expected_offset):
    record, schedule = setup(Job(schedule="@every 1s", ttl="3s"))
    assert to_datetime(record.expiration) == NOW + 3 * SECOND
    c = counter(count=last_offset, last_trigger=NOW + last_offset * SECOND)
    expected = None if expected_offset is None else NOW + expected_offset * SECOND
    assert next_tick(record, c, schedule) == expected


def test_expiration_equal_to_due_time_fires_once():
    record, schedule = setup(Job(schedule="@every 1s", due_time="10s", ttl="0s"))
    due = NOW + 10 * SECOND
    assert next_tick(record, counter(), schedule) == due
    assert next_tick(record, after_result(record, counter(), due, SUCCESS), schedule) is None


def test_first_tick_after_expiration():
    # a cron schedule whose first tick is beyond the ttl never fires
    record, schedule = setup(Job(schedule="@daily", ttl="1h"))
    assert next_tick(record, counter(), schedule) is None
    assert pending(record, counter(), schedule) is None


def test_schedule_without_next_time_ends_the_job():
    record, _ = setup(Job(schedule="@every 1s"))
    never = parse_schedule("0 0 0 30 2 *")
    assert next_tick(record, counter(), never) is None


# -- catch-up ------------------------------------------------------------------------------------

def walk(record, schedule, until: datetime, limit: int = 100) -> tuple[list[datetime], stored_pb2.Counter]:
    """Deliver every due tick up to ``until`` successfully, as the engine does after downtime."""
    c = stored_pb2.Counter()
    ticks = []
    while (p := pending(record, c, schedule)) is not None and p.due <= until and len(ticks) < limit:
        ticks.append(p.tick)
        c = after_result(record, c, p.tick, SUCCESS)
    return ticks, c


def test_catch_up_walks_every_missed_tick_in_order():
    record, schedule = setup(Job(schedule="@every 1s"), now=NOW - 5 * SECOND)
    ticks, c = walk(record, schedule, NOW)
    assert ticks == [NOW - 4 * SECOND, NOW - 3 * SECOND, NOW - 2 * SECOND, NOW - SECOND, NOW]
    assert c.count == 5
    assert to_datetime(c.last_trigger) == NOW
    assert c.attempts == 0
    assert next_tick(record, c, schedule) == NOW + SECOND


def test_catch_up_of_a_cron_schedule_with_due_time():
    record, schedule = setup(Job(schedule="0 */15 * * * *", due_time="2026-01-02T02:00:00Z"))
    ticks, _ = walk(record, schedule, NOW)
    hour2 = datetime(2026, 1, 2, 2, tzinfo=UTC)
    assert ticks == [hour2 + timedelta(minutes=m) for m in (0, 15, 30, 45, 60)]


def test_catch_up_stops_at_repeats():
    record, schedule = setup(Job(schedule="@every 1s", repeats=3), now=NOW - 10 * SECOND)
    ticks, c = walk(record, schedule, NOW)
    assert ticks == [NOW - 9 * SECOND, NOW - 8 * SECOND, NOW - 7 * SECOND]
    assert c.count == 3
    assert pending(record, c, schedule) is None


# -- results -------------------------------------------------------------------------------------

def test_success_updates_the_counter():
    record, schedule = setup(Job(schedule="@every 1s"))
    tick = NOW + SECOND
    before = counter(count=4, attempts=2, last_trigger=NOW, job_partition_id=123)
    after = after_result(record, before, tick, SUCCESS)
    assert after == stored_pb2.Counter(job_partition_id=record.partition_id, count=5,
                                       last_trigger=to_timestamp(tick), attempts=0)
    assert before.count == 4 and before.attempts == 2, "the input counter must not change"


def test_counter_gets_the_record_partition_id():
    record, _ = setup(Job(due_time="1s"))
    for result in (SUCCESS, FAILED):
        assert after_result(record, stored_pb2.Counter(), NOW, result).job_partition_id == record.partition_id


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_default_policy_retries_the_same_tick_every_second(failures):
    record, schedule = setup(Job(schedule="@every 1s"))
    tick = NOW + SECOND
    c = stored_pb2.Counter()
    for _ in range(failures):
        c = after_result(record, c, tick, FAILED)
    assert c.attempts == failures
    assert c.count == 0
    assert not c.HasField("last_trigger")
    assert pending(record, c, schedule) == Pending(tick, tick + failures * SECOND)


def test_default_policy_gives_up_after_the_fourth_failure():
    record, schedule = setup(Job(schedule="@every 1s"))
    tick = NOW + SECOND
    c = stored_pb2.Counter()
    for _ in range(4):
        c = after_result(record, c, tick, FAILED)
    assert c == stored_pb2.Counter(job_partition_id=record.partition_id, count=1,
                                   last_trigger=to_timestamp(tick), attempts=0)
    assert pending(record, c, schedule) == Pending(tick + SECOND, tick + SECOND)


def test_one_shot_default_policy_retries_then_ends():
    record, _ = setup(Job(due_time="10s"))
    due = NOW + 10 * SECOND
    c = stored_pb2.Counter()
    dues = []
    while (p := pending(record, c, None)) is not None:
        assert p.tick == due
        dues.append(p.due)
        c = after_result(record, c, p.tick, FAILED)
    assert dues == [due, due + SECOND, due + 2 * SECOND, due + 3 * SECOND]
    assert c.count == 1


def test_drop_counts_one_failure_as_done():
    record, schedule = setup(Job(schedule="@every 1s", failure_policy=DROP))
    tick = NOW + SECOND
    c = after_result(record, stored_pb2.Counter(), tick, FAILED)
    assert c == stored_pb2.Counter(job_partition_id=record.partition_id, count=1,
                                   last_trigger=to_timestamp(tick), attempts=0)
    assert pending(record, c, schedule) == Pending(tick + SECOND, tick + SECOND)


def test_constant_without_max_retries_never_gives_up():
    record, schedule = setup(Job(schedule="@every 1m", failure_policy=policy_constant(2)))
    tick = NOW + timedelta(minutes=1)
    c = stored_pb2.Counter()
    for _ in range(100):
        c = after_result(record, c, tick, FAILED)
    assert c.attempts == 100
    assert c.count == 0
    assert pending(record, c, schedule) == Pending(tick, tick + 200 * SECOND)


@pytest.mark.parametrize("max_retries, deliveries", [(0, 1), (1, 2), (5, 6)])
def test_constant_max_retries_gives_1_plus_max_retries_deliveries(max_retries, deliveries):
    record, schedule = setup(Job(schedule="@every 1h",
                                 failure_policy=policy_constant(0.5, max_retries)))
    tick = NOW + timedelta(hours=1)
    c = stored_pb2.Counter()
    dues = []
    while (p := pending(record, c, schedule)).tick == tick:
        dues.append(p.due)
        c = after_result(record, c, p.tick, FAILED)
    assert dues == [tick + timedelta(seconds=0.5 * i) for i in range(deliveries)]
    assert c.count == 1 and c.attempts == 0


def test_failed_ticks_count_toward_repeats():
    record, schedule = setup(Job(schedule="@every 1s", repeats=2))
    c = stored_pb2.Counter()
    delivered = []
    while (p := pending(record, c, schedule)) is not None:
        delivered.append(p)
        c = after_result(record, c, p.tick, FAILED)
    first, second = NOW + SECOND, NOW + 2 * SECOND
    assert [p.tick for p in delivered] == [first] * 4 + [second] * 4
    assert c.count == 2


def test_dropped_ticks_count_toward_repeats():
    record, schedule = setup(Job(schedule="@every 1s", repeats=2, failure_policy=DROP))
    c = after_result(record, stored_pb2.Counter(), NOW + SECOND, FAILED)
    c = after_result(record, c, NOW + 2 * SECOND, FAILED)
    assert c.count == 2
    assert next_tick(record, c, schedule) is None


def test_success_resets_attempts():
    record, schedule = setup(Job(schedule="@every 1s"))
    tick = NOW + SECOND
    c = after_result(record, stored_pb2.Counter(), tick, FAILED)
    c = after_result(record, c, tick, FAILED)
    assert c.attempts == 2
    c = after_result(record, c, tick, SUCCESS)
    assert (c.count, c.attempts, to_datetime(c.last_trigger)) == (1, 0, tick)
    # the next tick starts with a full set of retries again
    nxt = tick + SECOND
    for failures in (1, 2, 3):
        c = after_result(record, c, nxt, FAILED)
        assert pending(record, c, schedule) == Pending(nxt, nxt + failures * SECOND)


# -- any record, even one validation would refuse: a defined answer, never an exception ----------

def stored(job: Job, **begin) -> stored_pb2.Job:
    """A record as another implementation may have written it (not validated)."""
    record = stored_pb2.Job(partition_id=7, job=job, **begin)
    if not job.HasField("failure_policy"):
        record.job.failure_policy.CopyFrom(DEFAULT_FAILURE_POLICY)
    return record


MAX_TS = Timestamp(seconds=253402300799, nanos=999_999_999)  # 9999-12-31T23:59:59.999999999Z
MIN_TS = Timestamp(seconds=-62135596800)  # 0001-01-01T00:00:00Z


@pytest.mark.parametrize("spec", ["TZ=America/New_York @daily", "TZ=Pacific/Kiritimati @hourly",
                                  "TZ=Etc/GMT+12 * * * * * *", "@every 1s", "@every 2562047h",
                                  "0 0 0 29 2 *"])
@pytest.mark.parametrize("stamp", [MIN_TS, MAX_TS, Timestamp(seconds=253402300799 - 86400)],
                         ids=["first", "last", "last-day"])
def test_ticks_near_the_ends_of_datetime_never_raise(spec, stamp):
    schedule = parse_schedule(spec)
    for begin in ("due_time", "start"):
        record = stored(Job(schedule=spec), **{begin: stamp})
        for c in (counter(), counter(count=1, last_trigger=to_datetime(stamp)),
                  counter(count=1, attempts=7, last_trigger=to_datetime(stamp))):
            p = pending(record, c, schedule)
            assert p is None or p.due >= p.tick
            tick = p.tick if p is not None else to_datetime(stamp)
            for result in (SUCCESS, FAILED):
                after = after_result(record, c, tick, result)
                pending(record, after, schedule)


def test_issue_examples_give_defined_answers():
    # validation refuses these due times now; a record that has them still works
    daily = stored(Job(schedule="TZ=America/New_York @daily"), due_time=MIN_TS)
    first = pending(daily, counter(), parse_schedule(daily.job.schedule))
    assert first.tick == datetime(1, 1, 1, tzinfo=UTC)
    done = after_result(daily, counter(), first.tick, SUCCESS)
    # midnight in New York (LMT, -4:56:02) on the first day the engine computes ticks for
    assert pending(daily, done, parse_schedule(daily.job.schedule)).tick == \
        datetime(1, 1, 3, 4, 56, 2, tzinfo=UTC)
    every = stored(Job(schedule="@every 1s"), due_time=Timestamp(seconds=253402300799))
    last = pending(every, counter(), parse_schedule("@every 1s"))
    assert last.tick == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    done = after_result(every, counter(), last.tick, SUCCESS)
    assert pending(every, done, parse_schedule("@every 1s")) is None  # finished: no later tick


@pytest.mark.parametrize("field", ["due_time", "start", "expiration", "last_trigger"])
@pytest.mark.parametrize("seconds", [2**63 - 1, -(2**63), 253402300800, -62135596801])
def test_timestamps_outside_datetime_never_raise(field, seconds):
    stamp = Timestamp(seconds=seconds, nanos=999_999_999)
    spec = "@every 1s"
    record = stored(Job(schedule=spec), due_time=to_timestamp(NOW))
    c = counter()
    if field == "last_trigger":
        c.last_trigger.CopyFrom(stamp)
    elif field == "expiration":
        record.expiration.CopyFrom(stamp)
    else:
        getattr(record, field).CopyFrom(stamp)
    p = pending(record, c, parse_schedule(spec))
    later = seconds > 0
    if field == "expiration":  # past the end of time: no limit; before its start: nothing left
        assert (p is None) == (not later)
    elif field == "due_time":  # never reached; or long past, due at once
        assert (p is None) == later
    else:  # no tick after the end of time; ticks from the start of time after it
        assert (p is None) == later


@pytest.mark.parametrize("seconds", [2**62, 9_223_372_036 * 1000, 315_576_000_000])
def test_a_retry_interval_too_long_for_datetime_ends_the_job(seconds):
    policy = FailurePolicy(constant=FailurePolicyConstant(interval=Duration(seconds=seconds)))
    record = stored(Job(schedule="@every 1s", failure_policy=policy), start=to_timestamp(NOW))
    schedule = parse_schedule("@every 1s")
    failed = after_result(record, counter(), NOW + SECOND, FAILED)
    assert failed.attempts == 1
    assert pending(record, failed, schedule) is None


def test_a_retry_interval_of_three_million_days_ends_the_job_without_touching_others():
    # the interval of issue 11 item 9, in a record validation would now refuse
    policy = FailurePolicy(constant=FailurePolicyConstant())
    policy.constant.interval.FromTimedelta(timedelta(days=3_000_000))
    record = stored(Job(schedule="@every 1s", failure_policy=policy), start=to_timestamp(NOW))
    failed = after_result(record, counter(), NOW + SECOND, FAILED)
    assert pending(record, failed, parse_schedule("@every 1s")) is None


def test_counts_stop_at_the_largest_uint32():
    record = stored(Job(schedule="@every 1s", failure_policy=policy_constant(1)),
                    start=to_timestamp(NOW))
    top = 2**32 - 1
    failed = after_result(record, counter(count=top, attempts=top), NOW, FAILED)
    assert (failed.count, failed.attempts) == (top, top)
    done = after_result(record, counter(count=top, attempts=top), NOW, SUCCESS)
    assert (done.count, done.attempts) == (top, 0)
    assert pending(record, failed, parse_schedule("@every 1s")).due == \
        NOW + SECOND + timedelta(seconds=top)
