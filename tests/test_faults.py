"""etcd failing under a running Cron: restarts, pauses, outages."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from etcdcron import Cron, Job
from etcdcron._etcd import EtcdClient
from etcdcron.lease import LeaseKeeper
from etcdcron.testing import wait_until
from tests.conftest import Calls

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


@pytest.fixture
def replica(own_etcd, namespace, calls):
    cron = Cron(endpoints=own_etcd.endpoint, namespace=namespace, trigger=calls.add,
                lease_ttl=10)
    yield cron
    cron.stop(timeout=15)


def test_etcd_restart_loses_and_duplicates_nothing(own_etcd, replica, calls: Calls):
    replica.start()
    assert replica.wait_elected(10)
    due = time.time() + 1.5
    replica.add("during", Job(due_time="1500ms"))  # due while etcd is down
    replica.add("after", Job(due_time="4s"))  # due after it is back
    replica.add("every", Job(schedule="@every 500ms", repeats=12))
    calls.wait("every", 1)

    own_etcd.stop()
    # Due while etcd is down: the replica cannot prove its view of the job is current (the
    # read barrier), so it holds the trigger until etcd is back, then fires it once.
    wait_until(lambda: time.time() > due + 0.5, 10, message="'during' to fall due")
    assert calls.count("during") == 0
    own_etcd.start()
    calls.wait("during", 1, timeout=20)

    calls.wait("after", 1, timeout=20)
    wait_until(lambda: not replica.list(), 30, message="every job to finish")
    assert calls.count("during") == 1
    assert calls.count("after") == 1
    assert calls.count("every") == 12


def test_etcd_paused_longer_than_the_lease(own_etcd, namespace, calls: Calls):
    cron = Cron(endpoints=own_etcd.endpoint, namespace=namespace, trigger=calls.add, lease_ttl=3)
    try:
        cron.start()
        assert cron.wait_elected(10)
        cron.add("later", Job(due_time="6s"))
        own_etcd.pause()
        try:
            wait_until(lambda: not cron.is_elected(), 10, message="the lease to run out")
        finally:
            own_etcd.resume()
        assert cron.wait_elected(30)
        calls.wait("later", 1, timeout=20)
        wait_until(lambda: not cron.list(), 10)
        assert calls.count("later") == 1
    finally:
        cron.stop(timeout=15)


def test_a_lease_that_ran_out_while_etcd_was_frozen_is_never_valid_again(own_etcd):
    # etcd frozen for longer than the lease's validity, but thawed before its own expiry: the
    # keepalive sent before the freeze is answered late, and etcd renews the lease. The
    # generation that ran out must stay over; the keeper goes on under a new generation.
    client = EtcdClient(own_etcd.endpoint)
    stop = threading.Event()
    keeper = LeaseKeeper(client, 3, stop, on_change=lambda: None)
    keeper.start()
    try:
        first = wait_until(keeper.current, 10, message="a lease")
        own_etcd.pause()
        try:
            wait_until(lambda: not keeper.valid(), 10, message="the lease's validity to run out")
        finally:
            own_etcd.resume()

        def next_generation():
            assert not keeper.valid(first[1]), "the generation that ran out became valid again"
            current = keeper.current()
            return current if current and current[1] != first[1] else None

        wait_until(next_generation, 20, message="a new generation of the lease")
    finally:
        stop.set()
        keeper.stop()
        keeper.thread.join(10)
        client.close()


def test_crud_raises_a_clear_error_when_etcd_is_down(own_etcd, namespace):
    from etcdcron import EtcdUnavailableError

    cron = Cron(endpoints=own_etcd.endpoint, namespace=namespace, trigger=print,
                request_timeout=1)
    own_etcd.stop()
    try:
        with pytest.raises(EtcdUnavailableError, match="UNAVAILABLE") as info:
            cron.get("job")
        assert isinstance(info.value, ConnectionError)
        assert info.value.__cause__ is not None
    finally:
        own_etcd.start()
        cron.stop()


@pytest.mark.parametrize("victim", ["connected", "leader"])
def test_three_member_etcd_cluster_survives_losing_a_member(namespace, calls: Calls, victim):
    from etcdcron.testing import EtcdCluster

    with EtcdCluster(3) as cluster:
        cron = Cron(endpoints=cluster.endpoints, namespace=namespace, trigger=calls.add,
                    lease_ttl=5)
        try:
            cron.start()
            assert cron.wait_elected(20)
            cron.add("every", Job(schedule="@every 200ms", repeats=30))
            for i in range(10):
                cron.add(f"shot-{i}", Job(due_time=f"{1000 + 300 * i}ms"))
            calls.wait("every", 3)

            # The first endpoint is where the channel is connected.
            dead = cluster.members[0] if victim == "connected" else cluster.leader()
            dead.kill()

            wait_until(lambda: not cron.list(), 40, message="every job to finish")
            # A write retried on another member after the first attempt was applied fails its
            # compares harmlessly, so losing a member duplicates nothing.
            assert calls.count("every") == 30
            assert [calls.count(f"shot-{i}") for i in range(10)] == [1] * 10
            cron.add("after", Job(due_time="0s"))
            calls.wait("after", 1, timeout=20)
        finally:
            cron.stop(timeout=15)


def test_a_watch_that_fell_behind_compaction_lists_again(own_etcd, replica, calls: Calls,
                                                        caplog):
    """While the informer is held up, jobs change, etcd compacts and restarts: the watch cannot
    resume from its revision, so the informer lists again and reconciles."""
    from etcdcron._etcd import EtcdClient

    caplog.set_level(logging.INFO, logger="etcdcron")
    replica.start()
    assert replica.wait_elected(10)
    replica.add("doomed", Job(due_time="3s"))
    replica.add("kept", Job(due_time="3s"))
    wait_until(lambda: replica._engine.index.names() == ["doomed", "kept"], 10)

    client = EtcdClient(own_etcd.endpoint)
    try:
        with replica._engine.index.lock:  # the informer blocks on its next event
            replica.delete("doomed")
            replica.add("added", Job(due_time="0s"))
            for i in range(5):
                replica.add(f"churn-{i}", Job(due_time="1h"))
            client.compact(client.current_revision())
            own_etcd.restart()  # breaks the stream; it must resume from a compacted revision
        calls.wait("added", 1, timeout=20)
        calls.wait("kept", 1, timeout=20)
        wait_until(lambda: replica.get("kept") is None, 10)
        # etcd shows the delete before this replica has recorded it in its index
        churn = [f"churn-{i}" for i in range(5)]
        wait_until(lambda: replica._engine.index.names() == churn, 10)
    finally:
        client.close()
    assert calls.count("doomed") == 0
    assert calls.count("kept") == 1 and calls.count("added") == 1
    assert "job watch fell behind compaction" in caplog.text
