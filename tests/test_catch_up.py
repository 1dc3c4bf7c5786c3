"""Catch-up policy and resume skips: pure tick math with an injected ``now`` (no etcd)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from etcdcron import Job, TriggerResult, ValidationError
from etcdcron._pb import stored_pb2
from etcdcron.schedule import parse_duration, parse_schedule
from etcdcron.ticks import SKIP_BUDGET, after_result, after_skip, catch_up, pending, to_timestamp
from etcdcron.validation import prepare_job

pytestmark = pytest.mark.unit

UTC = timezone.utc
T0 = datetime(2026, 3, 1, 0, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def setup(job: Job):
    record = prepare_job("job", job, T0 - SECOND)
    return record, parse_schedule(job.schedule) if job.HasField("schedule") else None


def test_without_a_policy_every_missed_tick_fires():
    record, schedule = setup(Job(schedule="@every 1s", due_time=T0.isoformat()))
    delivery = pending(record, stored_pb2.Counter(), schedule)
    assert catch_up(record, schedule, delivery, T0 + timedelta(days=2)) is None


def test_a_delivery_later_than_the_window_is_skipped_with_every_later_one_also_too_late():
    record, schedule = setup(Job(schedule="@every 1s", due_time=T0.isoformat(),
                                 catch_up_window="10s"))
    delivery = pending(record, stored_pb2.Counter(), schedule)
    now = T0 + timedelta(seconds=100)
    assert catch_up(record, schedule, delivery, T0 + 10 * SECOND) is None  # just in time
    last, count = catch_up(record, schedule, delivery, now)
    # ticks 0..89 are more than 10 s late; 90..100 are within the window and fire
    assert (last, count) == (T0 + 89 * SECOND, 90)
    counter = after_skip(record, stored_pb2.Counter(), last, count)
    assert counter.skipped == 90 and counter.count == 0
    assert pending(record, counter, schedule).tick == T0 + 90 * SECOND


def test_coalesce_fires_the_latest_of_a_run_of_missed_ticks_once():
    record, schedule = setup(Job(schedule="0 * * * * *", due_time=T0.isoformat(),
                                 coalesce=True))
    delivery = pending(record, stored_pb2.Counter(), schedule)
    now = T0 + timedelta(minutes=30, seconds=5)
    last, count = catch_up(record, schedule, delivery, now)
    assert (last, count) == (T0 + timedelta(minutes=29), 30)
    counter = after_skip(record, stored_pb2.Counter(), last, count)
    latest = pending(record, counter, schedule)
    assert latest.tick == T0 + timedelta(minutes=30)
    assert catch_up(record, schedule, latest, now) is None  # the latest fires
    done = after_result(record, counter, latest.tick, TriggerResult.SUCCESS, schedule)
    assert done.count == 1 and done.skipped == 30  # skipped ticks do not count toward repeats


def test_coalesce_and_a_window_together_skip_even_the_latest_if_it_is_too_late():
    record, schedule = setup(Job(schedule="0 0 * * * *", due_time=T0.isoformat(),
                                 coalesce=True, catch_up_window="5m"))
    delivery = pending(record, stored_pb2.Counter(), schedule)
    assert catch_up(record, schedule, delivery, T0 + timedelta(hours=3, minutes=10)) == \
        (T0 + timedelta(hours=3), 4)
    assert catch_up(record, schedule, delivery, T0 + timedelta(hours=3, minutes=2)) == \
        (T0 + timedelta(hours=2), 3)


def test_a_late_one_shot_with_a_window_is_skipped_and_finished():
    record, schedule = setup(Job(due_time=T0.isoformat(), catch_up_window="1m"))
    delivery = pending(record, stored_pb2.Counter(), schedule)
    last, count = catch_up(record, schedule, delivery, T0 + timedelta(minutes=2))
    assert (last, count) == (T0, 1)
    assert pending(record, after_skip(record, stored_pb2.Counter(), last, count), None) is None


def test_skipping_is_bounded_per_call():
    record, schedule = setup(Job(schedule="@every 1ms", due_time=T0.isoformat(),
                                 catch_up_window="1s"))
    delivery = pending(record, stored_pb2.Counter(), schedule)
    last, count = catch_up(record, schedule, delivery, T0 + timedelta(hours=1))
    assert count == SKIP_BUDGET and last == T0 + (SKIP_BUDGET - 1) * timedelta(milliseconds=1)


def test_a_resume_skips_the_ticks_due_while_paused_and_their_attempts():
    record, schedule = setup(Job(schedule="@every 10s", due_time=T0.isoformat()))
    failed = stored_pb2.Counter(job_partition_id=record.partition_id, attempts=2)
    assert pending(record, failed, schedule).tick == T0
    record.resumed.CopyFrom(to_timestamp(T0 + timedelta(seconds=35)))
    resumed = pending(record, failed, schedule)
    assert resumed.tick == resumed.due == T0 + timedelta(seconds=40)
    after = after_result(record, failed, resumed.tick, TriggerResult.FAILED, schedule)
    assert after.attempts == 1  # the skipped tick's two attempts are not this tick's


def test_a_one_shot_due_while_paused_is_over_once_resumed():
    record, schedule = setup(Job(due_time=T0.isoformat()))
    record.resumed.CopyFrom(to_timestamp(T0 + SECOND))
    assert pending(record, stored_pb2.Counter(), schedule) is None


@pytest.mark.parametrize("field, value, message", [
    ("catch_up_window", "-5s", "is negative"),
    ("catch_up_window", "R3/PT1S", "repeating intervals are not allowed"),
    ("catch_up_window", "P1M", "years and months have no fixed length"),
    ("catch_up_window", "soon", "is not a Go duration"),
    ("trigger_timeout", "0s", "trigger_timeout must be positive"),
    ("trigger_timeout", "P1000000000D", "longer than Go's longest duration"),
])
def test_invalid_durations_are_refused(field, value, message):
    with pytest.raises(ValidationError, match=f"{field}|{message}") as error:
        prepare_job("job", Job(schedule="@every 1s", **{field: value}), T0)
    assert message in str(error.value)


def test_durations_parse_as_go_or_fixed_iso():
    assert parse_duration("1h30m") == parse_duration("PT1H30M") == timedelta(minutes=90)
    assert parse_duration("P2W") == timedelta(days=14)
