"""Next-time speed of etcdcron's cron engine against croniter's (no etcd needed).

For each schedule: the time of one next tick, as the engine computes it (from the previous
tick, on a parsed and cached schedule), and as croniter does (``get_next`` on an iterator, and
a fresh ``croniter(spec, t)`` per tick, which is what a scheduler that keeps no iterator per job
pays). Best of several runs, in microseconds. Run ``python bench/schedule_speed.py``.
"""

from __future__ import annotations

import os
import sys
import timeit
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

try:
    import etcdcron  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from croniter import croniter

from etcdcron.schedule import parse_schedule

SCHEDULES = [
    ("*/5 * * * * *", None),
    ("0 */15 * * * *", None),
    ("0 0 9 * * mon-fri", None),
    ("0 0 0 1 * *", None),
    ("0 0 0 29 2 *", None),
    ("0 0 12 * * *", "Europe/Berlin"),
    ("0 30 2 * * *", "America/New_York"),
    ("0 */20 * * * *", "Australia/Lord_Howe"),
]
TICKS = 200
START = datetime(2026, 1, 1, 0, 0, 7, tzinfo=timezone.utc)


def best(run, repeat: int = 5) -> float:
    """Microseconds per tick, best of ``repeat`` runs of ``TICKS`` ticks."""
    return min(timeit.repeat(run, number=1, repeat=repeat)) / TICKS * 1e6


def measure(fields: str, zone: str | None) -> tuple[float, float, float]:
    schedule = parse_schedule(f"TZ={zone} {fields}" if zone else fields)
    start = START.astimezone(ZoneInfo(zone)) if zone else START

    def ours():
        tick = start
        for _ in range(TICKS):
            tick = schedule.next_after(tick)

    def theirs_iterating():
        walk = croniter(fields, start, second_at_beginning=True)
        for _ in range(TICKS):
            walk.get_next(datetime)

    def theirs_fresh():
        tick = start
        for _ in range(TICKS):
            tick = croniter(fields, tick, second_at_beginning=True).get_next(datetime)

    return best(ours), best(theirs_iterating), best(theirs_fresh)


def main() -> None:
    print(f"{'schedule':46} {'etcdcron':>9} {'croniter':>9} {'fresh':>9} {'ratio':>11}")
    for fields, zone in SCHEDULES:
        ours, iterating, fresh = measure(fields, zone)
        label = f"TZ={zone} {fields}" if zone else fields
        print(f"{label:46} {ours:8.1f}u {iterating:8.1f}u {fresh:8.1f}u "
              f"{iterating / ours:4.1f}x-{fresh / ours:4.1f}x")
    print("microseconds per next tick, best of 5 runs of", TICKS, "ticks")


if __name__ == "__main__":
    main()
