"""croniter as an independent oracle for etcdcron's cron engine (a test dependency only).

Where the two conventions agree, their next times must be equal: random six-field specs, zones
and instants, away from daylight-saving transitions (where the conventions differ on purpose).
Where they differ, every known difference is an explicit case below, with what each one gives:
croniter's own bugs, and the documented choices of etcdcron (README "Daylight saving time" and
"Day fields").
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import CroniterError, croniter
from hypothesis import assume, given
from hypothesis import strategies as st

from etcdcron.schedule import parse_schedule
from tests.strategies import PROPERTIES, UTC, ZONES, cron_fields, instants

pytestmark = pytest.mark.unit


def croniter_ticks(fields: str, zone: str | None, after: datetime, count: int) -> list[datetime]:
    tz = ZoneInfo(zone) if zone else UTC
    walk = croniter(fields, after.astimezone(tz), second_at_beginning=True)
    return [walk.get_next(datetime).astimezone(UTC) for _ in range(count)]


def etcdcron_ticks(fields: str, zone: str | None, after: datetime, count: int) -> list[datetime]:
    schedule = parse_schedule(f"TZ={zone} {fields}" if zone else fields)
    ticks = []
    for _ in range(count):
        after = schedule.next_after(after)
        ticks.append(after)
    return ticks


def steady(zone: str | None, start: datetime, end: datetime) -> bool:
    """Whether ``zone``'s UTC offset stays the same from ``start`` to ``end`` (checked every
    two days, closer than any two transitions of these zones in 2006-2034)."""
    if zone is None:
        return True
    tz = ZoneInfo(zone)
    offset = start.astimezone(tz).utcoffset()
    moment = start
    while moment < end:
        moment = min(moment + timedelta(days=2), end)
        if moment.astimezone(tz).utcoffset() != offset:
            return False
    return True


@st.composite
def comparable(draw):
    zone = draw(st.none() | st.sampled_from(ZONES))
    return draw(cron_fields(equal_ranges=False, star_days=False)), zone, draw(instants(zone))


@PROPERTIES
@given(comparable())
def test_next_times_agree_with_croniter_where_the_conventions_agree(case):
    fields, zone, after = case
    try:
        expected = croniter_ticks(fields, zone, after, 3)
    except CroniterError:  # croniter looks fewer years ahead than etcdcron
        assume(False)
    assume(expected[-1] - after < timedelta(days=3 * 366) and steady(zone, after, expected[-1]))
    assert etcdcron_ticks(fields, zone, after, 3) == expected


NY, LORD_HOWE = "America/New_York", "Australia/Lord_Howe"


def local(zone: str, *fields: int, fold: int = 0) -> datetime:
    return datetime(*fields, tzinfo=ZoneInfo(zone), fold=fold).astimezone(UTC)


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


# (fields, zone, after, etcdcron's ticks, croniter's ticks), each a known, documented difference.
DIFFERENCES = {
    # croniter bug: an equal range expands to the whole field
    "equal-range": ("0 0 0 23-23 * *", None, utc(2026, 1, 1),
                    [utc(2026, 1, 23), utc(2026, 2, 23)], [utc(2026, 1, 2), utc(2026, 1, 3)]),
    "equal-named-range": ("0 0 0 1 jan-JAN *", None, utc(2026, 1, 15),
                          [utc(2027, 1, 1), utc(2028, 1, 1)], [utc(2026, 2, 1), utc(2026, 3, 1)]),
    # croniter bug: Lord Howe falls back by 30 minutes; croniter repeats New York's hour (see
    # below) but not this half hour: 01:40 shows twice, croniter fires it once
    "lord-howe-fall-back": ("0 */20 * * * *", LORD_HOWE, local(LORD_HOWE, 2026, 4, 5, 1, 40, 13),
                            [local(LORD_HOWE, 2026, 4, 5, 1, 40, fold=1),
                             local(LORD_HOWE, 2026, 4, 5, 2)],
                            [local(LORD_HOWE, 2026, 4, 5, 2), local(LORD_HOWE, 2026, 4, 5, 2, 20)]),
    # convention: a day field starting with '*' (here '*/10') counts as unrestricted, so both
    # day fields must match (Vixie cron, cronie); croniter (like go-etcd-cron) lets either match
    "star-step-day-field": ("0 0 0 */10 * fri", None, utc(2026, 1, 1),
                            [utc(2026, 5, 1), utc(2026, 7, 31)], [utc(2026, 1, 2), utc(2026, 1, 9)]),
    "feb-29-sunday": ("0 0 0 29 2 */7", None, utc(2032, 3, 1),
                      [utc(2060, 2, 29), utc(2088, 2, 29)], [utc(2033, 2, 6), utc(2033, 2, 13)]),
    # convention: a repeated wall time fires twice only if the hour field matches every hour
    "fall-back-pinned-hour": ("0 30 1 * * *", NY, utc(2026, 10, 31, 12),
                              [local(NY, 2026, 11, 1, 1, 30), local(NY, 2026, 11, 2, 1, 30)],
                              [local(NY, 2026, 11, 1, 1, 30),
                               local(NY, 2026, 11, 1, 1, 30, fold=1)]),
    # convention: a wall time in a spring-forward gap fires at the gap's end, whatever the fields
    "spring-forward-every-hour": ("0 30 * * * *", NY, local(NY, 2026, 3, 8, 1, 40),
                                  [local(NY, 2026, 3, 8, 3), local(NY, 2026, 3, 8, 3, 30)],
                                  [local(NY, 2026, 3, 8, 3, 30), local(NY, 2026, 3, 8, 4, 30)]),
    "lord-howe-spring-forward": ("0 0 * * * *", LORD_HOWE, local(LORD_HOWE, 2026, 10, 4, 1, 10),
                                 [local(LORD_HOWE, 2026, 10, 4, 2, 30),
                                  local(LORD_HOWE, 2026, 10, 4, 3)],
                                 [local(LORD_HOWE, 2026, 10, 4, 3),
                                  local(LORD_HOWE, 2026, 10, 4, 4)]),
}


@pytest.mark.parametrize("case", DIFFERENCES.values(), ids=DIFFERENCES.keys())
def test_known_differences_from_croniter(case):
    fields, zone, after, ours, theirs = case
    assert etcdcron_ticks(fields, zone, after, len(ours)) == ours
    assert croniter_ticks(fields, zone, after, len(theirs)) == theirs, \
        "croniter changed: update this case and the README's list of differences"


def test_both_repeat_new_yorks_hour_for_every_hour_schedules():
    # the counterpart of "lord-howe-fall-back": the same rule holds for a 60-minute fall-back
    after = local(NY, 2026, 11, 1, 1, 40, 13)
    both = [local(NY, 2026, 11, 1, 1, fold=1), local(NY, 2026, 11, 1, 1, 20, fold=1)]
    assert etcdcron_ticks("0 */20 * * * *", NY, after, 2) == both
    assert croniter_ticks("0 */20 * * * *", NY, after, 2) == both
