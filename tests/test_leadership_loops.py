"""The lease, leadership-watch and election loops run supervised: a failure injected into each
(once, or every time) shows the replica recovers, or resigns its partitions to the other
replica and claims them again once the loop works, with its health saying so."""

from __future__ import annotations

import logging
import threading

import pytest

from etcdcron import ElectionState
from etcdcron.supervise import STUCK_FAILURES
from etcdcron.testing import wait_until
from tests.test_cluster import fired, ownership, start_replicas, wait_all_elected  # noqa: F401
from tests.test_election import fire_shots, fired_since, firing_pair

pytestmark = [pytest.mark.etcd, pytest.mark.cluster, pytest.mark.slow]

#: loop name -> (the object, the method to break, how to make the loop call it soon)
LOOPS = {
    "etcdcron-lease": (lambda cron: cron._lease, "_extend", lambda cron: None),
    "etcdcron-leader-watch": (lambda cron: cron._elector.watch, "_deliver",
                              lambda cron: cron._elector.watch.relist()),
    "etcdcron-election": (lambda cron: cron._elector, "_evaluate", lambda cron: None),
}


def loop_named(cron, name: str):
    (loop,) = [loop for loop in (*cron._lease.loops, *cron._elector.loops) if loop.name == name]
    return loop


def inject(monkeypatch, cron, name: str, every_time: bool) -> threading.Event:
    """Make loop ``name``'s method raise (once, or until the returned event is set)."""
    target_of, method, poke = LOOPS[name]
    target = target_of(cron)
    original = getattr(target, method)
    healed = threading.Event()

    def failing(*args, **kwargs):
        if not healed.is_set():
            if not every_time:
                healed.set()
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, method, failing)
    poke(cron)
    return healed


@pytest.mark.parametrize("name", LOOPS)
def test_a_loop_that_raises_once_is_restarted_and_its_health_clears(make_cron, fired, producer,
                                                                    monkeypatch, name):
    a, b = start_replicas(make_cron, fired, ["a", "b"])
    wait_all_elected([a, b])
    loop = loop_named(a, name)
    assert loop.health().ok
    inject(monkeypatch, a, name, every_time=False)
    wait_until(lambda: loop.health().restarts == 1, 10, message="the loop to restart")
    failed = loop.health()
    assert failed.alive and failed.last_error == "RuntimeError: injected failure"
    wait_until(lambda: loop.health().ok, 10, message="the loop's next progress")
    assert loop.health().last_progress >= failed.last_error_at
    wait_all_elected([a, b], 15)
    assert fire_shots(producer, fired) == {"a", "b"}


@pytest.mark.parametrize("name", LOOPS)
def test_a_loop_that_keeps_failing_makes_the_replica_resign_until_it_works(make_cron, fired,
                                                                          monkeypatch, caplog,
                                                                          name):
    caplog.set_level(logging.INFO, logger="etcdcron")
    a, b, names = firing_pair(make_cron, fired)
    loop = loop_named(a, name)
    healed = inject(monkeypatch, a, name, every_time=True)

    # Stuck after STUCK_FAILURES failures over a lease TTL: a gives its partitions to b.
    wait_until(lambda: a.election_state is ElectionState.RESIGNED, 30, message="a to resign")
    assert not a.is_elected()
    health = loop.health()
    assert health.failures >= STUCK_FAILURES and not health.ok
    assert health.last_error == "RuntimeError: injected failure"
    wait_until(lambda: ownership(b) == (1, (0,)), 15, message="b to take every partition")
    mark = fired.total()
    wait_until(lambda: fired_since(fired, mark, "b") == names, 10,
               message="every job to fire on b")
    if name != "etcdcron-election":  # (a broken election cannot even look)
        # Its backoff over, a stays out while the loop still fails.
        wait_until(lambda: f"{name} still failing" in caplog.text, 15,
                   message="a to stay out after its backoff")
    assert a.election_state is ElectionState.RESIGNED and not fired_since(fired, mark, "a")

    healed.set()
    wait_until(lambda: loop.health().ok, 20, message="the loop to work again")
    wait_all_elected([a, b], 40)
    assert ownership(a)[0] == ownership(b)[0] == 2


def test_a_relist_asked_for_while_the_watch_lists_still_brings_a_later_snapshot(client, namespace):
    # The election relists after a failed fence and decides nothing until the snapshot comes:
    # a relist() that lands while the watch is listing (before its stream exists) must not
    # be lost, or the election would wait forever.
    from etcdcron.keys import Keys
    from etcdcron.leaderwatch import LeaderWatch

    stop = threading.Event()
    delivered: list[tuple] = []
    watch = LeaderWatch(client, Keys(namespace), stop, delivered.append)
    real_list = client.list_prefix
    listings = []

    class Listing:  # the client, with relist() called in the middle of the first listing
        def __getattr__(self, name):
            return getattr(client, name)

        def list_prefix(self, *args, **kwargs):
            result = real_list(*args, **kwargs)
            listings.append(result[0])
            if len(listings) == 1:
                watch.relist()
            return result

    watch._client = Listing()
    watch.start()
    try:
        wait_until(lambda: len([m for m in delivered if m[0] == "snapshot"]) >= 2, 10,
                   message="a second snapshot after the relist")
        assert len(listings) >= 2
    finally:
        stop.set()
        watch.stop()
        watch.thread.join(10)
