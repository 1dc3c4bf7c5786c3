"""Job schedules and points in time: parsing and computing the next tick.

Everything here is pure: results depend only on the arguments (the caller injects
``now``), schedules are immutable, and the code runs on whatever thread calls it.

Schedule grammar (see :func:`parse_schedule`):

* six cron fields ``second minute hour day-of-month month day-of-week``;
* a descriptor: ``@yearly``/``@annually``, ``@monthly``, ``@weekly``,
  ``@daily``/``@midnight``, ``@hourly``;
* ``@every <Go duration>``: ticks at ``after + duration``;
* cron fields and descriptors after an optional ``TZ=<IANA zone>`` or ``CRON_TZ=<IANA zone>``
  prefix are evaluated in that zone's wall clock (UTC without a prefix). ``@every`` counts
  elapsed time, so a zone prefix before it is an error. Zone names are those of the IANA tz
  database as the ``tzdata`` package lists them (links such as ``US/Eastern`` included), never
  names whose meaning depends on the host (``localtime``, ``posixrules``, ``Factory``, paths).

A cron tick is a wall-clock time matching every field, mapped to an instant.
Daylight-saving rules for zoned schedules:

* A wall time inside a spring-forward gap fires once, at the first instant after the
  gap (02:30 on 2026-03-08 in America/New_York fires at 03:00 EDT). Several such wall
  times collapse into that one instant.
* A wall time repeated by a fall-back transition fires at both instants when the hour
  field matches all 24 hours (the schedule keeps its rhythm), and only at the first
  instant (the earlier offset) when the schedule is pinned to particular hours.
* Ticks strictly increase: ``next_after(t)`` is the smallest tick instant after ``t``,
  for any ``t``, including one inside a repeated hour in either fold.

Mapping wall times to first instants (gap walls to the gap's end) is monotonic, so the
next tick is the first instant of the first matching wall time after ``t``'s wall time
(after the repeated interval when ``t`` is in its second pass), or, for schedules
matching every hour, a second-pass instant of the repeated interval around ``t``.

The search for the next matching day looks at most one Gregorian cycle (400 years,
146,097 days, a whole number of weeks) ahead: the calendar repeats after it, so a schedule
that matches no day in it never matches (such a schedule is known when it is built, and
``next_after`` answers ``None`` at once). Ticks exist from :data:`FIRST_TICK` to
:data:`LAST_TICK` (``datetime``'s range less two days at each end, so that every zone's wall
clock of them is a ``datetime`` too); ``next_after`` never raises for an aware ``after``:
past :data:`LAST_TICK` there is no next tick, and an ``after`` before :data:`FIRST_TICK`
gives the first tick from it.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import zoneinfo
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import NamedTuple, cast
from zoneinfo import ZoneInfo

import isodate

__all__ = [
    "FIRST_TICK",
    "LAST_TICK",
    "CronSchedule",
    "EverySchedule",
    "Schedule",
    "parse_duration",
    "parse_go_duration",
    "parse_point_in_time",
    "parse_schedule",
]

UTC = timezone.utc

#: The earliest instant a tick can fall on.
FIRST_TICK = datetime(1, 1, 3, tzinfo=UTC)
#: The latest instant a tick can fall on; after it no schedule has a next tick.
LAST_TICK = datetime(9999, 12, 29, tzinfo=UTC)

_SECOND = timedelta(seconds=1)
_DAY = timedelta(days=1)
_BEFORE_FIRST_TICK = FIRST_TICK - timedelta(microseconds=1)
_LAST_WALL = LAST_TICK.replace(tzinfo=None)
# A zone's wall clock runs less than a day ahead of UTC.
_LAST_ZONED_WALL = _LAST_WALL + _DAY
# One Gregorian cycle, plus the day a match at an earlier time of day may need.
_SEARCH_SPAN = timedelta(days=146_097 + 1)
_ALL_HOURS = (1 << 24) - 1
_MONTH_LENGTHS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# Bits 1..n set: the days of a month of n days.
_MONTH_BITS = tuple((1 << n + 1) - 2 for n in range(32))


class Schedule(ABC):
    """When a job fires. Immutable and safe to share between threads."""

    __slots__ = ()

    @abstractmethod
    def next_after(self, after: datetime) -> datetime | None:
        """Return the first tick strictly after ``after``.

        :param after: an aware datetime, in any zone, anywhere in ``datetime``'s range.
        :returns: an aware datetime in UTC, or ``None`` if there is no tick after ``after`` up
            to :data:`LAST_TICK`.
        :raises ValueError: if ``after`` is naive.
        """


@dataclass(frozen=True, slots=True)
class EverySchedule(Schedule):
    """``@every <duration>``: ticks at a fixed interval from the previous one."""

    interval: timedelta
    #: The latest ``after`` that still has a next tick.
    _latest: datetime | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            latest = LAST_TICK - self.interval
        except OverflowError:
            latest = None
        object.__setattr__(self, "_latest", latest)

    def next_after(self, after: datetime) -> datetime | None:
        instant = _instant(after)
        if instant is None or self._latest is None or instant > self._latest:
            return None
        return instant + self.interval


@dataclass(frozen=True, slots=True)
class CronSchedule(Schedule):
    """Six cron fields evaluated in a zone's wall clock (UTC when ``zone`` is None).

    Each field is a bitmask with bit ``n`` set when value ``n`` matches; ``weekdays``
    uses 0 for Sunday. ``either_day`` selects OR semantics for the two day fields.
    """

    seconds: int
    minutes: int
    hours: int
    days: int
    months: int
    weekdays: int
    either_day: bool
    zone: ZoneInfo | None = None
    #: ``_week[f]``: bits of the days of a month whose weekday matches, when its 1st is
    #: weekday ``f`` (0 = Sunday).
    _week: tuple[int, ...] = field(init=False, repr=False, compare=False)
    #: Whether any day matches: every month starts on every weekday, in leap years and in
    #: common ones, within one Gregorian cycle.
    _fires: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        week = tuple(
            sum(1 << day for day in range(1, 32) if self.weekdays >> (first + day - 1) % 7 & 1)
            for first in range(7)
        )
        object.__setattr__(self, "_week", week)
        lengths = {(month, _MONTH_LENGTHS[month] + (leap and month == 2))
                   for month in range(1, 13) if self.months >> month & 1 for leap in (0, 1)}
        fires = any(self._day_bits(length, first) for _, length in lengths for first in range(7))
        object.__setattr__(self, "_fires", fires)

    def next_after(self, after: datetime) -> datetime | None:
        instant = _instant(after)
        if instant is None or not self._fires:
            return None
        if instant < _BEFORE_FIRST_TICK:
            instant = _BEFORE_FIRST_TICK
        if self.zone is None:
            wall = instant.replace(tzinfo=None)
            found = self._next_wall(_next_second(wall), _search_limit(wall, _LAST_WALL))
            return None if found is None else found.replace(tzinfo=UTC)
        tick = self._next_in_zone(instant)
        return tick if tick is not None and tick <= LAST_TICK else None

    def _next_in_zone(self, instant: datetime) -> datetime | None:
        """Apply the daylight-saving rules of the module docstring."""
        local = instant.astimezone(self.zone)
        wall = local.replace(tzinfo=None, fold=0)
        fold = self._fold_around(local)
        after_wall = _next_second(wall)
        in_second_pass = fold is not None and local.fold == 1
        ticks = []
        first_start = fold.end if in_second_pass and fold is not None else after_wall
        first_wall = self._next_wall(first_start, _search_limit(wall, _LAST_ZONED_WALL))
        if first_wall is not None:
            ticks.append(self._first_instant(first_wall))
        if fold is not None and self.hours == _ALL_HOURS:
            repeat_start = after_wall if in_second_pass else fold.start
            repeat_wall = self._next_wall(repeat_start, fold.end - _SECOND)
            if repeat_wall is not None:
                ticks.append((repeat_wall - fold.offset).replace(tzinfo=UTC))
        return min(ticks, default=None)

    def _next_wall(self, start: datetime, limit: datetime) -> datetime | None:
        """Return the first wall time at or after ``start`` (whole seconds) matching all
        fields, or ``None`` if it is later than ``limit``."""
        if self.months >> start.month & 1 and self._day_matches(start):
            found = self._time_of_day(start)
            if found is not None:
                return found if found <= limit else None
        day = self._next_day(start.year, start.month, start.day + 1, limit.year)
        if day is None:
            return None
        # A field never matches nothing (parsing rejects it), so each _ceil(..., 0) is an int.
        found = datetime(*day, cast(int, _ceil(self.hours, 0)), cast(int, _ceil(self.minutes, 0)),
                         cast(int, _ceil(self.seconds, 0)))
        return found if found <= limit else None

    def _next_day(self, year: int, month: int, day: int,
                  last_year: int) -> tuple[int, int, int] | None:
        """Return ``(year, month, day)`` of the first matching day at or after the given one
        (``day`` may be past the month's end), in ``last_year`` at the latest."""
        while year <= last_year:
            next_month = _ceil(self.months, month)
            if next_month is None:
                year, month, day = year + 1, 1, 1
                continue
            if next_month != month:
                month, day = next_month, 1
            length = _MONTH_LENGTHS[month]
            if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
                length = 29
            first = (date(year, month, 1).weekday() + 1) % 7
            found = _ceil(self._day_bits(length, first), day)
            if found is not None:
                return year, month, found
            month, day = month + 1, 1
        return None

    def _day_bits(self, length: int, first: int) -> int:
        """Bits of the matching days of a month of ``length`` days whose 1st is weekday
        ``first`` (0 = Sunday)."""
        in_month = self.days & _MONTH_BITS[length]
        in_week = self._week[first] & _MONTH_BITS[length]
        return in_month | in_week if self.either_day else in_month & in_week

    def _day_matches(self, moment: datetime) -> bool:
        in_month = self.days >> moment.day & 1
        in_week = self.weekdays >> moment.isoweekday() % 7 & 1
        return bool(in_month | in_week if self.either_day else in_month & in_week)

    def _time_of_day(self, moment: datetime) -> datetime | None:
        """Return the first matching time at or after ``moment`` on the same day."""
        hour, minute, second = moment.hour, moment.minute, moment.second
        while (next_hour := _ceil(self.hours, hour)) is not None:
            if next_hour != hour:
                hour, minute, second = next_hour, 0, 0
            next_minute = _ceil(self.minutes, minute)
            if next_minute is None:
                hour, minute, second = hour + 1, 0, 0
                continue
            if next_minute != minute:
                minute, second = next_minute, 0
            next_second = _ceil(self.seconds, second)
            if next_second is not None:
                return moment.replace(hour=hour, minute=minute, second=next_second)
            minute, second = minute + 1, 0
        return None

    def _first_instant(self, wall: datetime) -> datetime:
        """Return the first instant showing ``wall``, or the end of the gap that skips it."""
        first = wall.replace(tzinfo=self.zone).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        return first if first <= second else self._transition(second, first)

    def _fold_around(self, local: datetime) -> _Fold | None:
        """Return the repeated wall-clock interval containing ``local``, if any."""
        # ``local`` is aware (in self.zone), so neither offset is None.
        offset = cast(timedelta, local.utcoffset())
        other = cast(timedelta, local.replace(fold=1 - local.fold).utcoffset())
        if offset == other:
            return None
        earlier, later = (other, offset) if local.fold else (offset, other)
        instant = local.astimezone(UTC).replace(microsecond=0)
        shift = earlier - later
        if local.fold:
            transition = self._transition(instant - shift, instant)
        else:
            transition = self._transition(instant, instant + shift)
        start = (transition + later).replace(tzinfo=None)
        return _Fold(start, start + shift, later)

    def _transition(self, before: datetime, after: datetime) -> datetime:
        """Return the first instant in ``(before, after]`` with the offset in force at ``after``;
        offsets change only at whole seconds and once in that interval."""
        target = self._offset(after)
        low, high = 0, int((after - before).total_seconds())
        while high - low > 1:
            middle = (low + high) // 2
            if self._offset(before + timedelta(seconds=middle)) == target:
                high = middle
            else:
                low = middle
        return before + timedelta(seconds=high)

    def _offset(self, instant: datetime) -> timedelta:
        return cast(timedelta, instant.astimezone(self.zone).utcoffset())  # aware: never None


class _Fold(NamedTuple):
    """A wall-clock interval ``[start, end)`` that a fall-back repeats; the repetition
    runs at UTC offset ``offset``."""

    start: datetime
    end: datetime
    offset: timedelta


@dataclass(frozen=True)
class _Field:
    """A cron field accepting ``low``-``high``; ``*`` and ``a/n`` run up to ``last``."""

    name: str
    low: int
    high: int
    last: int
    names: dict[str, int] = field(default_factory=dict)
    names_hint: str = ""


_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS = (
    _Field("second", 0, 59, 59),
    _Field("minute", 0, 59, 59),
    _Field("hour", 0, 23, 23),
    _Field("day-of-month", 1, 31, 31),
    _Field(
        "month", 1, 12, 12, {n: i for i, n in enumerate(_MONTH_NAMES, 1)}, "month name (jan-dec)"
    ),
    _Field(
        "day-of-week", 0, 7, 6, {n: i for i, n in enumerate(_WEEKDAY_NAMES)}, "day name (sun-sat)"
    ),
)
_FIELD_NAMES = " ".join(f.name for f in _FIELDS)
_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_ITEM = re.compile(
    r"(?:(?P<any>[*?])|(?P<start>[^-/]+)(?:-(?P<end>[^-/]+))?)(?:/(?P<step>.*))?", re.DOTALL
)
_NUMBER = re.compile(r"[0-9]+")


@functools.lru_cache(maxsize=4096)  # many jobs share a schedule; a Schedule is immutable
def parse_schedule(spec: str) -> Schedule:
    """Parse a job schedule: six cron fields, a descriptor or ``@every <duration>``,
    optionally prefixed by ``TZ=<zone>`` or ``CRON_TZ=<zone>``.

    :param spec: the schedule text; surrounding and repeated whitespace is ignored.
    :returns: an immutable :class:`Schedule`.
    :raises ValueError: with a message naming the offending field and value.
    """
    words = spec.split()
    zone = None
    if words and words[0].startswith(("TZ=", "CRON_TZ=")):
        zone = _parse_zone(words[0].partition("=")[2])
        words = words[1:]
    if not words:
        raise ValueError(f"schedule {spec!r} is empty")
    keyword = words[0].lower()
    if keyword == "@every":
        if zone is not None:
            raise ValueError(
                f"schedule {spec!r}: @every counts elapsed time, so a time zone does not apply "
                f"to it; remove {spec.split()[0]!r}"
            )
        return _parse_every(words[1:], spec)
    if keyword.startswith("@"):
        return _parse_cron(_expand_descriptor(keyword, words[1:], spec), spec, zone)
    return _parse_cron(words, spec, zone)


#: Zone names whose meaning depends on the host's configuration, not on the tz database.
_HOST_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def _zone_names() -> frozenset[str]:
    """The IANA zone names a schedule may use: every name the ``tzdata`` package lists (zones
    and their backward-compatible links), less the host-dependent ones."""
    try:
        listed = importlib.resources.files("tzdata").joinpath("zones").read_text("utf-8")
        names = frozenset(listed.split())
    except (ImportError, OSError):
        names = frozenset(zoneinfo.available_timezones())
    return names - _HOST_ZONES


def _parse_zone(name: str) -> ZoneInfo:
    if name not in _zone_names():
        if name in _HOST_ZONES:
            reason = "it depends on how each host is configured"
        elif name.startswith(("/", ".")) or "/." in name or "\\" in name:
            reason = "a path is not a zone name"
        else:
            reason = "it is not in the IANA tz database"
        raise ValueError(
            f"unknown time zone {name!r}: {reason}; give an IANA name such as 'Europe/Paris'"
        )
    try:
        return ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as error:
        raise ValueError(f"time zone {name!r} cannot be loaded: {error}") from None


def _parse_every(words: list[str], spec: str) -> EverySchedule:
    if len(words) != 1:
        raise ValueError(
            f"schedule {spec!r}: @every takes exactly one Go duration, e.g. '@every 1h30m'"
        )
    try:
        interval = parse_go_duration(words[0])
    except ValueError as error:
        raise ValueError(f"schedule {spec!r}: {error}") from None
    if interval <= timedelta(0):
        raise ValueError(
            f"schedule {spec!r}: @every duration {words[0]!r} must be positive (at least 1us)"
        )
    return EverySchedule(interval)


def _expand_descriptor(keyword: str, arguments: list[str], spec: str) -> list[str]:
    if keyword not in _DESCRIPTORS:
        known = ", ".join(_DESCRIPTORS)
        raise ValueError(
            f"schedule {spec!r}: unknown descriptor {keyword!r}; expected one of {known} or @every"
        )
    if arguments:
        raise ValueError(f"schedule {spec!r}: descriptor {keyword!r} takes no arguments")
    return _DESCRIPTORS[keyword].split()


def _parse_cron(words: list[str], spec: str, zone: ZoneInfo | None) -> CronSchedule:
    if len(words) != len(_FIELDS):
        message = f"schedule {spec!r}: expected 6 fields ({_FIELD_NAMES}), got {len(words)}"
        if len(words) == 5:
            message += f"; add a seconds field first, e.g. {'0 ' + ' '.join(words)!r}"
        raise ValueError(message)
    seconds, minutes, hours, days, months, weekdays = (
        _parse_field(text, column) for text, column in zip(words, _FIELDS)
    )
    if weekdays >> 7 & 1:
        weekdays = (weekdays | 1) & ~(1 << 7)
    either_day = words[3][0] not in "*?" and words[5][0] not in "*?"
    return CronSchedule(seconds, minutes, hours, days, months, weekdays, either_day, zone)


def _parse_field(text: str, column: _Field) -> int:
    mask = 0
    for item in text.split(","):
        mask |= _parse_item(item, text, column)
    return mask


def _parse_item(item: str, text: str, column: _Field) -> int:
    match = _ITEM.fullmatch(item)
    if match is None:
        raise _field_error(column, text, f"malformed item {item!r}")
    step = 1 if match["step"] is None else _parse_step(match["step"], text, column)
    if match["any"]:
        start, end = column.low, column.last
    else:
        start = _parse_value(match["start"], text, column)
        if match["end"] is not None:
            end = _parse_value(match["end"], text, column)
        else:
            end = max(start, column.last) if match["step"] is not None else start
    if start > end:
        raise _field_error(column, text, f"range {item!r} starts after it ends")
    return sum(1 << value for value in range(start, end + 1, step))


def _parse_step(token: str, text: str, column: _Field) -> int:
    if not _NUMBER.fullmatch(token) or _small_int(token) == 0:
        raise _field_error(column, text, f"step {token!r} must be a positive integer")
    return _small_int(token)


def _small_int(digits: str) -> int:
    """The value of ``digits``, capped where it exceeds any field (and int()'s digit limit)."""
    digits = digits.lstrip("0")
    return int(digits or "0") if len(digits) < 10 else 10**9


def _parse_value(token: str, text: str, column: _Field) -> int:
    if _NUMBER.fullmatch(token):
        value = _small_int(token)
        if not column.low <= value <= column.high:
            bounds = f"{column.low}-{column.high}"
            raise _field_error(column, text, f"{token!r} is out of range {bounds}")
        return value
    if token.lower() in column.names:
        return column.names[token.lower()]
    kind = f"a number or a {column.names_hint}" if column.names else "a number"
    raise _field_error(column, text, f"{token!r} is not {kind}")


def _field_error(column: _Field, text: str, reason: str) -> ValueError:
    return ValueError(f"invalid {column.name} field {text!r}: {reason}")


def _ceil(mask: int, value: int) -> int | None:
    """Return the smallest set bit of ``mask`` at or above ``value``, or ``None``."""
    rest = mask >> value
    return value + (rest & -rest).bit_length() - 1 if rest else None


def _next_second(wall: datetime) -> datetime:
    return wall.replace(microsecond=0) + _SECOND


def _search_limit(wall: datetime, end: datetime) -> datetime:
    """How far to look for a match after ``wall``: one Gregorian cycle, or up to ``end``."""
    return wall + _SEARCH_SPAN if wall < end - _SEARCH_SPAN else end


def _to_utc(moment: datetime, name: str) -> datetime:
    if moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC)


def _instant(after: datetime) -> datetime | None:
    """``after`` in UTC, ``None`` if it is later than :data:`LAST_TICK`; an ``after`` too early
    for UTC to hold (year 1 east of Greenwich) is just before :data:`FIRST_TICK`."""
    try:
        instant = _to_utc(after, "after")
    except OverflowError:
        return None if after.year > 1 else _BEFORE_FIRST_TICK
    return None if instant > LAST_TICK else instant


_GO_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_GO_TERM = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")
_GO_MAX_NANOS = 1 << 63


def parse_go_duration(value: str) -> timedelta:
    """Parse a duration the way Go's ``time.ParseDuration`` does, e.g. ``1h30m`` or ``-1.5s``.

    Units are ns, us, µs, μs, ms, s, m and h; a bare number other than ``0`` is rejected.
    The result is truncated (towards zero) to microseconds.

    :param value: the duration text.
    :raises ValueError: if ``value`` is not a valid Go duration.
    """
    text = value[1:] if value[:1] in ("-", "+") else value
    if text == "0":
        return timedelta(0)
    if not text:
        raise _go_error(value, "no number")
    nanos = 0
    position = 0
    while position < len(text):
        term = _GO_TERM.match(text, position)
        assert term is not None  # every part of _GO_TERM is optional: it always matches
        whole, fraction, unit = term.groups()
        if not whole and not fraction:
            raise _go_error(value, f"no number before {text[position:]!r}")
        if not unit:
            raise _go_error(value, "missing unit (ns, us, ms, s, m or h)")
        if unit not in _GO_UNITS:
            raise _go_error(value, f"unknown unit {unit!r}")
        nanos += _go_term_nanos(whole, fraction or "", _GO_UNITS[unit])
        position = term.end()
    negative = value[0] == "-"
    if nanos > _GO_MAX_NANOS - (0 if negative else 1):
        raise _go_error(value, "out of range")
    micros = nanos // 1_000
    return timedelta(microseconds=-micros if negative else micros)


def _go_term_nanos(whole: str, fraction: str, unit: int) -> int:
    # Digits past these cannot matter (the result is range-checked, then cut to microseconds),
    # and int() refuses strings of thousands of digits.
    whole, fraction = whole.lstrip("0")[:21], fraction[:30]
    scale: int = 10 ** len(fraction)  # int ** int is Any to mypy (a negative power is a float)
    return int(whole or 0) * unit + int(fraction or 0) * unit // scale


def _go_error(value: str, reason: str) -> ValueError:
    return ValueError(f"invalid Go duration {value!r}: {reason}")


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?",
    re.ASCII,
)


def parse_point_in_time(value: str, now: datetime) -> datetime:
    """Parse a due time or TTL: an RFC 3339 time, or a Go or ISO 8601 duration from ``now``.

    Durations are added to ``now`` in UTC; ISO 8601 months and years follow isodate's
    calendar rules (2026-01-31 + ``P1M`` is 2026-02-28).

    :param value: e.g. ``2026-01-02T15:04:05Z``, ``1h30m``, ``-5s`` or ``P1DT2H``.
    :param now: the aware reference time for durations.
    :returns: an aware datetime in UTC.
    :raises ValueError: if ``value`` is none of the accepted forms, lacks a zone offset,
        is a repeating interval, or is out of range; or if ``now`` is naive.
    """
    reference = _to_utc(now, "now")
    text = value.strip()
    if "/" in text:
        kind = "repeating intervals are" if text[:1] in "Rr" else "ISO 8601 intervals are"
        raise ValueError(f"{value!r}: {kind} not allowed, give a single time or duration")
    match = _RFC3339.fullmatch(text)
    if match is not None:
        return _parse_rfc3339(match, value)
    for parse in (parse_go_duration, isodate.parse_duration):
        try:
            offset = parse(text)
        except ValueError:
            continue
        except ArithmeticError:  # isodate: more days than a timedelta holds
            raise _out_of_range(value, reference) from None
        return _shift(reference, offset, value)
    raise ValueError(f"{value!r} is not an RFC 3339 time, a Go duration or an ISO 8601 duration")


@functools.lru_cache(maxsize=1024)  # read on the hot path for jobs that carry one
def parse_duration(value: str) -> timedelta:
    """Parse a length of time: a Go duration (``90s``, ``1h30m``) or a fixed ISO 8601 duration
    (``PT90S``, ``P1DT2H``, ``P2W``; not years or months, whose length varies).

    :raises ValueError: if ``value`` is neither, is negative, a repeating form, or too long
        for a Go duration (about 292 years).
    """
    text = value.strip()
    if "/" in text:
        raise ValueError(f"{value!r}: repeating intervals are not allowed, give a duration")
    try:
        duration = parse_go_duration(text)
    except ValueError:
        try:
            duration = isodate.parse_duration(text)
        except ArithmeticError:
            raise ValueError(f"{value!r} is longer than Go's longest duration (about 292 "
                             "years)") from None
        except ValueError:
            raise ValueError(f"{value!r} is not a Go duration (like '90s') or an ISO 8601 "
                             "duration (like 'PT90S')") from None
        if isinstance(duration, isodate.Duration):
            raise ValueError(f"{value!r}: years and months have no fixed length; give days "
                             "or weeks") from None
    if duration < timedelta(0):
        raise ValueError(f"{value!r} is negative")
    if duration > timedelta(microseconds=(_GO_MAX_NANOS - 1) // 1000):
        raise ValueError(f"{value!r} is longer than Go's longest duration (about 292 years)")
    return duration


def _parse_rfc3339(match: re.Match[str], value: str) -> datetime:
    *date_and_time, fraction, zulu, sign, offset_hours, offset_minutes = match.groups()
    if zulu is None and sign is None:
        raise ValueError(f"{value!r} has no time zone offset; add 'Z' or one like '+00:00'")
    if int(offset_hours or 0) > 23 or int(offset_minutes or 0) > 59:
        raise ValueError(f"{value!r} has an invalid time zone offset")
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    zone = timezone(-offset if sign == "-" else offset)
    micros = int((fraction or "")[:6].ljust(6, "0"))
    try:
        year, month, day, hour, minute, second = map(int, date_and_time)  # six groups
        moment = datetime(year, month, day, hour, minute, second, micros, tzinfo=zone)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as error:
        raise ValueError(f"{value!r} is not a valid RFC 3339 time: {error}") from None


def _shift(reference: datetime, offset: timedelta | isodate.Duration, value: str) -> datetime:
    try:
        return (reference + offset).astimezone(UTC)
    except (ValueError, ArithmeticError):
        raise _out_of_range(value, reference) from None


def _out_of_range(value: str, reference: datetime) -> ValueError:
    return ValueError(f"{value!r} from {reference.isoformat()} is out of range")
