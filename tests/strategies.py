"""Hypothesis strategies and settings shared by the property tests of the time grammar.

Deterministic (derandomized, no example database) so that a run in CI is the run you get
locally; a fixed number of examples and no per-example deadline, so a loaded machine makes the
tests slower, never flaky. "Never a hang" is checked with an explicit, generous time bound.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

UTC = timezone.utc

#: Settings of every property test: deterministic, bounded, robust on a loaded machine.
PROPERTIES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow], print_blob=False)

#: No single parse or next-time computation may take this long (a hang fails, a slow CI does not).
TIME_BOUND = 1.0

#: Zones with unusual transitions: a 30-minute shift (Lord Howe), 2 hours (Troll), negative DST
#: (Dublin), a skipped day (Apia, 2011), DST suspended for Ramadan (Casablanca), a :45 offset
#: (Chatham), a transition at midnight (Sao Paulo, until 2019), and plain ones.
ZONES = ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Antarctica/Troll",
         "Europe/Dublin", "Pacific/Apia", "Africa/Casablanca", "Pacific/Chatham",
         "America/Sao_Paulo", "America/St_Johns", "Asia/Kolkata", "Asia/Gaza"]


def bounded(call, *args):
    """``call(*args)``, failing if it takes longer than :data:`TIME_BOUND`."""
    start = time.perf_counter()
    try:
        return call(*args)
    finally:
        elapsed = time.perf_counter() - start
        assert elapsed < TIME_BOUND, f"{call.__name__}{args!r} took {elapsed:.3f}s"


# -- arbitrary text, weighted towards the grammar's own tokens ------------------------------------

_SCHEDULE_TOKENS = [
    "*", "?", "-", "/", ",", " ", "  ", "\t", "0", "1", "2", "5", "7", "12", "13", "23", "24",
    "29", "30", "31", "32", "59", "60", "99999999999", "000000000005", "jan", "DEC", "Mon", "sun",
    "fry", "@every", "@daily", "@yearly", "@hourly", "@weekly", "@fortnightly", "@", "TZ=",
    "CRON_TZ=", "America/New_York", "Europe/Paris", "UTC", "localtime", "../etc", "/", "1h",
    "1.5s", "-1s", "0s", "ns", "\u00b5s", "\x00", "\u00e9", "\n", "9" * 30, "h",
]
_TIME_TOKENS = [
    "P", "T", "Y", "M", "W", "D", "H", "S", "R", "/", "-", "+", ".", ",", ":", "Z", "z", "t",
    "0", "1", "5", "12", "24", "29", "30", "59", "60", "99", "2026", "9999", "0001", "10000",
    "1000000000", "99999999999999999999", "ns", "us", "ms", "s", "m", "h", "d", " ", "e", "\x00",
    "\u00b5", "9" * 300,
]


def token_text(tokens: list[str], max_size: int = 16) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(tokens), max_size=max_size).map("".join)


schedule_text = st.one_of(st.text(max_size=40), token_text(_SCHEDULE_TOKENS))
_number = st.one_of(st.integers(0, 10**25).map(str),
                    st.tuples(st.integers(0, 10**12), st.integers(0, 999)).map(
                        lambda t: f"{t[0]}.{t[1]}"))
_iso_durations = st.builds(
    lambda sign, date_part, time_part: f"{sign}P{date_part}{'T' + time_part if time_part else ''}",
    st.sampled_from(["", "-", "+"]),
    st.lists(st.tuples(_number, st.sampled_from("YMWD")), max_size=2).map(
        lambda terms: "".join(n + u for n, u in terms)),
    st.lists(st.tuples(_number, st.sampled_from("HMS")), max_size=2).map(
        lambda terms: "".join(n + u for n, u in terms)),
)
_go_durations = st.lists(st.tuples(st.sampled_from(["", "-"]), _number,
                                   st.sampled_from(["ns", "us", "ms", "s", "m", "h", "d", ""])),
                         min_size=1, max_size=3).map(lambda terms: "".join(map("".join, terms)))
point_in_time_text = st.one_of(
    st.text(max_size=40),
    token_text(_TIME_TOKENS),
    _iso_durations,
    _go_durations,
    st.builds(lambda y, mo, d, h, mi, s, frac, zone: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:"
                                                     f"{s:02d}{frac}{zone}",
              st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 25),
              st.integers(0, 61), st.integers(0, 61),
              st.sampled_from(["", ".5", ".123456789", "." + "9" * 40]),
              st.sampled_from(["Z", "", "+00:00", "-23:59", "+24:00", "+05:30", "z"])),
)


# -- valid schedules -------------------------------------------------------------------------------

def _field(low: int, high: int, names: tuple[str, ...] = (), star: bool = True,
           equal_ranges: bool = True) -> st.SearchStrategy[str]:
    value = st.integers(low, high).map(str)
    if names:
        value = value | st.sampled_from(names)
    bounds = st.tuples(st.integers(low, high), st.integers(low, high)).map(sorted)
    if not equal_ranges:
        bounds = bounds.filter(lambda pair: pair[0] < pair[1])
    base = st.one_of(value, bounds.map(lambda pair: f"{pair[0]}-{pair[1]}"),
                     *([st.just("*")] if star else []))
    step = st.one_of(st.just(""), st.integers(1, high - low + 2).map(lambda k: f"/{k}"))
    item = st.tuples(base, step).map("".join)
    return st.lists(item, min_size=1, max_size=3).map(",".join)


_MONTHS = ("jan", "FEB", "Mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "MON", "Tue", "wed", "thu", "fri", "sat")


@st.composite
def cron_fields(draw, equal_ranges: bool = True, star_days: bool = True) -> str:
    """Six valid cron fields. ``star_days=False`` leaves out day fields that start with '*'
    but restrict (``*/2``) beside a restricted other day field, where conventions differ."""
    fields = [draw(_field(0, 59, equal_ranges=equal_ranges)),
              draw(_field(0, 59, equal_ranges=equal_ranges)),
              draw(_field(0, 23, equal_ranges=equal_ranges))]
    dom = draw(st.just("*") | st.just("?") | _field(1, 31, equal_ranges=equal_ranges))
    month = draw(st.just("*") | _field(1, 12, _MONTHS, equal_ranges=equal_ranges))
    dow = draw(st.just("*") | st.just("?") | _field(0, 6, _DAYS, equal_ranges=equal_ranges))
    if not star_days:
        if dom[0] in "*?" and dom not in ("*", "?") and dow not in ("*", "?"):
            dom = "*"
        if dow[0] in "*?" and dow not in ("*", "?") and dom not in ("*", "?"):
            dow = "*"
    return " ".join(fields + [dom, month, dow])


zones = st.none() | st.sampled_from(ZONES)
specs = st.one_of(
    st.tuples(zones, cron_fields()).map(lambda z: f"TZ={z[0]} {z[1]}" if z[0] else z[1]),
    st.sampled_from(["@yearly", "@monthly", "@weekly", "@daily", "@hourly"]).flatmap(
        lambda d: zones.map(lambda z: f"TZ={z} {d}" if z else d)),
    st.integers(1, 10**12).map(lambda us: f"@every {us}us"),
)


@functools.cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """The instants (to the second) in 2005-2035 at which ``zone``'s UTC offset changes."""
    tz = ZoneInfo(zone)
    found = []
    moment = datetime(2005, 1, 1, tzinfo=UTC)
    offset = moment.astimezone(tz).utcoffset()
    while moment.year < 2035:
        later = moment + timedelta(days=3)
        later_offset = later.astimezone(tz).utcoffset()
        if later_offset != offset:
            low, high = moment, later
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if middle.astimezone(tz).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            found.append(high.replace(microsecond=0))
            offset = later_offset
        moment = later
    return tuple(found)


def instants(zone: str | None) -> st.SearchStrategy[datetime]:
    """Instants from 2006 to 2034, a third of them within two hours of one of ``zone``'s
    transitions."""
    anywhere = st.datetimes(datetime(2006, 1, 1), datetime(2034, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC))
    if zone is None or not transitions(zone):
        return anywhere
    near = st.tuples(st.sampled_from(transitions(zone)),
                     st.integers(-7200_000_000, 7200_000_000)).map(
        lambda t: t[0] + timedelta(microseconds=t[1]))
    return st.one_of(anywhere, near, near)
