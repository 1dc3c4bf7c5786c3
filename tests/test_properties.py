"""Property tests of the time grammar, the name rules and the next-tick math (hypothesis).

Arbitrary text is accepted or refused with the documented error, never another exception and
never a hang; next ticks strictly increase and none is skipped; ticks computed as the engine
does, with an injected clock that jumps around (daylight-saving transitions, a wall clock
stepping back), never go backwards; no record makes the next-tick math raise.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from etcdcron import FailurePolicy, FailurePolicyConstant, FailurePolicyDrop, Job, TriggerResult
from etcdcron._pb import stored_pb2
from etcdcron.errors import ValidationError
from etcdcron.schedule import (
    FIRST_TICK,
    LAST_TICK,
    CronSchedule,
    Schedule,
    parse_point_in_time,
    parse_schedule,
)
from etcdcron.ticks import after_result, pending
from etcdcron.validation import MAX_NAME_BYTES, prepare_job, validate_name
from tests.strategies import (
    PROPERTIES,
    UTC,
    ZONES,
    bounded,
    instants,
    point_in_time_text,
    schedule_text,
    specs,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


# -- parsers: accepted, or the documented error ---------------------------------------------------

@PROPERTIES
@given(schedule_text)
def test_any_schedule_text_parses_or_raises_value_error(text):
    try:
        schedule = bounded(parse_schedule, text)
    except ValueError as exc:
        assert str(exc)
        return
    assert isinstance(schedule, Schedule)
    tick = bounded(schedule.next_after, NOW)
    assert tick is None or tick > NOW


@PROPERTIES
@given(point_in_time_text, st.sampled_from([NOW, datetime.min.replace(tzinfo=UTC),
                                            datetime.max.replace(tzinfo=UTC)]))
def test_any_point_in_time_text_parses_or_raises_value_error(text, now):
    try:
        moment = bounded(parse_point_in_time, text, now)
    except ValueError as exc:
        assert str(exc)
        return
    assert moment.tzinfo is UTC


@PROPERTIES
@given(st.one_of(st.text(max_size=40), st.sampled_from([".", "..", "/", "a/b", "\\", "#", "?"]),
                 st.builds(lambda char, count, tail: char * count + tail, st.characters(),
                           st.integers(MAX_NAME_BYTES // 4 - 2, MAX_NAME_BYTES + 2),
                           st.text(max_size=3))))
def test_any_name_is_valid_or_a_validation_error_naming_it(name):
    try:
        assert bounded(validate_name, name) is name
    except ValidationError as exc:
        message = str(exc)
        assert message == "job name must not be empty" or \
            message.startswith(f"invalid job name {name[:60]!r}")
        return
    assert "/" not in name and name not in (".", "..")
    assert len(name.encode()) <= MAX_NAME_BYTES


_durations = st.builds(Duration, seconds=st.integers(-(2**40), 2**40),
                       nanos=st.integers(-(10**9), 2 * 10**9))
_policies = st.one_of(
    st.none(),
    st.just(FailurePolicy()),
    st.just(FailurePolicy(drop=FailurePolicyDrop())),
    st.builds(lambda interval, retries: FailurePolicy(constant=FailurePolicyConstant(
        interval=interval, **({} if retries is None else {"max_retries": retries}))),
        _durations, st.none() | st.integers(0, 2**32 - 1)),
)


@PROPERTIES
@given(schedule=st.none() | specs | schedule_text, due=st.none() | point_in_time_text,
       ttl=st.none() | point_in_time_text, repeats=st.none() | st.integers(0, 2**32 - 1),
       policy=_policies)
def test_prepare_job_accepts_or_raises_validation_error(schedule, due, ttl, repeats, policy):
    job = Job()
    for field, value in (("schedule", schedule), ("due_time", due), ("ttl", ttl),
                         ("repeats", repeats)):
        if value is not None:
            setattr(job, field, value)
    if policy is not None:
        job.failure_policy.CopyFrom(policy)
    try:
        record = bounded(prepare_job, "job", job, NOW)
    except ValidationError:
        return
    parsed = parse_schedule(job.schedule) if job.HasField("schedule") else None
    nxt = pending(record, stored_pb2.Counter(), parsed)
    for result in (TriggerResult.SUCCESS, TriggerResult.FAILED):
        if nxt is not None:
            after = after_result(record, stored_pb2.Counter(), nxt.tick, result)
            pending(record, after, parsed)


# -- next ticks ------------------------------------------------------------------------------------

def _zone_of(spec: str) -> str | None:
    return spec.split()[0][3:] if spec.startswith("TZ=") else None


@st.composite
def spec_and_instant(draw):
    spec = draw(specs)
    return spec, draw(instants(_zone_of(spec)))


@PROPERTIES
@given(spec_and_instant(), st.floats(0, 1, exclude_max=True))
def test_next_ticks_strictly_increase_and_none_is_skipped(spec_after, fraction):
    spec, after = spec_after
    schedule = parse_schedule(spec)
    first = bounded(schedule.next_after, after)
    if first is None:
        return
    assert first > after and first.tzinfo is UTC
    second = bounded(schedule.next_after, first)
    assert second is None or second > first
    # a cron tick is the smallest after ``after``: none between is skipped
    between = after + (first - after) * fraction
    if isinstance(schedule, CronSchedule) and after <= between < first:
        assert schedule.next_after(between) == first
    # and the result is the same whichever zone ``after`` is given in
    for zone in ZONES[:3]:
        assert schedule.next_after(after.astimezone(ZoneInfo(zone))) == first


_clock_steps = st.lists(st.integers(-3 * 3600_000_000, 6 * 3600_000_000), min_size=5,
                        max_size=40)


@PROPERTIES
@given(spec_and_instant(), _clock_steps, st.lists(st.booleans(), min_size=40, max_size=40))
def test_ticks_with_an_injected_clock_never_go_backwards(spec_after, steps, failures):
    """The engine's loop: deliver the pending tick once the clock reaches it, record the result,
    compute the next. The clock jumps around (forwards and back, across DST transitions); the
    ticks delivered are the schedule's own, in strictly increasing order, none before its time."""
    spec, start = spec_after
    policy = FailurePolicy(constant=FailurePolicyConstant(interval=Duration(seconds=90),
                                                          max_retries=1))
    job = Job(schedule=spec, failure_policy=policy)
    record = prepare_job("job", job, start)
    schedule = parse_schedule(spec)
    counter = stored_pb2.Counter()
    clock, delivered, done = start, [], []
    for step, fail in zip(steps, failures):
        clock += timedelta(microseconds=step)  # may step back
        nxt = pending(record, counter, schedule)
        if nxt is None or nxt.due > clock:
            continue
        assert nxt.due >= nxt.tick
        delivered.append(nxt.tick)
        result = TriggerResult.FAILED if fail else TriggerResult.SUCCESS
        counter = after_result(record, counter, nxt.tick, result)
        if counter.attempts == 0:
            done.append(nxt.tick)
    assert delivered == sorted(delivered)
    assert done == sorted(set(done))
    expected, tick = [], start
    for _ in done:
        tick = schedule.next_after(tick)
        expected.append(tick)
    assert done == expected


_timestamps = st.builds(Timestamp, seconds=st.integers(-(2**63), 2**63 - 1),
                        nanos=st.integers(-(2**31), 2**31 - 1))
_edges = st.sampled_from([Timestamp(seconds=-62135596800), Timestamp(seconds=253402300799),
                          Timestamp(seconds=253402300799 - 86400), Timestamp(seconds=0)])


@PROPERTIES
@given(spec=st.none() | specs, begin=st.sampled_from(["start", "due_time"]),
       stamps=st.lists(_timestamps | _edges, min_size=3, max_size=3),
       expires=st.booleans(), count=st.integers(0, 2**32 - 1), attempts=st.integers(0, 2**32 - 1),
       repeats=st.none() | st.integers(0, 2**32 - 1), policy=_policies,
       result=st.sampled_from([TriggerResult.SUCCESS, TriggerResult.FAILED]))
def test_no_record_makes_the_next_tick_math_raise(spec, begin, stamps, expires, count, attempts,
                                                  repeats, policy, result):
    """Records as another implementation may write them, never validated."""
    record = stored_pb2.Job(partition_id=1, job=Job())
    getattr(record, begin).CopyFrom(stamps[0])
    if expires:
        record.expiration.CopyFrom(stamps[1])
    if spec is not None:
        record.job.schedule = spec
    if repeats is not None:
        record.job.repeats = repeats
    if policy is not None:
        record.job.failure_policy.CopyFrom(policy)
    counter = stored_pb2.Counter(job_partition_id=1, count=count, attempts=attempts)
    if count:
        counter.last_trigger.CopyFrom(stamps[2])
    schedule = parse_schedule(spec) if spec is not None else None
    nxt = bounded(pending, record, counter, schedule)
    tick = nxt.tick if nxt is not None else datetime(2026, 1, 1, tzinfo=UTC)
    later = bounded(after_result, record, counter, tick, result)
    bounded(pending, record, later, schedule)


# -- the day search, against a brute-force calendar walk -------------------------------------------

def _brute_force_next_day(schedule: CronSchedule, after: date) -> date | None:
    """The first day after ``after`` matching the day fields, month by month over 400 years."""
    year, month = after.year, after.month
    for _ in range(400 * 12 + 1):
        if schedule.months >> month & 1:
            first_weekday, length = calendar.monthrange(year, month)  # Monday = 0
            for day in range(1, length + 1):
                candidate = date(year, month, day)
                if candidate <= after:
                    continue
                in_month = bool(schedule.days >> day & 1)
                in_week = bool(schedule.weekdays >> (candidate.weekday() + 1) % 7 & 1)
                if (in_month or in_week) if schedule.either_day else (in_month and in_week):
                    return candidate
        year, month = (year, month + 1) if month < 12 else (year + 1, 1)
        if year > 9999:
            return None
    return None


_day_masks = st.sets(st.integers(1, 31), min_size=1).map(lambda s: sum(1 << d for d in s))
_month_masks = st.sets(st.integers(1, 12), min_size=1, max_size=3).map(
    lambda s: sum(1 << m for m in s))
_weekday_masks = st.sets(st.integers(0, 6), min_size=1).map(lambda s: sum(1 << d for d in s))


@PROPERTIES
@given(days=_day_masks | st.sampled_from([1 << 29, 1 << 30 | 1 << 31, 1 << 31]),
       months=_month_masks | st.just(1 << 2), weekdays=_weekday_masks, either=st.booleans(),
       after=st.dates(date(1970, 1, 1), date(9500, 1, 1)))
def test_the_next_day_is_the_first_matching_one_within_a_gregorian_cycle(days, months, weekdays,
                                                                          either, after):
    schedule = CronSchedule(1, 1, 1, days, months, weekdays, either)  # at 00:00:00
    start = datetime(after.year, after.month, after.day, 0, 0, 0, tzinfo=UTC)
    expected = _brute_force_next_day(schedule, after)
    tick = bounded(schedule.next_after, start)
    assert tick == (None if expected is None else
                    datetime(expected.year, expected.month, expected.day, tzinfo=UTC))
    assert tick is None or FIRST_TICK <= tick <= LAST_TICK
