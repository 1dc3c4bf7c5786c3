"""Triggers that outlive their session: handed over, never fired twice, never holding a rebalance.

A session ends (a replica joins, leaves or resigns) while triggers still run. After
``drain_timeout`` the replica writes ``NS/inflight/NAME`` for each, bound to its lease, and
acknowledges the rebalance at once; the job's next owner waits until that key is gone, reads the
counter again and goes on from there.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from etcdcron import Job, TriggerResult
from etcdcron.keys import Keys
from etcdcron.testing import wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.cluster]


class Slow:
    """A trigger that blocks the jobs named ``slow-*`` until released (or ``seconds`` pass)."""

    def __init__(self, seconds: float = 30.0):
        self._lock = threading.Lock()
        self.fired: list[tuple[str, str]] = []
        self.running = 0
        self.release = threading.Event()
        self._seconds = seconds

    def trigger_for(self, replica: str):
        def trigger(req):
            with self._lock:
                self.fired.append((replica, req.name))
            if req.name.startswith("slow-"):
                with self._lock:
                    self.running += 1
                self.release.wait(self._seconds)
                with self._lock:
                    self.running -= 1
        return trigger

    def per_job(self) -> Counter:
        with self._lock:
            return Counter(name for _, name in self.fired)

    def by(self, replica: str) -> list[str]:
        with self._lock:
            return [name for r, name in self.fired if r == replica]


@pytest.fixture
def slow():
    gate = Slow()
    yield gate
    gate.release.set()  # never leave a trigger blocked behind a failed test


def test_triggers_longer_than_the_lease_are_not_fired_again_by_a_rebalance(make_cron, namespace,
                                                                           slow):
    first = make_cron(slow.trigger_for("a"), replica_id="a", workers=10, drain_timeout=0.5)
    first.start()
    assert first.wait_elected(10)
    names = [f"slow-{i}" for i in range(8)]
    for name in names:
        first.add(name, Job(due_time="0s"))
    wait_until(lambda: slow.running == 8, 10, message="8 slow triggers running")
    started = time.monotonic()

    joined = time.monotonic()
    second = make_cron(slow.trigger_for("b"), replica_id="b", workers=8, drain_timeout=0.5)
    second.start()
    assert second.wait_elected(10)
    rebalanced = time.monotonic() - joined
    assert rebalanced < 5, f"the rebalance waited {rebalanced:.1f}s for the slow triggers"
    second.add("quick", Job(due_time="0s"))
    wait_until(lambda: slow.per_job()["quick"] == 1, 10)
    assert first.health().threads  # still running, handing over
    assert sorted(first._engine.handed_over) == names
    # the triggers outlive a whole lease TTL (5 s) without the next owners firing them
    wait_until(lambda: time.monotonic() - started > 6, 10)
    assert slow.running == 8 and set(slow.per_job()) == {*names, "quick"}
    slow.release.set()
    wait_until(lambda: all(first.get(name) is None for name in names), 15,
               message="every slow one-shot recorded and deleted")
    wait_until(lambda: first._engine.handed_over == [], 10)
    client = first._client
    assert client.list_prefix(Keys(namespace).inflight)[1] == []
    assert all(slow.per_job()[name] == 1 for name in names), slow.per_job()
    assert slow.by("b").count("quick") + slow.by("a").count("quick") == 1


def test_a_hung_trigger_holds_neither_the_rebalance_nor_its_job_forever(make_cron, namespace, slow):
    first = make_cron(slow.trigger_for("a"), replica_id="a", drain_timeout=0.2)
    first.start()
    assert first.wait_elected(10)
    first.add("slow-hung", Job(schedule="@every 1s", repeats=2))
    wait_until(lambda: slow.running == 1, 10)
    second = make_cron(slow.trigger_for("b"), replica_id="b", drain_timeout=0.2)
    joined = time.monotonic()
    second.start()
    assert second.wait_elected(10)
    assert time.monotonic() - joined < 5
    # the job is held (by whichever replica owns it now) while its first tick runs
    time_limit = time.monotonic() + 2
    wait_until(lambda: time.monotonic() > time_limit, 3)
    assert slow.per_job()["slow-hung"] == 1
    slow.release.set()
    # its second tick then fires, once, and the job finishes
    wait_until(lambda: first.get("slow-hung") is None, 15)
    assert slow.per_job()["slow-hung"] == 2


def test_when_the_replica_running_a_handed_trigger_goes_away_the_next_owner_fires_it(
        make_cron, namespace, slow):
    first = make_cron(slow.trigger_for("a"), replica_id="a", drain_timeout=0.2)
    first.start()
    assert first.wait_elected(10)
    first.add("slow-orphan", Job(due_time="0s"))
    wait_until(lambda: slow.running == 1, 10)
    second = make_cron(slow.trigger_for("b"), replica_id="b", drain_timeout=0.2)
    second.start()
    assert second.wait_elected(10)
    wait_until(lambda: first._engine.handed_over == ["slow-orphan"], 10)
    # the first replica stops before its trigger returns: its lease (and key) go at once
    with pytest.raises(Exception, match="still running"):
        first.stop(timeout=1)
    slow.release.set()
    wait_until(lambda: slow.by("b").count("slow-orphan") == 1, 15,
               message="the second replica fires the orphaned tick")
    wait_until(lambda: second.get("slow-orphan") is None, 10)


def test_a_handed_trigger_that_says_undeliverable_is_delivered_by_the_next_owner(make_cron,
                                                                               namespace):
    gate = threading.Event()
    fired: list[tuple[str, str]] = []

    def trigger_for(replica):
        def trigger(req):
            fired.append((replica, req.name))
            if replica == "a":
                gate.wait(30)
                return TriggerResult.UNDELIVERABLE
        return trigger

    first = make_cron(trigger_for("a"), replica_id="a", drain_timeout=0.2)
    first.start()
    assert first.wait_elected(10)
    first.add("job", Job(due_time="0s"))
    wait_until(lambda: fired == [("a", "job")], 10)
    second = make_cron(trigger_for("b"), replica_id="b", drain_timeout=0.2)
    second.start()
    assert second.wait_elected(10)
    wait_until(lambda: ["job"] in (first._engine.index.names(), second._engine.index.names()), 10)
    owner = "a" if first._engine.index.names() == ["job"] else "b"
    wait_until(lambda: first._engine.handed_over == ["job"], 10)
    gate.set()
    if owner == "b":
        wait_until(lambda: ("b", "job") in fired, 10)
        wait_until(lambda: second.get("job") is None, 10)
    else:  # it came back to the first replica, which parks it as undeliverable
        wait_until(lambda: first._engine.staging.parked() == ["job"], 10)


def test_a_job_waiting_for_its_deletion_is_not_handed_over(make_cron, etcd, namespace):
    # A session that ends while a job's deletion is still unrecorded (its state RUNNING with
    # no next tick, e.g. etcd down through the drain) hands over only the real deliveries.
    from etcdcron._etcd import EtcdClient

    cron = make_cron(print)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("done", Job(due_time="1h"))
    cron.add("running", Job(due_time="1h"))
    engine = cron._engine
    wait_until(lambda: len(engine.index.names()) == 2, 10)
    with engine.index.lock:
        ownership = engine.index.ownership
        done, running = engine.index.get_locked("done"), engine.index.get_locked("running")
    done.next = None  # as the engine leaves a job whose deletion is queued
    engine._hand_over(ownership, [done, running])
    claims = EtcdClient(etcd.endpoint).list_prefix(Keys(namespace).inflight)[1]
    assert [kv.key for kv in claims] == [Keys(namespace).in_flight("running")]
