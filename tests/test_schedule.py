"""Tests for etcdcron.schedule: schedule grammar, next ticks, DST rules, points in time."""

from __future__ import annotations

import dataclasses
import re
import timeit
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from etcdcron.schedule import (
    FIRST_TICK,
    LAST_TICK,
    EverySchedule,
    _zone_names,
    parse_go_duration,
    parse_point_in_time,
    parse_schedule,
)

pytestmark = pytest.mark.unit

UTC = timezone.utc
NY = ZoneInfo("America/New_York")


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def ny(*fields: int, fold: int = 0) -> datetime:
    """The instant (in UTC, so that comparisons see the fold) of a New York wall time."""
    return datetime(*fields, tzinfo=NY, fold=fold).astimezone(UTC)


def ticks(spec: str, after: datetime, count: int) -> list[datetime | None]:
    schedule = parse_schedule(spec)
    result = []
    for _ in range(count):
        after = schedule.next_after(after)
        result.append(after)
    return result


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        (
            "0 */5 * * * *",
            utc(2026, 1, 1, 10, 3, 7),
            [utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 10)],
        ),
        (
            "0 */5 * * * *",
            utc(2026, 1, 1, 10, 5),
            [utc(2026, 1, 1, 10, 10), utc(2026, 1, 1, 10, 15)],
        ),
        (
            "0 */5 * * * *",
            utc(2026, 1, 1, 10, 4, 59, 999999),
            [utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 10)],
        ),
        (
            "30 15 10 * * *",
            utc(2026, 1, 1, 11),
            [utc(2026, 1, 2, 10, 15, 30), utc(2026, 1, 3, 10, 15, 30)],
        ),
        (
            "0 0,30 8-9 * * *",
            utc(2026, 1, 1, 8, 10),
            [
                utc(2026, 1, 1, 8, 30),
                utc(2026, 1, 1, 9),
                utc(2026, 1, 1, 9, 30),
                utc(2026, 1, 2, 8),
            ],
        ),
        (
            "0 10-50/20 * * * *",
            utc(2026, 1, 1, 0, 0),
            [
                utc(2026, 1, 1, 0, 10),
                utc(2026, 1, 1, 0, 30),
                utc(2026, 1, 1, 0, 50),
                utc(2026, 1, 1, 1, 10),
            ],
        ),
        (
            "0 5/15 * * * *",
            utc(2026, 1, 1, 0, 0),
            [
                utc(2026, 1, 1, 0, 5),
                utc(2026, 1, 1, 0, 20),
                utc(2026, 1, 1, 0, 35),
                utc(2026, 1, 1, 0, 50),
                utc(2026, 1, 1, 1, 5),
            ],
        ),
        (
            "? ? ? ? ? ?",
            utc(2026, 1, 1, 0, 0, 0, 500000),
            [utc(2026, 1, 1, 0, 0, 1), utc(2026, 1, 1, 0, 0, 2)],
        ),
        (
            "*/20 * * * * *",
            utc(2026, 12, 31, 23, 59, 30),
            [utc(2026, 12, 31, 23, 59, 40), utc(2027, 1, 1), utc(2027, 1, 1, 0, 0, 20)],
        ),
        ("0 0 9 * * mon-fri", utc(2026, 1, 2, 10), [utc(2026, 1, 5, 9), utc(2026, 1, 6, 9)]),
        (
            "0 0 12 * * SUN,Sat",
            utc(2026, 1, 1),
            [utc(2026, 1, 3, 12), utc(2026, 1, 4, 12), utc(2026, 1, 10, 12)],
        ),
        ("0 0 0 * * 7", utc(2026, 1, 1), [utc(2026, 1, 4), utc(2026, 1, 11)]),
        ("0 0 0 * * 0", utc(2026, 1, 1), [utc(2026, 1, 4), utc(2026, 1, 11)]),
        ("0 0 0 * * 1/2", utc(2026, 1, 1), [utc(2026, 1, 2), utc(2026, 1, 5), utc(2026, 1, 7)]),
        (
            "0 0 0 1 JAN-mar *",
            utc(2026, 1, 15),
            [utc(2026, 2, 1), utc(2026, 3, 1), utc(2027, 1, 1)],
        ),
        ("0 0 0 1 */4 *", utc(2026, 2, 1), [utc(2026, 5, 1), utc(2026, 9, 1), utc(2027, 1, 1)]),
        (
            "0 0 0 31 * *",
            utc(2026, 1, 1),
            [
                utc(2026, 1, 31),
                utc(2026, 3, 31),
                utc(2026, 5, 31),
                utc(2026, 7, 31),
                utc(2026, 8, 31),
                utc(2026, 10, 31),
            ],
        ),
        ("0 0 0 29 2 *", utc(2025, 3, 1), [utc(2028, 2, 29), utc(2032, 2, 29)]),
        ("0 0 0 29 2 *", utc(2096, 3, 1), [utc(2104, 2, 29)]),
        ("0 0 12 31 12 *", utc(2026, 12, 31, 12), [utc(2027, 12, 31, 12)]),
    ],
)
def test_cron_next_ticks(spec: str, after: datetime, expected: list[datetime]) -> None:
    assert ticks(spec, after, len(expected)) == expected


def test_next_after_accepts_any_zone_and_returns_utc() -> None:
    tick = parse_schedule("0 */5 * * * *").next_after(datetime(2026, 1, 1, 5, 1, tzinfo=NY))
    assert tick == utc(2026, 1, 1, 10, 5)
    assert tick.tzinfo is UTC


def test_next_after_rejects_naive_datetime() -> None:
    with pytest.raises(ValueError, match="after must be timezone-aware"):
        parse_schedule("0 * * * * *").next_after(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0 0 0 13 * fri", [utc(2026, 1, 2), utc(2026, 1, 9), utc(2026, 1, 13), utc(2026, 1, 16)]),
        ("0 0 0 ? * fri", [utc(2026, 1, 2), utc(2026, 1, 9), utc(2026, 1, 16)]),
        ("0 0 0 13 * *", [utc(2026, 1, 13), utc(2026, 2, 13)]),
        ("0 0 0 13 * ?", [utc(2026, 1, 13), utc(2026, 2, 13)]),
        ("0 0 0 */10 * fri", [utc(2026, 5, 1), utc(2026, 7, 31), utc(2026, 8, 21)]),
    ],
)
def test_day_of_month_and_day_of_week(spec: str, expected: list[datetime]) -> None:
    assert ticks(spec, utc(2026, 1, 1), len(expected)) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("@yearly", utc(2027, 1, 1)),
        ("@annually", utc(2027, 1, 1)),
        ("@monthly", utc(2026, 6, 1)),
        ("@weekly", utc(2026, 5, 10)),
        ("@daily", utc(2026, 5, 6)),
        ("@midnight", utc(2026, 5, 6)),
        ("@hourly", utc(2026, 5, 5, 11)),
        ("TZ=Asia/Tokyo @daily", utc(2026, 5, 5, 15)),
    ],
)
def test_descriptors(spec: str, expected: datetime) -> None:
    assert parse_schedule(spec).next_after(utc(2026, 5, 5, 10, 3, 7)) == expected


def test_descriptor_equals_its_cron_form() -> None:
    assert parse_schedule("@weekly") == parse_schedule("0 0 0 * * 0")


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        (
            "@every 100ms",
            utc(2026, 1, 1, 0, 0, 0, 950000),
            [utc(2026, 1, 1, 0, 0, 1, 50000), utc(2026, 1, 1, 0, 0, 1, 150000)],
        ),
        ("@every 1h30m", utc(2026, 1, 1, 23), [utc(2026, 1, 2, 0, 30), utc(2026, 1, 2, 2)]),
        (
            "@every 1.5us",
            utc(2026, 1, 1),
            [utc(2026, 1, 1, 0, 0, 0, 1), utc(2026, 1, 1, 0, 0, 0, 2)],
        ),
        # elapsed time: a spring-forward transition changes nothing
        (
            "@every 10s",
            ny(2026, 3, 8, 1, 59, 55),
            [utc(2026, 3, 8, 7, 0, 5), utc(2026, 3, 8, 7, 0, 15)],
        ),
    ],
)
def test_every(spec: str, after: datetime, expected: list[datetime]) -> None:
    assert ticks(spec, after, len(expected)) == expected


def test_every_is_an_immutable_schedule() -> None:
    schedule = parse_schedule("@every 5m")
    assert schedule == EverySchedule(timedelta(minutes=5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.interval = timedelta(0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        ("TZ=Europe/Berlin 0 0 9 * * *", utc(2026, 1, 10), utc(2026, 1, 10, 8)),
        ("TZ=Europe/Berlin 0 0 9 * * *", utc(2026, 7, 10), utc(2026, 7, 10, 7)),
        ("CRON_TZ=Asia/Kolkata 0 30 9 * * *", utc(2026, 1, 10), utc(2026, 1, 10, 4)),
        ("  CRON_TZ=Asia/Kolkata    0  30 9 * *   *  ", utc(2026, 1, 10), utc(2026, 1, 10, 4)),
        ("TZ=UTC 0 30 9 * * *", utc(2026, 1, 10), utc(2026, 1, 10, 9, 30)),
        ("TZ=Australia/Sydney 0 0 0 1 * *", utc(2026, 1, 1), utc(2026, 1, 31, 13)),
    ],
)
def test_time_zone_prefix(spec: str, after: datetime, expected: datetime) -> None:
    assert parse_schedule(spec).next_after(after) == expected


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        # 02:30 does not exist on 2026-03-08: fire at 03:00 EDT, then 02:30 EDT the next day.
        ("0 30 2 * * *", ny(2026, 3, 7, 12), [ny(2026, 3, 8, 3), ny(2026, 3, 9, 2, 30)]),
        ("0 30 2 * * *", ny(2026, 3, 8, 3), [ny(2026, 3, 9, 2, 30)]),
        (
            "0 0 * * * *",
            ny(2026, 3, 8, 0, 30),
            [ny(2026, 3, 8, 1), ny(2026, 3, 8, 3), ny(2026, 3, 8, 4)],
        ),
        (
            "0 30 * * * *",
            ny(2026, 3, 8, 1),
            [ny(2026, 3, 8, 1, 30), ny(2026, 3, 8, 3), ny(2026, 3, 8, 3, 30)],
        ),
        # 02:15 and 02:45 both collapse into 03:00 EDT.
        ("0 15,45 2 * * *", ny(2026, 3, 8, 1), [ny(2026, 3, 8, 3), ny(2026, 3, 9, 2, 15)]),
    ],
)
def test_spring_forward(spec: str, after: datetime, expected: list[datetime]) -> None:
    assert ticks(f"TZ=America/New_York {spec}", after, len(expected)) == expected


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        ("0 30 1 * * *", ny(2026, 10, 31, 12), [ny(2026, 11, 1, 1, 30), ny(2026, 11, 2, 1, 30)]),
        (
            "0 */30 * * * *",
            ny(2026, 11, 1, 0, 45),
            [
                ny(2026, 11, 1, 1),
                ny(2026, 11, 1, 1, 30),
                ny(2026, 11, 1, 1, fold=1),
                ny(2026, 11, 1, 1, 30, fold=1),
                ny(2026, 11, 1, 2),
            ],
        ),
        (
            "0 0 1,2 * * *",
            ny(2026, 11, 1, 0, 30),
            [ny(2026, 11, 1, 1), ny(2026, 11, 1, 2), ny(2026, 11, 2, 1)],
        ),
    ],
)
def test_fall_back(spec: str, after: datetime, expected: list[datetime]) -> None:
    assert ticks(f"TZ=America/New_York {spec}", after, len(expected)) == expected


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        ("0 */15 * * * *", ny(2026, 11, 1, 1, 50), utc(2026, 11, 1, 6)),
        ("0 */15 * * * *", ny(2026, 11, 1, 1, 10, fold=1), utc(2026, 11, 1, 6, 15)),
        ("0 */15 * * * *", ny(2026, 11, 1, 1, 59, 59, 500000, fold=1), utc(2026, 11, 1, 7)),
        ("0 50 * * * *", ny(2026, 11, 1, 1, 55), utc(2026, 11, 1, 6, 50)),
        ("0 30 0-23 * * *", ny(2026, 11, 1, 1, 40), utc(2026, 11, 1, 6, 30)),
        ("0 30 1 * * *", ny(2026, 11, 1, 1, 40), utc(2026, 11, 2, 6, 30)),
        ("0 30 1 * * *", ny(2026, 11, 1, 1, 10, fold=1), utc(2026, 11, 2, 6, 30)),
        ("0 0,30 1 * * *", ny(2026, 11, 1, 1, 10), utc(2026, 11, 1, 5, 30)),
        ("0 0 2 * * *", ny(2026, 11, 1, 1, 50), utc(2026, 11, 1, 7)),
        ("0 0 2 * * *", ny(2026, 11, 1, 1, 50, fold=1), utc(2026, 11, 1, 7)),
    ],
)
def test_next_after_inside_repeated_hour(spec: str, after: datetime, expected: datetime) -> None:
    assert parse_schedule(f"TZ=America/New_York {spec}").next_after(after) == expected


# Where etcdcron's DST rules differ from cronie's (README "Daylight saving time"). cronie runs a
# job whose minute or hour field starts with '*' ("wildcard") on real time: not caught up after a
# spring-forward gap, run again in a repeated hour; a "fixed-time" job is caught up after the gap
# and not run again in the repeated hour. etcdcron decides on the fields' values instead: every
# gap wall time fires at the gap's end, and a repeated wall time fires twice only when the hour
# field matches all 24 hours.
@pytest.mark.parametrize(
    ("spec", "after", "expected", "cronie"),
    [
        # wildcard hour, minute in the gap: cronie skips 02:30; etcdcron fires at 03:00
        ("0 30 * * * *", ny(2026, 3, 8, 1, 40), [ny(2026, 3, 8, 3), ny(2026, 3, 8, 3, 30)],
         [ny(2026, 3, 8, 3, 30), ny(2026, 3, 8, 4, 30)]),
        # wildcard minute, hour in the gap: cronie runs none of 02:xx that day; etcdcron one
        ("0 */15 2 * * *", ny(2026, 3, 8), [ny(2026, 3, 8, 3), ny(2026, 3, 9, 2)],
         [ny(2026, 3, 9, 2), ny(2026, 3, 9, 2, 15)]),
        # fixed time in the gap: both fire once at the gap's end
        ("0 30 2 * * *", ny(2026, 3, 8), [ny(2026, 3, 8, 3), ny(2026, 3, 9, 2, 30)],
         [ny(2026, 3, 8, 3), ny(2026, 3, 9, 2, 30)]),
        # wildcard minute, pinned hour in the repeated hour: cronie runs both passes; etcdcron one
        ("0 */15 1 * * *", ny(2026, 11, 1, 1, 50),
         [ny(2026, 11, 2, 1), ny(2026, 11, 2, 1, 15)],
         [ny(2026, 11, 1, 1, fold=1), ny(2026, 11, 1, 1, 15, fold=1)]),
        # every hour, written as a range: cronie sees a fixed-time job and runs it once;
        # etcdcron sees all 24 hours and keeps the hourly rhythm through both passes
        ("0 30 0-23 * * *", ny(2026, 11, 1, 1, 40),
         [ny(2026, 11, 1, 1, 30, fold=1), ny(2026, 11, 1, 2, 30)],
         [ny(2026, 11, 1, 2, 30), ny(2026, 11, 1, 3, 30)]),
        # '*' hour: both run both passes
        ("0 30 * * * *", ny(2026, 11, 1, 1, 40),
         [ny(2026, 11, 1, 1, 30, fold=1), ny(2026, 11, 1, 2, 30)],
         [ny(2026, 11, 1, 1, 30, fold=1), ny(2026, 11, 1, 2, 30)]),
    ],
)
def test_dst_rules_where_cronie_differs(spec: str, after: datetime, expected: list[datetime],
                                        cronie: list[datetime]) -> None:
    actual = ticks(f"TZ=America/New_York {spec}", after, len(expected))
    assert actual == expected, f"(cronie, for comparison: {cronie})"


def simulated_ticks(
    matches: Callable[[datetime], bool], every_hour: bool, start: datetime, end: datetime
) -> list[datetime]:
    """Ticks of a daemon that wakes each UTC minute and applies the documented DST rules."""
    result = []
    seen = set()
    previous = None
    instant = start
    while instant < end:
        wall = instant.astimezone(NY).replace(tzinfo=None, fold=0)
        due = matches(wall) and (every_hour or wall not in seen)
        if previous is not None:
            skipped = previous + timedelta(minutes=1)
            while skipped < wall:
                due = due or matches(skipped)
                skipped += timedelta(minutes=1)
        seen.add(wall)
        previous = wall
        if due:
            result.append(instant)
        instant += timedelta(minutes=1)
    return result


@pytest.mark.parametrize("transition", [utc(2026, 3, 8, 7), utc(2026, 11, 1, 6)])
@pytest.mark.parametrize(
    ("spec", "matches", "every_hour"),
    [
        ("0 */20 * * * *", lambda wall: wall.minute % 20 == 0, True),
        ("0 10,50 1-2 * * *", lambda wall: wall.hour in (1, 2) and wall.minute in (10, 50), False),
        ("0 45 0-23 * * *", lambda wall: wall.minute == 45, True),
    ],
)
def test_matches_minute_by_minute_simulation(
    transition: datetime, spec: str, matches: Callable[[datetime], bool], every_hour: bool
) -> None:
    start, end = transition - timedelta(days=1), transition + timedelta(days=2)
    expected = simulated_ticks(matches, every_hour, start, end)
    schedule = parse_schedule(f"TZ=America/New_York {spec}")
    for step in range(-50, 50):
        after = transition + timedelta(minutes=7 * step, microseconds=step % 3 * 29_999_999)
        assert schedule.next_after(after) == min(tick for tick in expected if tick > after), after


@pytest.mark.parametrize(
    "spec",
    ["0 0 0 30 2 *", "0 0 0 31 4 *", "TZ=America/New_York 0 0 0 31 4 *", "0 0 0 31 2,4,6,9,11 *",
     "0 0 0 30,31 2 */7"],
)
def test_no_next_time(spec: str) -> None:
    assert parse_schedule(spec).next_after(utc(2026, 1, 1)) is None


# -- the next-time search spans a whole Gregorian cycle -------------------------------------------

@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        # Feb 1 on a Monday (a '*' day field makes both day fields count)
        ("0 0 0 */29 2 mon", utc(2027, 2, 2), [utc(2038, 2, 1), utc(2044, 2, 1), utc(2049, 2, 1)]),
        # Feb 29 on a Sunday: 28 years apart, 40 across 2100, which is no leap year
        ("0 0 0 29 2 */7", utc(2032, 3, 1), [utc(2060, 2, 29), utc(2088, 2, 29), utc(2128, 2, 29)]),
        ("TZ=America/New_York 0 0 0 29 2 */7", utc(2032, 3, 1),
         [ny(2060, 2, 29), ny(2088, 2, 29), ny(2128, 2, 29)]),
        # Feb 29 ("?/1" counts as a star), after 2096: the next leap year is 2104
        ("0 30 12 29 2 ?/1", utc(2096, 3, 1), [utc(2104, 2, 29, 12, 30)]),
        ("0 0 0 29 2 */7", utc(9900, 1, 1), [utc(9920, 2, 29), utc(9948, 2, 29), utc(9976, 2, 29)]),
    ],
)
def test_next_time_search_reaches_decades_ahead(spec: str, after: datetime,
                                                expected: list[datetime]) -> None:
    assert ticks(spec, after, len(expected)) == expected


def test_every_month_shape_occurs_in_one_gregorian_cycle() -> None:
    # What CronSchedule relies on to know, when it is built, whether it ever fires: within any
    # 400 years, every month starts on every weekday, both in leap years and in common ones.
    shapes = {(year % 4 == 0 and (year % 100 != 0 or year % 400 == 0), month,
               datetime(year, month, 1).weekday()) for year in range(2000, 2400)
              for month in range(1, 13)}
    assert len(shapes) == 2 * 12 * 7


@pytest.mark.parametrize("spec", [
    "0 0 0 30 2 *", "0 0 0 31 2,4,6,9,11 *", "0 0 0 29 2 */7", "0 0 0 */29 2 mon",
    "TZ=Australia/Lord_Howe 0 0 0 29 2 */7", "59 59 23 29 2 */7", "0 0 0 29 2 1-5/7",
])
def test_the_slowest_searches_take_under_two_milliseconds(spec: str) -> None:
    schedule = parse_schedule(spec)
    afters = [utc(2032, 3, 1), utc(2096, 3, 1), utc(2027, 2, 2), utc(9800, 1, 1)]
    best = min(timeit.repeat(lambda: [schedule.next_after(a) for a in afters], number=5,
                             repeat=5)) / (5 * len(afters))
    assert best < 0.002, f"{spec!r}: {best * 1e3:.2f} ms per next_after"


# -- the ends of datetime --------------------------------------------------------------------------

ENDS = [datetime.min.replace(tzinfo=UTC), FIRST_TICK - timedelta(microseconds=1), FIRST_TICK,
        LAST_TICK - timedelta(seconds=1), LAST_TICK, datetime.max.replace(tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59))),
        datetime.max.replace(tzinfo=timezone(-timedelta(hours=23, minutes=59)))]


@pytest.mark.parametrize("spec", ["0 0 0 * * *", "* * * * * *", "0 30 2 * * *", "0 0 0 29 2 *",
                                  "59 59 23 31 12 *"])
def test_next_after_never_raises_near_the_ends_of_datetime_in_any_zone(spec: str) -> None:
    for zone in sorted(_zone_names()):
        schedule = parse_schedule(f"TZ={zone} {spec}")
        for after in ENDS:
            tick = schedule.next_after(after)
            assert tick is None or (after < tick and FIRST_TICK <= tick <= LAST_TICK), (zone, after)


@pytest.mark.parametrize("spec", ["@every 1us", "@every 1s", "@every 2562047h47m16.854775807s"])
def test_every_never_raises_near_the_ends_of_datetime(spec: str) -> None:
    schedule = parse_schedule(spec)
    for after in ENDS:
        tick = schedule.next_after(after)
        assert tick is None or after < tick <= LAST_TICK
        if tick is not None and after.tzinfo is UTC:
            assert tick == after + schedule.interval
    assert schedule.next_after(LAST_TICK - schedule.interval) == LAST_TICK
    assert schedule.next_after(LAST_TICK - schedule.interval + timedelta(microseconds=1)) is None


def test_no_tick_after_the_last_tick() -> None:
    assert parse_schedule("* * * * * *").next_after(LAST_TICK - timedelta(seconds=1)) == LAST_TICK
    assert parse_schedule("* * * * * *").next_after(LAST_TICK) is None
    assert parse_schedule("0 0 0 * * *").next_after(LAST_TICK - timedelta(days=1)) == LAST_TICK
    assert parse_schedule("@yearly").next_after(utc(9999, 1, 1)) is None


def test_an_after_before_the_first_tick_gives_the_first_tick() -> None:
    assert parse_schedule("* * * * * *").next_after(datetime.min.replace(tzinfo=UTC)) == FIRST_TICK
    assert parse_schedule("TZ=America/New_York 0 0 0 * * *").next_after(
        datetime.min.replace(tzinfo=UTC)) == datetime(1, 1, 3, 4, 56, 2, tzinfo=UTC)  # LMT


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "*/5 * * * *",
            "schedule '*/5 * * * *': expected 6 fields"
            " (second minute hour day-of-month month day-of-week), got 5;"
            " add a seconds field first, e.g. '0 */5 * * * *'",
        ),
        (
            "0 0 0 1 1 * 2026",
            "expected 6 fields (second minute hour day-of-month month day-of-week), got 7",
        ),
        ("60 * * * * *", "invalid second field '60': '60' is out of range 0-59"),
        ("0 0-60 * * * *", "invalid minute field '0-60': '60' is out of range 0-59"),
        ("0 0 24 * * *", "invalid hour field '24': '24' is out of range 0-23"),
        ("0 0 0 0 * *", "invalid day-of-month field '0': '0' is out of range 1-31"),
        ("0 0 0 1,32 * *", "invalid day-of-month field '1,32': '32' is out of range 1-31"),
        ("0 0 0 * 0 *", "invalid month field '0': '0' is out of range 1-12"),
        ("0 0 0 * 13 *", "invalid month field '13': '13' is out of range 1-12"),
        ("0 0 0 * * 8", "invalid day-of-week field '8': '8' is out of range 0-7"),
        ("0 */0 * * * *", "invalid minute field '*/0': step '0' must be a positive integer"),
        ("0 * */x * * *", "invalid hour field '*/x': step 'x' must be a positive integer"),
        ("0 1-5/ * * * *", "invalid minute field '1-5/': step '' must be a positive integer"),
        ("0 30-10 * * * *", "invalid minute field '30-10': range '30-10' starts after it ends"),
        ("0 1,,2 * * * *", "invalid minute field '1,,2': malformed item ''"),
        ("0 -5 * * * *", "invalid minute field '-5': malformed item '-5'"),
        ("0 x * * * *", "invalid minute field 'x': 'x' is not a number"),
        ("0 0 0 * foo *", "month field 'foo': 'foo' is not a number or a month name (jan-dec)"),
        ("0 0 0 * * mon-fry", "day-of-week field 'mon-fry': 'fry' is not a number or a day name"),
        ("@fortnightly", "unknown descriptor '@fortnightly'"),
        ("@daily 5", "descriptor '@daily' takes no arguments"),
        ("TZ=Mars/Olympus 0 0 * * * *", "unknown time zone 'Mars/Olympus': it is not in the IANA"),
        ("CRON_TZ=America 0 0 * * * *", "unknown time zone 'America'"),
        ("TZ=../etc/passwd @daily", "unknown time zone '../etc/passwd': a path is not a zone name"),
        ("TZ= @daily", "unknown time zone ''"),
        ("TZ=UTC @every 1s", "@every counts elapsed time, so a time zone does not apply to it; "
                             "remove 'TZ=UTC'"),
        ("CRON_TZ=Europe/Paris @every 1h", "remove 'CRON_TZ=Europe/Paris'"),
        ("@every 0s", "@every duration '0s' must be positive"),
        ("@every -1s", "@every duration '-1s' must be positive"),
        ("@every 1ns", "@every duration '1ns' must be positive"),
        ("@every", "@every takes exactly one Go duration"),
        ("@every 1s 2s", "@every takes exactly one Go duration"),
        ("@every soon", "invalid Go duration 'soon'"),
        ("@every 5", "invalid Go duration '5': missing unit"),
        ("   ", "is empty"),
        ("TZ=UTC", "is empty"),
    ],
)
def test_rejected_schedules(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_schedule(spec)
    assert message in str(error.value)


@pytest.mark.parametrize("zone", ["localtime", "posixrules", "Factory"])
def test_host_dependent_zone_names_are_rejected(zone: str) -> None:
    with pytest.raises(ValueError, match=f"unknown time zone '{zone}': it depends on how each "
                                         "host is configured; give an IANA name"):
        parse_schedule(f"TZ={zone} 0 0 0 * * *")


@pytest.mark.parametrize("zone", ["/etc/localtime", "/usr/share/zoneinfo/UTC", "./UTC",
                                  "America/../UTC", "America/./New_York", "..\\UTC",
                                  "posix/America/New_York", "right/UTC", "Local", "utc",
                                  "America/new_york", "Etc/GMT+15", "zone.tab", "tzdata.zi"])
def test_paths_and_names_outside_the_tz_database_are_rejected(zone: str) -> None:
    with pytest.raises(ValueError, match=f"unknown time zone {re.escape(repr(zone))}: "):
        parse_schedule(f"TZ={zone} 0 0 0 * * *")


@pytest.mark.parametrize("zone", ["America/New_York", "UTC", "Etc/UTC", "Etc/GMT-14", "EST5EDT",
                                  "US/Eastern", "Asia/Calcutta", "Europe/Kiev", "Europe/Kyiv",
                                  "GB", "Australia/Lord_Howe"])
def test_iana_zones_and_their_links_are_accepted(zone: str) -> None:
    assert parse_schedule(f"TZ={zone} 0 0 0 * * *").zone.key == zone


def test_a_link_means_the_zone_it_links_to() -> None:
    after = utc(2026, 3, 8)
    assert (parse_schedule("TZ=US/Eastern 0 30 2 * * *").next_after(after)
            == parse_schedule("TZ=America/New_York 0 30 2 * * *").next_after(after))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", timedelta(0)),
        ("-0", timedelta(0)),
        ("+0", timedelta(0)),
        ("10s", timedelta(seconds=10)),
        ("+10s", timedelta(seconds=10)),
        ("-5s", timedelta(seconds=-5)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("1h2m3.5s", timedelta(hours=1, minutes=2, seconds=3.5)),
        (".5s", timedelta(milliseconds=500)),
        ("1.s", timedelta(seconds=1)),
        ("250ms", timedelta(milliseconds=250)),
        ("7us", timedelta(microseconds=7)),
        ("7\u00b5s", timedelta(microseconds=7)),
        ("7\u03bcs", timedelta(microseconds=7)),
        ("1500ns", timedelta(microseconds=1)),
        ("-1500ns", timedelta(microseconds=-1)),
        ("1.0000019s", timedelta(seconds=1, microseconds=1)),
        (
            "2562047h47m16.854775807s",
            timedelta(hours=2562047, minutes=47, seconds=16, microseconds=854775),
        ),
    ],
)
def test_go_durations(value: str, expected: timedelta) -> None:
    assert parse_go_duration(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no number"),
        ("-", "no number"),
        ("5", "missing unit"),
        ("00", "missing unit"),
        ("1.5.5s", "missing unit"),
        ("1d", "unknown unit 'd'"),
        ("1h 2m", "unknown unit 'h '"),
        ("s", "no number before 's'"),
        (".s", "no number before '.s'"),
        ("2562047h47m16.854775808s", "out of range"),
    ],
)
def test_rejected_go_durations(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid Go duration {value!r}: {message}")):
        parse_go_duration(value)


NOW = utc(2026, 1, 31, 12)


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        ("2026-01-02T15:04:05Z", NOW, utc(2026, 1, 2, 15, 4, 5)),
        ("2026-01-02t15:04:05z", NOW, utc(2026, 1, 2, 15, 4, 5)),
        ("2026-01-02T15:04:05.5Z", NOW, utc(2026, 1, 2, 15, 4, 5, 500000)),
        ("2026-01-02T15:04:05.123456789Z", NOW, utc(2026, 1, 2, 15, 4, 5, 123456)),
        ("2026-01-02T15:04:05+05:30", NOW, utc(2026, 1, 2, 9, 34, 5)),
        ("2026-01-02T15:04:05-08:00", NOW, utc(2026, 1, 2, 23, 4, 5)),
        ("10s", NOW, utc(2026, 1, 31, 12, 0, 10)),
        ("1h30m", NOW, utc(2026, 1, 31, 13, 30)),
        ("1.5h", NOW, utc(2026, 1, 31, 13, 30)),
        ("250ms", NOW, utc(2026, 1, 31, 12, 0, 0, 250000)),
        ("-5s", NOW, utc(2026, 1, 31, 11, 59, 55)),
        ("0", NOW, NOW),
        (" 1h ", NOW, utc(2026, 1, 31, 13)),
        ("1h", ny(2026, 3, 8, 1, 30), utc(2026, 3, 8, 7, 30)),
        ("PT1H", NOW, utc(2026, 1, 31, 13)),
        ("P1DT2H", NOW, utc(2026, 2, 1, 14)),
        ("P1W", NOW, utc(2026, 2, 7, 12)),
        ("P1M", NOW, utc(2026, 2, 28, 12)),
        ("P1M", utc(2028, 1, 31), utc(2028, 2, 29)),
        ("-P1D", NOW, utc(2026, 1, 30, 12)),
    ],
)
def test_points_in_time(value: str, now: datetime, expected: datetime) -> None:
    result = parse_point_in_time(value, now)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("R5/PT1H", "'R5/PT1H': repeating intervals are not allowed"),
        ("R/PT1H", "'R/PT1H': repeating intervals are not allowed"),
        ("2026-01-01T00:00:00Z/P1D", "'2026-01-01T00:00:00Z/P1D': ISO 8601 intervals are not"),
        ("2026-01-02T15:04:05", "'2026-01-02T15:04:05' has no time zone offset"),
        ("2026-02-30T00:00:00Z", "'2026-02-30T00:00:00Z' is not a valid RFC 3339 time"),
        ("2026-01-02T15:04:05+24:00", "'2026-01-02T15:04:05+24:00' has an invalid time zone"),
        ("tomorrow", "'tomorrow' is not an RFC 3339 time, a Go duration or an ISO 8601 duration"),
        ("5", "'5' is not an RFC 3339 time, a Go duration or an ISO 8601 duration"),
        ("", "'' is not an RFC 3339 time, a Go duration or an ISO 8601 duration"),
        ("P1000000Y", "'P1000000Y' from 2026-01-31T12:00:00+00:00 is out of range"),
    ],
)
def test_rejected_points_in_time(value: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_point_in_time(value, NOW)
    assert message in str(error.value)


def test_point_in_time_rejects_naive_now() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        parse_point_in_time("10s", datetime(2026, 1, 1))
