"""Never a silent stop: no input, data, trigger or etcd refusal leaves a replica elected but idle.

Each test reproduces one way a replica used to stay elected and fire nothing (or fire twice),
against a real etcd, and shows it now keeps firing. Faults are injected into the real threads
(a method replaced to raise once); etcd is never mocked.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.any_pb2 import Any

from etcdcron import (
    Cron,
    CronState,
    FailurePolicy,
    FailurePolicyConstant,
    Job,
    TriggerResult,
)
from etcdcron._etcd import EtcdClient
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.testing import EtcdServer, bulk_add, wait_until
from etcdcron.ticks import to_timestamp
from tests.conftest import Calls, fill_until_nospace, free_nospace

pytestmark = pytest.mark.etcd

QUICK_RETRY = FailurePolicy(constant=FailurePolicyConstant(interval={"nanos": 100_000_000},
                                                           max_retries=1))


def raw_record(job: Job, partition_id: int = 1, **times) -> bytes:
    """A stored job written by someone else: no validation."""
    record = stored_pb2.Job(partition_id=partition_id, job=job)
    for field, value in times.items():
        getattr(record, field).CopyFrom(value)
    return record.SerializeToString()


def barrier(cron: Cron, calls: Calls, name: str) -> None:
    cron.add(name, Job(due_time="0s"))
    calls.wait(name, 1)


def warnings_about(caplog, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


# -- keys and records that do not decode ---------------------------------------------------------

def test_undecodable_keys_and_out_of_range_records_are_skipped_everywhere(
        make_cron, calls, client, namespace, caplog):
    caplog.set_level(logging.INFO)
    keys = Keys(namespace)
    client.put(keys.jobs + b"\xff\xfe-not-utf8", raw_record(Job(due_time="0s")))
    client.put(keys.counters + b"\xff-not-utf8", stored_pb2.Counter().SerializeToString())
    far = stored_pb2.Job().due_time
    far.seconds = 10**13  # beyond datetime's year 9999
    client.put(keys.job("out-of-range"), raw_record(Job(due_time="0s"), due_time=far))
    client.put(keys.counter("orphan"), stored_pb2.Counter(job_partition_id=5).SerializeToString())

    cron = make_cron(calls.add, counter_gc_interval=0.2)
    cron.start()
    assert cron.wait_elected(10)
    barrier(cron, calls, "first")
    wait_until(lambda: [j.name for j in cron.list()] == ["out-of-range"], 10,
               message="only the out-of-range job to be left")
    assert [j.name for j in cron.list()] == ["out-of-range"]

    # the same arriving by the watch
    client.put(keys.jobs + b"\xfe-again", raw_record(Job(due_time="0s")))
    barrier(cron, calls, "second")
    wait_until(lambda: cron._collector.deleted >= 1, 10, message="a GC sweep")

    # (polled: under load a late lease renewal may start a new session, which loads again)
    wait_until(lambda: cron.health().unschedulable == {
        "out-of-range": "its due_time is out of range"}, 10)
    health = cron.health()
    for thread in ("etcdcron-watch", "etcdcron-gc", "etcdcron-timer", "etcdcron-recorder"):
        assert health.threads[thread].alive and health.threads[thread].restarts == 0
    assert "out-of-range" not in calls.names()
    assert warnings_about(caplog, r"b'dev/jobs/\xff\xfe-not-utf8'".replace("dev", namespace)) == 1
    assert client.get(keys.jobs + b"\xff\xfe-not-utf8") is not None  # skipped, never deleted


def test_nested_namespaces_never_read_fire_or_delete_each_others_keys(make_cron, client,
                                                                     namespace):
    outer_calls, inner_calls = Calls(), Calls()
    inner_namespace = f"{namespace}/jobs"
    outer = make_cron(outer_calls.add, counter_gc_interval=0.2)
    inner = make_cron(inner_calls.add, namespace=inner_namespace, counter_gc_interval=0.2)
    inner.start()
    assert inner.wait_elected(10)
    inner.add("kept", Job(schedule="@every 200ms"))
    inner.add("once", Job(due_time="0s"))
    inner_calls.wait("kept", 3)
    outer.start()
    assert outer.wait_elected(10)
    outer.add("mine", Job(due_time="0s"))
    outer_calls.wait("mine", 1)
    wait_until(lambda: outer._collector.loop.health().last_progress is not None, 10)

    assert [j.name for j in outer.list()] == []
    assert list(outer.statuses()) == []
    assert outer.status("kept") is None
    from etcdcron.status import membership
    outer_members = membership(client, Keys(namespace))
    assert [r.replica_id for r in outer_members.replicas] == [outer.replica_id]
    assert outer_members.total == 1
    outer.add("doomed", Job(due_time="1h"))
    outer.delete_prefixes("")
    assert outer.get("doomed") is None
    assert [j.name for j in inner.list()] == ["kept"]
    before = inner_calls.count("kept")
    inner_calls.wait("kept", before + 3)
    assert outer_calls.names() == ["mine"]
    assert set(inner_calls.names()) == {"kept", "once"} and inner_calls.count("once") == 1
    inner_keys = Keys(inner_namespace)
    assert client.get(inner_keys.counter("kept")) is not None
    assert client.get(inner_keys.leader(inner.replica_id)) is not None
    assert inner.is_elected() and outer.is_elected()


def test_delete_prefixes_of_nothing_deletes_every_job_of_the_namespace(make_cron, calls):
    cron = make_cron(calls.add)
    for name in ("a", "b||c", "d.e"):
        cron.add(name, Job(due_time="1h"))
    cron.delete_prefixes("")
    assert cron.list() == []


# -- results etcd refuses ------------------------------------------------------------------------

def test_a_result_etcd_refuses_is_retried_until_it_is_recorded(namespace):
    calls = Calls()
    with EtcdServer(extra_args=["--quota-backend-bytes=16777216"]) as etcd:
        client = EtcdClient(etcd.endpoint)
        cron = Cron(trigger=calls.add, endpoints=etcd.endpoint, namespace=namespace, lease_ttl=5)
        try:
            cron.start()
            assert cron.wait_elected(10)
            cron.add("tick", Job(schedule="@every 200ms"))
            calls.wait("tick", 2)
            fill_until_nospace(client)
            wait_until(lambda: cron.health().unrecorded == ("tick",), 10,
                       message="the refused result to show in health()")
            stuck = calls.count("tick")
            assert cron.is_elected()
            free_nospace(client)
            calls.wait("tick", stuck + 3, timeout=30)
            assert cron.health().unrecorded == ()
        finally:
            cron.stop()
            client.close()


# -- one job's failure never touches another -----------------------------------------------------

def test_a_job_whose_outcome_cannot_be_computed_does_not_stop_its_batch(make_cron, calls, client,
                                                                        namespace, monkeypatch):
    import etcdcron.engine as engine_module

    real = engine_module.after_result

    def after_result(job, counter, tick, result, *rest):
        if job.job.HasField("metadata"):  # only the poison job carries metadata
            raise OverflowError("date value out of range")
        return real(job, counter, tick, result, *rest)

    monkeypatch.setattr(engine_module, "after_result", after_result)
    keys = Keys(namespace)
    # and two records that validation rejects, written by another implementation
    client.put(keys.job("ends-of-time"), raw_record(
        Job(schedule="@every 1s"), partition_id=2,
        due_time=to_timestamp_text("9999-12-31T23:59:59Z")))
    client.put(keys.job("start-of-time"), raw_record(
        Job(schedule="TZ=America/New_York @daily"), partition_id=3,
        due_time=to_timestamp_text("0001-01-01T00:00:00Z")))
    cron = make_cron(calls.add)
    healthy = {f"healthy-{i}": Job(schedule="@every 200ms") for i in range(20)}
    metadata = Any()
    metadata.Pack(wrappers_pb2.StringValue(value="poison"))
    bulk_add(cron, {"poison": Job(schedule="@every 200ms", metadata=metadata), **healthy})
    cron.start()
    assert cron.wait_elected(10)
    for name in healthy:
        calls.wait(name, 4)
    assert calls.count("poison") == 1
    assert "poison" in cron.health().unschedulable
    assert cron.is_elected()


def to_timestamp_text(text: str):
    from etcdcron.schedule import parse_point_in_time
    from datetime import datetime, timezone

    return to_timestamp(parse_point_in_time(text, datetime.now(timezone.utc)))


class Timeout(BaseException):
    """What gevent and eventlet raise: not an Exception."""


@pytest.mark.parametrize("exception", [SystemExit, KeyboardInterrupt, Timeout])
def test_a_trigger_raising_a_base_exception_fails_and_its_worker_lives(make_cron, calls, exception):
    def trigger(req):
        calls.add(req)
        if req.name == "raises":
            raise exception("from a trigger")

    cron = make_cron(trigger, workers=1)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("raises", Job(due_time="0s", failure_policy=QUICK_RETRY))
    calls.wait("raises", 2)  # failed, retried once per its policy, then done
    wait_until(lambda: cron.get("raises") is None, 10)
    barrier(cron, calls, "after")
    assert cron.health().threads["etcdcron-worker-0"].ok
    started = time.monotonic()
    cron.stop(timeout=10)
    assert time.monotonic() - started < 5


def test_callbacks_raising_base_exceptions_do_not_stop_the_notifier(make_cron, calls):
    events = []

    def sink(event):
        events.append(event)
        raise KeyboardInterrupt("from consumer_sink")

    def on_leadership(replicas):
        raise SystemExit("from on_leadership")

    cron = make_cron(calls.add, consumer_sink=sink, on_leadership=on_leadership)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("one", Job(due_time="1h"))
    cron.add("two", Job(due_time="1h"))
    wait_until(lambda: {e.put.name for e in events if e.HasField("put")} >= {"one", "two"}, 10)
    assert cron.health().threads["etcdcron-notify"].alive


# -- stop() from the Cron's own threads ----------------------------------------------------------

def test_stop_from_a_trigger_returns_and_the_cron_reaches_stopped(make_cron, calls):
    returned = threading.Event()

    def trigger(req):
        calls.add(req)
        cron.stop(timeout=10)
        returned.set()

    cron = make_cron(trigger)
    runner = threading.Thread(target=cron.run)
    runner.start()
    assert cron.wait_elected(10)
    cron.add("stopper", Job(due_time="0s"))
    assert returned.wait(5)
    runner.join(15)
    assert not runner.is_alive()
    assert cron.state is CronState.STOPPED
    assert not [t for t in threading.enumerate() if t.name.startswith("etcdcron-")
                and t.name != "etcdcron-stop" and t.is_alive() and t in cron._threads()]


def test_stop_from_on_leadership_returns_and_the_cron_reaches_stopped(make_cron, calls):
    def on_leadership(replicas):
        cron.stop(timeout=10)

    cron = make_cron(calls.add, on_leadership=on_leadership)
    cron.start()
    wait_until(lambda: cron.state is CronState.STOPPED, 15)


# -- counters, the timer heap, the clock --------------------------------------------------------

def test_a_new_version_arriving_by_watch_over_a_leftover_counter_fires_once(make_cron, calls,
                                                                           client, namespace):
    cron = make_cron(calls.add)
    cron.start()
    assert cron.wait_elected(10)
    keys = Keys(namespace)
    client.put(keys.counter("leftover"), stored_pb2.Counter(job_partition_id=12345, count=7)
               .SerializeToString())
    bulk_add(cron, {"leftover": Job(due_time="0s")})  # keeps the old counter, as add_many does
    calls.wait("leftover", 1)
    wait_until(lambda: cron.get("leftover") is None, 10)
    barrier(cron, calls, "after")
    assert calls.count("leftover") == 1


def test_the_timer_heap_stays_small_under_replaced_and_deleted_jobs(make_cron, calls):
    cron = make_cron(calls.add)
    cron.start()
    assert cron.wait_elected(10)
    for i in range(800):
        cron.add("replaced", Job(due_time="1h"))
        cron.add(f"deleted-{i}", Job(due_time="1h"))
        cron.delete(f"deleted-{i}")
    barrier(cron, calls, "after")
    wait_until(lambda: cron._engine.index.names() == ["replaced"], 10)
    assert cron._engine.timer.size <= 200


def test_a_job_put_and_deleted_in_one_watch_response_is_not_left_armed(make_cron, calls, etcd):
    # A watch that fell behind hands over a job's put and its delete together: the job must
    # not be armed for the put after the delete forgot it (a live timer entry for no job).
    from etcd3.etcdrpc import kv_pb2

    cron = make_cron(calls.add)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("gone", Job(due_time="1h"))
    engine = cron._engine
    key = cron._keys.job("gone")
    kv = EtcdClient(etcd.endpoint).range(key).kvs[0]
    cron.delete("gone")
    wait_until(lambda: not engine.index.names(), 10)
    later = kv_pb2.KeyValue()
    later.CopyFrom(kv)
    later.mod_revision = kv.mod_revision + 1000
    deleted = kv_pb2.KeyValue(key=key, mod_revision=later.mod_revision + 1)
    engine.apply_events(engine.index.ownership, [
        kv_pb2.Event(type=kv_pb2.Event.PUT, kv=later),
        kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=deleted)])
    assert engine.index.names() == []
    assert len(engine.timer._heap) == 0


def test_a_wall_clock_stepping_back_before_dispatch_does_not_lose_the_job(make_cron, calls):
    offset = [0.0]
    cron = make_cron(calls.add, clock=lambda: time.time() + offset[0])
    cron.start()
    assert cron.wait_elected(10)
    timer = cron._engine.timer
    deliver = timer._on_due

    def step_back_then_deliver(entries):
        if any(name == "job" for name, _ in entries) and not calls.count("job"):
            offset[0] = -2.0  # the clock steps back 2 s between the timer's pop and dispatch
        deliver(entries)

    timer._on_due = step_back_then_deliver
    cron.add("job", Job(due_time="0s"))
    calls.wait("job", 1, timeout=10)


# -- unexpected failures inside the engine's threads ---------------------------------------------

def fail_once(obj, attribute: str, monkeypatch, exception=RuntimeError("injected")):
    real = getattr(obj, attribute)
    failed = threading.Event()

    def wrapper(*args, **kwargs):
        if not failed.is_set():
            failed.set()
            raise exception
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, attribute, wrapper)
    return failed


@pytest.mark.parametrize("thread, target", [
    ("etcdcron-watch", lambda cron: (cron._engine, "apply_events")),
    ("etcdcron-timer", lambda cron: (cron._engine.timer, "_on_due")),
    ("etcdcron-recorder", lambda cron: (cron._engine, "_write")),
    ("etcdcron-worker-0", lambda cron: (cron._engine, "_lease_valid")),
])
def test_a_failure_inside_each_engine_thread_is_survived_and_shown(make_cron, calls, monkeypatch,
                                                                  thread, target):
    cron = make_cron(calls.add, workers=1)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("before", Job(due_time="0s"))
    calls.wait("before", 1)
    failed = fail_once(*target(cron), monkeypatch)
    cron.add("ticking", Job(schedule="@every 100ms", failure_policy=QUICK_RETRY))
    assert failed.wait(10)
    calls.wait("ticking", 5, timeout=15)
    health = cron.health().threads
    assert health[thread].alive
    if thread in ("etcdcron-watch", "etcdcron-timer"):  # the loop itself was restarted
        assert health[thread].restarts == 1
        assert health[thread].last_error == "RuntimeError: injected"
    assert cron.is_elected()


def test_a_failure_inside_the_counter_collector_is_survived_and_shown(make_cron, calls,
                                                                     monkeypatch):
    cron = make_cron(calls.add, counter_gc_interval=0.1)
    cron.start()
    assert cron.wait_elected(10)
    failed = fail_once(cron._collector, "sweep", monkeypatch)
    assert failed.wait(10)
    wait_until(lambda: cron._collector.loop.health().restarts == 1
               and cron._collector.loop.health().failures == 0, 10,
               message="the collector restarted and sweeping again")
    health = cron.health().threads["etcdcron-gc"]
    assert health.alive and health.last_error == "RuntimeError: injected"


def test_an_unexpected_error_recording_a_batch_strands_no_job(make_cron, calls, monkeypatch):
    cron = make_cron(calls.add)
    cron.start()
    assert cron.wait_elected(10)
    failed = fail_once(cron._engine, "_apply", monkeypatch)
    bulk_add(cron, {f"job-{i}": Job(schedule="@every 200ms") for i in range(10)})
    assert failed.wait(10)
    for i in range(10):
        calls.wait(f"job-{i}", 4)


def test_each_trigger_gets_a_request_of_its_own(make_cron, calls):
    payload = Any()
    payload.Pack(wrappers_pb2.StringValue(value="kept"))
    seen = []

    def trigger(req):
        seen.append(req.HasField("payload"))
        req.ClearField("payload")  # a trigger that changes its request
        calls.add(req)

    cron = make_cron(trigger)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("job", Job(schedule="@every 100ms", repeats=3, payload=payload))
    calls.wait("job", 3)
    assert seen == [True, True, True]


def test_a_future_whose_result_is_not_a_result_counts_as_failed(make_cron, calls):
    from concurrent.futures import Future

    class Weird:
        def __eq__(self, other):
            raise RuntimeError("cannot compare")

        __hash__ = None

    def trigger(req):
        calls.add(req)
        future = Future()
        future.set_result(Weird() if calls.count(req.name) == 1 else TriggerResult.SUCCESS)
        return future

    cron = make_cron(trigger)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("job", Job(due_time="0s", failure_policy=QUICK_RETRY))
    calls.wait("job", 2)
    wait_until(lambda: cron.get("job") is None, 10)


@pytest.mark.cluster
def test_an_engine_loop_that_keeps_failing_makes_the_replica_resign_until_it_works(
        make_cron, monkeypatch):
    from etcdcron import ElectionState

    fired = Calls()
    a = make_cron(fired.add, replica_id="a", lease_ttl=2)
    b = make_cron(fired.add, replica_id="b", lease_ttl=2)
    for cron in (a, b):
        cron.start()
    assert a.wait_elected(10) and b.wait_elected(10)
    broken = threading.Event()
    broken.set()
    real = a._engine.load

    def load(*args, **kwargs):
        if broken.is_set():
            raise RuntimeError("cannot load")
        return real(*args, **kwargs)

    monkeypatch.setattr(a._engine, "load", load)
    a._engine.informer.deactivate()  # make it list again, into the broken load
    a._engine.informer.activate(a._elector.ownership)
    wait_until(lambda: a.election_state is ElectionState.RESIGNED, 20,
               message="the replica whose job watch keeps failing to resign")
    health = a.health()
    assert not health.ok and "the election is resigned" in health.problems
    # every job fires on the other replica meanwhile
    names = [f"job-{i}" for i in range(8)]
    for name in names:
        b.add(name, Job(due_time="0s"))
    wait_until(lambda: all(fired.count(n) == 1 for n in names), 10)
    broken.clear()
    wait_until(lambda: a.is_elected() and b.is_elected(), 30, message="a to rejoin")
    wait_until(lambda: a.health().ok, 10)
