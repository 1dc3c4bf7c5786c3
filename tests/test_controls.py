"""Scheduling controls on a real etcd: catch-up after downtime, coalescing, pause and resume.

Downtime is made with the Cron's injected wall clock (a replica whose clock is an hour ahead
sees an hour of missed ticks), so the tests wait for seconds, not hours.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from etcdcron import Job, JobNotFoundError
from etcdcron.testing import wait_until
from tests.conftest import Calls

pytestmark = pytest.mark.etcd

HOUR = 3600.0


def ahead(seconds: float):
    return lambda: time.time() + seconds


def at_a_whole_second() -> str:
    start = datetime.fromtimestamp(int(time.time()) + 1, timezone.utc)
    return start.isoformat()


def test_coalesce_fires_a_run_of_missed_ticks_once(make_cron, calls, producer):
    producer.add("tick", Job(schedule="@every 1s", due_time=at_a_whole_second(), coalesce=True))
    cron = make_cron(calls.add, clock=ahead(HOUR))  # an hour of ticks missed
    cron.start()
    assert cron.wait_elected(10)
    calls.wait("tick", 1)
    status = cron.status("tick")
    assert status.skipped >= HOUR - 5
    assert status.count == calls.count("tick") <= 2
    fake_now = datetime.fromtimestamp(time.time() + HOUR, timezone.utc)
    assert fake_now - status.last_trigger < timedelta(seconds=3)
    calls.wait("tick", 3)  # and on it goes, a tick a second
    assert cron.status("tick").skipped == status.skipped


def test_a_catch_up_window_skips_what_is_later_than_it(make_cron, calls, producer):
    producer.add("tick", Job(schedule="@every 1s", due_time=at_a_whole_second(),
                             catch_up_window="5s"))
    cron = make_cron(calls.add, clock=ahead(HOUR))
    cron.start()
    assert cron.wait_elected(10)
    calls.wait("tick", 5)  # the ticks within the window fire, in order
    status = cron.status("tick")
    assert HOUR - 10 <= status.skipped <= HOUR
    assert status.count + status.skipped >= HOUR
    assert calls.count("tick") < 20


def test_without_a_policy_every_missed_tick_fires(make_cron, calls, producer):
    producer.add("tick", Job(schedule="@every 1s", due_time=at_a_whole_second()))
    cron = make_cron(calls.add, clock=ahead(60))
    cron.start()
    assert cron.wait_elected(10)
    calls.wait("tick", 60, timeout=20)
    assert cron.status("tick").skipped == 0


def test_a_catch_up_window_after_a_replica_was_down(make_cron, producer, namespace):
    """A real stop: the only replica is down for three ticks, then comes back."""
    first, second = Calls(), Calls()
    producer.add("tick", Job(schedule="@every 1s", due_time=at_a_whole_second(),
                             catch_up_window="500ms"))
    cron = make_cron(first.add)
    cron.start()
    assert cron.wait_elected(10)
    first.wait("tick", 2)
    cron.stop()
    stopped = time.monotonic()
    wait_until(lambda: time.monotonic() - stopped > 3.5, 10)  # down for three ticks or more
    again = make_cron(second.add)
    again.start()
    assert again.wait_elected(10)
    second.wait("tick", 2)
    status = again.status("tick")
    assert status.skipped >= 2
    assert first.count("tick") + second.count("tick") == status.count


def test_pause_holds_across_a_restart_of_every_replica_and_resume_skips_the_paused_ticks(
        make_cron, producer):
    first, second = Calls(), Calls()
    a = make_cron(first.add, replica_id="a")
    b = make_cron(first.add, replica_id="b")
    for cron in (a, b):
        cron.start()
    producer.add("tick", Job(schedule="@every 200ms"))
    first.wait("tick", 3)
    producer.pause("tick")
    assert producer.status("tick").paused
    assert producer.get("tick") == Job(schedule="@every 200ms",
                                       failure_policy=producer.get("tick").failure_policy)
    paused_at = first.count("tick")
    producer.add("barrier", Job(schedule="@every 200ms", repeats=5))
    first.wait("barrier", 5)
    assert first.count("tick") <= paused_at + 1  # one delivery may have been in flight
    for cron in (a, b):
        cron.stop()
    a, b = make_cron(second.add, replica_id="a"), make_cron(second.add, replica_id="b")
    for cron in (a, b):
        cron.start()
    assert a.wait_elected(10) and b.wait_elected(10)
    producer.add("barrier-2", Job(schedule="@every 200ms", repeats=5))
    second.wait("barrier-2", 5)
    assert second.count("tick") == 0
    count = producer.status("tick").count
    resumed = time.monotonic()
    producer.resume("tick")
    second.wait("tick", 3)
    elapsed = time.monotonic() - resumed
    # the paused ticks (seconds of them) are skipped, not caught up: about one per 200 ms
    assert second.count("tick") <= elapsed / 0.2 + 2
    producer.pause("tick")  # then every delivery that fired is recorded, and nothing more fires
    wait_until(lambda: producer.status("tick").count == count + second.count("tick"), 10,
               message="every delivery after the resume recorded")


def test_pausing_a_missing_job_is_a_lookup_error(producer):
    with pytest.raises(JobNotFoundError, match="no such job: 'nope'") as error:
        producer.pause("nope")
    assert isinstance(error.value, LookupError)
    with pytest.raises(LookupError):
        producer.resume("nope")


def test_pause_while_a_trigger_is_in_flight_records_it_and_fires_no_more(make_cron, calls):
    release = threading.Event()

    def trigger(req):
        calls.add(req)
        if req.name == "slow":
            release.wait(30)

    cron = make_cron(trigger)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("slow", Job(schedule="@every 100ms"))
    calls.wait("slow", 1)
    cron.pause("slow")
    cron.pause("slow")  # pausing twice changes nothing
    wait_until(lambda: cron._engine.index.get_locked("slow").record.paused, 10)
    release.set()
    wait_until(lambda: cron.status("slow").count == 1, 10, message="the result recorded")
    cron.add("barrier", Job(schedule="@every 100ms", repeats=5))
    calls.wait("barrier", 5)
    assert calls.count("slow") == 1
    cron.resume("slow")
    calls.wait("slow", 3)
    # re-adding a paused job makes a new, running version
    cron.pause("slow")
    cron.add("slow", Job(schedule="@every 100ms"))
    assert not cron.status("slow").paused
    before = calls.count("slow")
    calls.wait("slow", before + 2)


def test_a_job_whose_next_tick_is_eleven_years_away_is_kept(make_cron, calls):
    when = datetime(2027, 2, 2, tzinfo=timezone.utc).timestamp()
    started = time.time()
    cron = make_cron(calls.add, clock=lambda: when + (time.time() - started))
    cron.start()
    assert cron.wait_elected(10)
    cron.add("rare", Job(schedule="0 0 0 */29 2 mon"))  # Feb 1st on a Monday: 2038 next
    wait_until(lambda: cron._engine.index.names() == ["rare"], 10)
    cron.add("barrier", Job(due_time="0s"))
    calls.wait("barrier", 1)
    status = cron.status("rare")
    assert status.next_trigger == datetime(2038, 2, 1, tzinfo=timezone.utc)
    assert cron.get("rare") is not None


def test_a_per_job_trigger_timeout(make_cron, calls):
    from concurrent.futures import Future

    from etcdcron import FailurePolicy, FailurePolicyDrop

    def trigger(req):
        calls.add(req)
        return Future()  # never resolves

    cron = make_cron(trigger)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("job", Job(due_time="0s", trigger_timeout="300ms",
                        failure_policy=FailurePolicy(drop=FailurePolicyDrop())))
    wait_until(lambda: cron.get("job") is None, 10, message="the timed-out one-shot to finish")
    assert calls.count("job") == 1
