"""start/stop/run, the context manager, threads, options, and one replica's leadership key."""

from __future__ import annotations

import threading
import time

import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from etcdcron import (
    Cron,
    CronState,
    ElectionState,
    Job,
    LifecycleError,
    StopTimeoutError,
    ValidationError,
)
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.testing import wait_until

pytestmark = pytest.mark.etcd


def etcdcron_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("etcdcron-"))


def leadership_keys(client, namespace: str) -> list:
    return client.list_prefix(Keys(namespace).leadership)[1]


def test_start_is_non_blocking_idempotent_and_stop_joins_every_thread(make_cron, calls):
    before = etcdcron_threads()
    cron = make_cron(calls.add, workers=3)
    assert cron.state is CronState.NEW
    assert etcdcron_threads() == before  # no thread before start()

    cron.start()
    cron.start()
    started = etcdcron_threads()
    assert [n for n in started if n.startswith("etcdcron-worker-")] == [
        "etcdcron-worker-0", "etcdcron-worker-1", "etcdcron-worker-2"]
    for name in ["etcdcron-timer", "etcdcron-recorder", "etcdcron-watch", "etcdcron-lease",
                 "etcdcron-leader-watch", "etcdcron-election", "etcdcron-gc"]:
        assert name in started
    assert cron.state is CronState.RUNNING

    cron.stop()
    cron.stop()
    assert cron.state is CronState.STOPPED
    assert etcdcron_threads() == before


def test_start_after_stop_is_a_clear_error(make_cron, calls):
    cron = make_cron(calls.add)
    cron.start()
    cron.stop()
    with pytest.raises(LifecycleError, match="create a new Cron"):
        cron.start()


def test_stop_before_start_and_wait_elected_before_start(make_cron, calls):
    cron = make_cron(calls.add)
    with pytest.raises(LifecycleError, match="start"):
        cron.wait_elected(0.1)
    assert not cron.is_elected()
    cron.stop()
    assert cron.state is CronState.STOPPED


def test_context_manager_starts_and_stops(make_cron, calls):
    cron = make_cron(calls.add)
    with cron as running:
        assert running is cron
        assert cron.wait_elected(10)
        cron.add("job", Job(due_time="0s"))
        calls.wait("job", 1)
    assert cron.state is CronState.STOPPED
    assert not cron.is_elected()


def test_run_blocks_until_stop_from_another_thread(make_cron, calls):
    cron = make_cron(calls.add)
    runner = threading.Thread(target=cron.run)
    runner.start()
    wait_until(lambda: cron.state is CronState.RUNNING, 10)
    assert cron.wait_elected(10)
    assert runner.is_alive()
    cron.stop()
    runner.join(10)
    assert not runner.is_alive()


def test_crud_works_without_start(make_cron, calls):
    producer = make_cron(calls.add)
    producer.add("job", Job(due_time="0s"))
    assert [j.name for j in producer.list()] == ["job"]

    worker = make_cron(calls.add)
    worker.start()
    calls.wait("job", 1)
    assert producer.state is CronState.NEW


def test_stop_releases_the_leadership_key_at_once(make_cron, calls, client, namespace):
    cron = make_cron(calls.add, lease_ttl=20)
    cron.start()
    assert cron.wait_elected(10)
    (kv,) = leadership_keys(client, namespace)
    assert kv.key == Keys(namespace).leader(cron.replica_id)
    assert kv.lease != 0
    record = stored_pb2.Leadership.FromString(kv.value)
    assert record.total == 1 and record.uid != 0

    cron.stop()
    assert leadership_keys(client, namespace) == []


def test_stop_raises_naming_a_thread_that_will_not_stop(make_cron, calls):
    release = threading.Event()

    def stuck(req):
        calls.add(req)
        release.wait(30)

    cron = make_cron(stuck, workers=1)
    cron.start()
    cron.add("stuck", Job(due_time="0s"))
    calls.wait("stuck", 1)
    started = time.monotonic()
    with pytest.raises(StopTimeoutError, match="etcdcron-worker-0"):
        cron.stop(timeout=1)
    assert time.monotonic() - started < 5
    release.set()


def test_static_mode_with_one_partition(make_cron, calls, client, namespace):
    cron = make_cron(calls.add, partition_id=0, partition_total=1)
    cron.start()
    assert cron.wait_elected(10)
    assert [kv.key for kv in leadership_keys(client, namespace)] == [
        Keys(namespace).leader("0")]
    cron.add("job", Job(due_time="0s"))
    calls.wait("job", 1)


def test_a_second_replica_with_the_same_id_waits_passively_then_takes_over(make_cron, calls):
    active = make_cron(calls.add, partition_id=0, partition_total=1)
    active.start()
    assert active.wait_elected(10)
    passive = make_cron(calls.add, partition_id=0, partition_total=1)
    passive.start()
    wait_until(lambda: passive.election_state is ElectionState.PASSIVE, 10)
    assert not passive.is_elected()

    active.stop()
    assert passive.wait_elected(10)
    passive.add("job", Job(due_time="0s"))
    calls.wait("job", 1)


def test_lost_lease_stops_triggering_and_is_reclaimed(make_cron, calls, client, namespace):
    cron = make_cron(calls.add, lease_ttl=5)
    cron.start()
    assert cron.wait_elected(10)
    (kv,) = leadership_keys(client, namespace)

    client.lease_revoke(kv.lease)  # as if etcd had expired it

    wait_until(lambda: not cron.is_elected(), 10, message="the replica to notice")
    assert cron.wait_elected(15)
    (again,) = leadership_keys(client, namespace)
    assert again.lease != kv.lease
    cron.add("after", Job(due_time="0s"))
    calls.wait("after", 1)


@pytest.mark.parametrize("options, message", [
    ({"trigger": "nope"}, "trigger must be callable"),
    ({"namespace": ""}, "namespace"),
    ({"workers": 0}, "workers must be an int >= 1 and <= 4096, got 0"),
    ({"workers": 10**6}, "workers must be an int >= 1 and <= 4096"),
    ({"lease_ttl": float("inf")}, "lease_ttl must be at most 86400 seconds, got inf"),
    ({"lease_ttl": float("nan")}, "lease_ttl must be a number"),
    ({"counter_gc_interval": float("inf")}, "counter_gc_interval must be at most"),
    ({"request_timeout": 1e300}, "request_timeout must be at most"),
    ({"drain_timeout": -1}, "drain_timeout must be at least 0"),
    ({"partition_id": 0, "partition_total": 2**64}, r"partition_total must be in \[1, 2\*\*64 - 1\]"),
    ({"partition_id": 0, "partition_total": 0}, "partition_total must be in"),
    ({"namespace": "a//b"}, "namespace must not start or end with '/'"),
    ({"namespace": "a/"}, "namespace must not start or end with '/'"),
    ({"namespace": "a\x00b"}, "namespace must not contain control characters"),
    ({"namespace": "\ud800"}, "namespace must be valid Unicode text"),
    ({"namespace": "n" * 300}, "namespace must be at most 256 characters"),
    ({"replica_id": "web\n1"}, "replica_id must not contain control characters"),
    ({"logger": "etcdcron"}, "logger must be a logging.Logger"),
    ({"clock": lambda: "now"}, "clock must return seconds since the epoch"),
    ({"clock": 3}, "clock must be callable"),
    ({"replica_data": BytesValue(value=b"x" * 70_000)}, "replica_data must serialize to at most"),
    ({"lease_ttl": 1}, "lease_ttl must be at least 2"),
    ({"lease_ttl": "20s"}, "lease_ttl must be a number"),
    ({"partition_id": 1}, "needs both partition_id and partition_total"),
    ({"partition_id": 3, "partition_total": 3}, r"partition_id must be in \[0, 3\), got 3"),
    ({"partition_id": 0, "partition_total": 1, "replica_id": "a"}, "not both"),
    ({"replica_id": "a/b"}, "replica_id must not contain '/'"),
    ({"replica_data": "text"}, "replica_data must be a protobuf message"),
    ({"on_leadership": 3}, "on_leadership must be callable"),
    ({"endpoints": "nonsense"}, "not host:port"),
    ({"client": object()}, "etcd3 client"),
])
def test_invalid_options_raise_validation_errors(etcd, options, message):
    kwargs = {"trigger": print, "namespace": "ns", "endpoints": etcd.endpoint, **options}
    if "client" in options:
        del kwargs["endpoints"]
    with pytest.raises(ValidationError, match=message):
        Cron(**kwargs)


def test_reuses_an_etcd3_client(etcd, namespace, calls):
    import etcd3

    host, port = etcd.endpoint.split(":")
    existing = etcd3.client(host=host, port=int(port))
    cron = Cron(client=existing, namespace=namespace, trigger=calls.add, lease_ttl=5)
    try:
        cron.start()
        cron.add("job", Job(due_time="0s"))
        calls.wait("job", 1)
    finally:
        cron.stop()
    existing.put("still", "usable")  # its channel belongs to the caller and stays open
    assert existing.get("still")[0] == b"usable"


def test_a_session_never_triggers_under_the_next_lease(make_cron, calls, client, namespace):
    """The lease is lost and a new one granted while the election thread is still busy ending
    the old session: the old session's jobs must not fire under the new lease."""
    from etcdcron.index import Phase

    cron = make_cron(calls.add, lease_ttl=3)
    cron.start()
    assert cron.wait_elected(10)
    first_generation = cron._lease.current()[1]
    release = threading.Event()
    collector_deactivate = cron._collector.deactivate

    def slow_deactivate():
        release.wait(20)
        collector_deactivate()

    cron._collector.deactivate = slow_deactivate
    (kv,) = leadership_keys(client, namespace)
    client.lease_revoke(kv.lease)
    wait_until(lambda: (cron._lease.current() or (0, 0))[1] == first_generation + 1, 10,
               message="a new lease")

    cron.add("job", Job(due_time="0s"))  # loaded by the old session, which is still active

    def refused():
        with cron._engine.index.lock:
            state = cron._engine.index.get_locked("job")
            return state is not None and state.phase is Phase.IDLE
    wait_until(refused, 10, message="the old session to refuse the trigger")
    assert calls.count("job") == 0

    release.set()
    calls.wait("job", 1, timeout=15)
    wait_until(lambda: cron.get("job") is None, 10)
    assert calls.count("job") == 1


def test_stop_records_the_results_of_triggers_in_flight(make_cron, calls):
    started = threading.Event()
    release = threading.Event()

    def slow(req):
        calls.add(req)
        started.set()
        release.wait(10)

    cron = make_cron(slow)
    cron.add("once", Job(due_time="0s"))
    cron.start()
    assert started.wait(10)
    stopper = threading.Thread(target=cron.stop, kwargs={"timeout": 10})
    stopper.start()
    wait_until(lambda: cron.state is CronState.STOPPING, 5)
    release.set()
    stopper.join(15)

    observer = make_cron(calls.add)
    assert observer.get("once") is None  # recorded (and so deleted) before stop() returned


def test_crons_of_one_process_share_a_channel_until_the_last_one_stops(make_cron, calls,
                                                                       monkeypatch):
    from etcdcron import _connection

    first, second = make_cron(calls.add), make_cron(calls.add)
    assert first._client.channel is second._client.channel
    other = make_cron(calls.add, endpoints=["127.0.0.1:1", "127.0.0.1:2"])
    assert other._client.channel is not first._client.channel

    first.stop()
    second.add("still-open", Job(due_time="1h"))  # the shared channel survives first.stop()
    monkeypatch.setattr(_connection.os, "getpid", lambda: -1)  # as in a forked child
    child = make_cron(calls.add)
    assert child._client.channel is not second._client.channel
    second.stop()
    child.stop()
    with pytest.raises(ValueError):  # closed: no user left
        second._client.channel.unary_unary("/x")(b"", timeout=1)
