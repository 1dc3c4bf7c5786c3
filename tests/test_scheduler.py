"""One replica triggering jobs on a real etcd: go-etcd-cron's single-replica behaviours and more.

"Never fires again" is shown with a barrier: a later job whose trigger proves time has passed,
and the job's absence from etcd (a finished or deleted job is gone, so nothing can fire it).
"""

from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timezone
from concurrent.futures import Future

import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.any_pb2 import Any

from etcdcron import (
    FailurePolicy,
    FailurePolicyConstant,
    FailurePolicyDrop,
    Job,
    TriggerResult,
)
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.testing import bulk_add, wait_until
from etcdcron.timer import LEAD
from tests.conftest import Calls

pytestmark = pytest.mark.etcd


def packed(text: str) -> Any:
    value = Any()
    value.Pack(wrappers_pb2.StringValue(value=text))
    return value


def unpacked(value: Any) -> str:
    message = wrappers_pb2.StringValue()
    value.Unpack(message)
    return message.value


def barrier(cron, calls: Calls, name: str = "zz-barrier", after: str = "0s") -> None:
    """Add a one-shot and wait for it: everything due before it has had its chance to fire."""
    cron.add(name, Job(due_time=after))
    calls.wait(name, 1)


def gone(cron, name: str) -> bool:
    return cron.get(name) is None


def test_one_shot_fires_once_at_its_due_time(cron, calls):
    added = time.time()
    cron.add("once", Job(due_time="1s"))

    calls.wait("once", 1)
    wait_until(lambda: gone(cron, "once"), 5)
    barrier(cron, calls)

    assert calls.count("once") == 1
    assert calls.times("once")[0] >= added + 1.0


def test_payload_and_metadata_reach_the_trigger(cron, calls):
    cron.add("data", Job(due_time="0s", payload=packed("the payload"), metadata=packed("meta")))
    calls.wait("data", 1)
    request = calls.calls[0][2]
    assert request.name == "data"
    assert unpacked(request.payload) == "the payload"
    assert unpacked(request.metadata) == "meta"


def test_zero_due_time_fires_immediately(cron, calls):
    added = time.time()
    cron.add("now", Job(due_time="0s"))
    calls.wait("now", 1, timeout=5)
    assert calls.times("now")[0] - added < 2.0


def test_past_rfc3339_due_time_fires_immediately(cron, calls):
    cron.add("past", Job(due_time="2020-01-01T00:00:00Z"))
    calls.wait("past", 1, timeout=5)


def test_job_name_with_spaces(cron, calls):
    cron.add("hello world", Job(due_time="0s"))
    calls.wait("hello world", 1)
    assert calls.names() == ["hello world"]


def test_repeats_every_100ms_fire_exactly_n_times(cron, calls):
    added = time.time()
    cron.add("rep", Job(schedule="@every 100ms", repeats=5))
    calls.wait("rep", 5)
    wait_until(lambda: gone(cron, "rep"), 5)
    barrier(cron, calls)
    times = calls.times("rep")
    assert len(times) == 5
    # Tick i is 100 ms * i after the job's start, which is no earlier than add() was called;
    # no tick fires early (a late one may be followed closely by the next, on time).
    assert all(t >= added + 0.1 * i for i, t in enumerate(times, 1)), (added, times)


def test_ttl_stops_a_periodic_job(cron, calls):
    added = time.time()
    cron.add("ttl", Job(schedule="@every 200ms", ttl="1s"))
    wait_until(lambda: gone(cron, "ttl"), 10)
    barrier(cron, calls)
    count = calls.count("ttl")
    assert 4 <= count <= 5  # ticks at 0.2 .. 1.0 s after adding
    assert max(calls.times("ttl")) <= added + 1.0 + 1.0


def test_repeats_with_ttl_whichever_ends_first(cron, calls):
    cron.add("both", Job(schedule="@every 100ms", repeats=3, ttl="1h"))
    wait_until(lambda: gone(cron, "both"), 10)
    assert calls.count("both") == 3


def test_cron_schedule_with_seconds(cron, calls):
    cron.add("sec", Job(schedule="* * * * * *", repeats=2))
    calls.wait("sec", 2, timeout=5)
    first, second = calls.times("sec")
    assert 0.5 < second - first < 1.6


def test_deleted_job_never_fires(cron, calls):
    cron.add("doomed", Job(due_time="1s"))
    cron.delete("doomed")
    barrier(cron, calls, after="1500ms")
    assert calls.count("doomed") == 0


def test_upsert_replaces_the_schedule(cron, calls):
    cron.add("up", Job(due_time="3s", payload=packed("old")))
    cron.add("up", Job(due_time="0s", payload=packed("new")))
    calls.wait("up", 1)
    barrier(cron, calls, after="3500ms")
    assert [unpacked(r.payload) for n, _, r in calls.calls if n == "up"] == ["new"]


def test_add_if_not_exists_job_fires_once(cron, calls):
    cron.add_if_not_exists("x", Job(due_time="0s"))
    calls.wait("x", 1)


def test_delete_prefixes_stops_their_jobs(cron, calls):
    for name in ["a||1", "a||2", "b||1", "c||1"]:
        cron.add(name, Job(due_time="1s"))
    cron.delete_prefixes("a||", "b||")
    calls.wait("c||1", 1)
    barrier(cron, calls)
    assert calls.counts() == {"c||1": 1, "zz-barrier": 1}


def failing(calls: Calls, result=TriggerResult.FAILED):
    def trigger(req):
        calls.add(req)
        return result
    return trigger


def test_default_failure_policy_retries_three_times_a_second_apart(make_cron, calls):
    cron = make_cron(failing(calls))
    cron.start()
    cron.add("fails", Job(due_time="0s"))
    wait_until(lambda: gone(cron, "fails"), 10)
    times = calls.times("fails")
    assert len(times) == 4
    assert all(0.8 <= b - a <= 2.0 for a, b in zip(times, times[1:]))


def test_drop_policy_counts_a_failure_as_done(make_cron, calls):
    cron = make_cron(failing(calls))
    cron.start()
    cron.add("drop", Job(schedule="@every 100ms", repeats=3,
                         failure_policy=FailurePolicy(drop=FailurePolicyDrop())))
    wait_until(lambda: gone(cron, "drop"), 10)
    assert calls.count("drop") == 3  # one delivery per tick, failed ticks count toward repeats


def test_constant_policy_with_max_retries(make_cron, calls):
    cron = make_cron(failing(calls))
    cron.start()
    cron.add("c", Job(due_time="0s", failure_policy=FailurePolicy(
        constant=FailurePolicyConstant(interval={"nanos": 100_000_000}, max_retries=5))))
    wait_until(lambda: gone(cron, "c"), 10)
    assert calls.count("c") == 6


def test_constant_policy_without_max_retries_retries_until_success(make_cron, calls):
    def trigger(req):
        calls.add(req)
        return calls.count("c") >= 7

    cron = make_cron(trigger)
    cron.start()
    cron.add("c", Job(due_time="0s", failure_policy=FailurePolicy(
        constant=FailurePolicyConstant(interval={"nanos": 50_000_000}))))
    wait_until(lambda: gone(cron, "c"), 10)
    assert calls.count("c") == 7


def test_exceptions_and_bad_return_values_count_as_failed(make_cron, calls):
    def trigger(req):
        calls.add(req)
        if req.name == "raises":
            raise RuntimeError("boom")
        return "not a result"

    cron = make_cron(trigger)
    cron.start()
    policy = FailurePolicy(constant=FailurePolicyConstant(interval={"nanos": 10_000_000},
                                                          max_retries=1))
    cron.add("raises", Job(due_time="0s", failure_policy=policy))
    cron.add("weird", Job(due_time="0s", failure_policy=policy))
    wait_until(lambda: gone(cron, "raises") and gone(cron, "weird"), 10)
    assert calls.counts() == {"raises": 2, "weird": 2}


def test_undeliverable_jobs_wait_for_a_deliverable_prefix(make_cron, calls):
    deliverable = threading.Event()

    def trigger(req):
        calls.add(req)
        if deliverable.is_set() or req.name.startswith("barrier"):
            return TriggerResult.SUCCESS
        return TriggerResult.UNDELIVERABLE

    cron = make_cron(trigger)
    cron.start()
    for name in ["app-a||1", "app-a||2", "app-b||1"]:
        cron.add(name, Job(due_time="0s"))
    calls.wait(None, 3)
    barrier(cron, calls, name="barrier-1")
    assert calls.count() == 4  # each tried once, then parked: no retries, no counter change
    assert cron._engine.staging.parked() == ["app-a||1", "app-a||2", "app-b||1"]

    deliverable.set()
    handle = cron.deliverable_prefixes("app-a||")
    calls.wait("app-a||2", 2)
    wait_until(lambda: gone(cron, "app-a||1") and gone(cron, "app-a||2"), 5)
    assert cron._engine.staging.parked() == ["app-b||1"]
    assert calls.count("app-b||1") == 1
    handle.cancel()
    handle.cancel()


def test_undeliverable_retriggers_at_once_while_its_prefix_is_registered(make_cron, calls):
    def trigger(req):
        calls.add(req)
        return TriggerResult.UNDELIVERABLE if calls.count("p||x") < 3 else True

    cron = make_cron(trigger)
    with cron.deliverable_prefixes("p||"):
        cron.start()
        cron.add("p||x", Job(due_time="0s"))
        wait_until(lambda: gone(cron, "p||x"), 5)
    assert calls.count("p||x") == 3


def test_deliverable_prefixes_are_reference_counted(make_cron, calls):
    deliverable = threading.Event()

    def trigger(req):
        calls.add(req)
        return TriggerResult.SUCCESS if deliverable.is_set() else TriggerResult.UNDELIVERABLE

    cron = make_cron(trigger)
    cron.start()
    first = cron.deliverable_prefixes("q||")
    second = cron.deliverable_prefixes("q||")
    first.cancel()
    cron.add("q||1", Job(due_time="0s"))
    calls.wait("q||1", 2)  # still deliverable: tried again at once
    second.cancel()
    wait_until(lambda: cron._engine.staging.parked() == ["q||1"], 5)
    deliverable.set()
    with cron.deliverable_prefixes("q||"):
        wait_until(lambda: gone(cron, "q||1"), 5)


def test_updating_or_deleting_a_staged_job_removes_it_from_staging(make_cron, calls):
    cron = make_cron(failing(calls, TriggerResult.UNDELIVERABLE))
    cron.start()
    cron.add("s1", Job(due_time="0s"))
    cron.add("s2", Job(due_time="0s"))
    wait_until(lambda: cron._engine.staging.parked() == ["s1", "s2"], 5)
    cron.delete("s1")
    cron.add("s2", Job(due_time="1h"))
    wait_until(lambda: cron._engine.staging.parked() == [], 5)


def test_a_trigger_can_add_and_read_jobs_on_its_own_cron(make_cron, calls):
    holder = {}

    def trigger(req):
        calls.add(req)
        if req.name == "parent":
            holder["cron"].add("child", Job(due_time="0s"))
            assert holder["cron"].get("child") is not None
            assert [j.name for j in holder["cron"].list("child")] == ["child"]

    cron = make_cron(trigger)
    holder["cron"] = cron
    cron.start()
    cron.add("parent", Job(due_time="0s"))
    calls.wait("child", 1)


def test_100_unanswered_future_triggers_at_once_with_default_workers(make_cron, calls):
    futures: list[Future] = []
    lock = threading.Lock()

    def trigger(req):
        future = Future()
        with lock:
            futures.append(future)
        calls.add(req)  # last: once calls.wait() sees this call, its future is in the list
        return future

    cron = make_cron(trigger)
    assert cron._workers < 100
    cron.start()
    names = [f"f{i:03d}" for i in range(100)]
    for name in names:
        cron.add(name, Job(due_time="0s"))
    calls.wait(None, 100, timeout=20)
    assert cron.list() and len(cron.list()) == 100  # none answered yet, nothing recorded
    for future in futures:
        future.set_result(TriggerResult.SUCCESS)
    wait_until(lambda: not cron.list(), 20)
    assert sorted(calls.names()) == names


def test_futures_resolving_to_failure_follow_the_policy(make_cron, calls):
    def trigger(req):
        calls.add(req)
        future = Future()
        if calls.count() == 1:
            future.set_exception(RuntimeError("first attempt fails"))
        else:
            future.set_result(True)
        return future

    cron = make_cron(trigger)
    cron.start()
    cron.add("f", Job(due_time="0s", failure_policy=FailurePolicy(
        constant=FailurePolicyConstant(interval={"nanos": 10_000_000}))))
    wait_until(lambda: gone(cron, "f"), 5)
    assert calls.count("f") == 2


def test_catch_up_fires_every_missed_tick_in_order(make_cron, calls, client, namespace):
    offset = [0.0]
    keys = Keys(namespace)

    def clock():
        return time.time() + offset[0]

    first = make_cron(calls.add, clock=clock)
    first.start()
    first.add("tick", Job(schedule="@every 1s", repeats=8))
    calls.wait("tick", 2, timeout=10)
    first.stop()
    counter = stored_pb2.Counter.FromString(client.get(keys.counter("tick")).value)
    assert counter.count == 2
    stopped_at = counter.last_trigger.ToDatetime().timestamp()

    offset[0] = 5.0  # the scheduler was down for five more ticks
    seen = []

    def recording(req):
        kv = client.get(keys.counter("tick"))
        seen.append(stored_pb2.Counter.FromString(kv.value).last_trigger.ToDatetime().timestamp())
        calls.add(req)  # last: once calls.wait() sees this call, seen has it too

    restarted_at = time.time()
    second = make_cron(recording, clock=clock)
    second.start()
    calls.wait("tick", 7, timeout=10)
    caught_up = [t for t in calls.times("tick") if t >= restarted_at]
    assert caught_up[4] - caught_up[0] < 1.0  # five missed ticks at once, not one per second
    assert seen[:5] == [stopped_at + i for i in range(5)]  # one after another, in order
    wait_until(lambda: gone(second, "tick"), 10)
    assert calls.count("tick") == 8


def test_readding_a_job_while_its_trigger_runs_ignores_the_old_result(make_cron, calls):
    release = threading.Event()

    def trigger(req):
        calls.add(req)
        if unpacked(req.payload) == "v1":
            release.wait(10)

    cron = make_cron(trigger)
    cron.start()
    cron.add("job", Job(schedule="@every 100ms", repeats=3, payload=packed("v1")))
    calls.wait("job", 1)
    cron.add("job", Job(schedule="@every 100ms", repeats=2, payload=packed("v2")))
    wait_until(lambda: gone(cron, "job"), 10)
    release.set()
    barrier(cron, calls, after="300ms")
    versions = [unpacked(r.payload) for n, _, r in calls.calls if n == "job"]
    assert versions == ["v1", "v2", "v2"]
    assert gone(cron, "job")


def test_deleting_a_job_while_its_trigger_runs(make_cron, calls, client, namespace):
    release = threading.Event()

    def trigger(req):
        calls.add(req)
        if req.name == "slow":
            release.wait(10)

    cron = make_cron(trigger)
    cron.start()
    cron.add("slow", Job(schedule="@every 100ms", repeats=10))
    calls.wait("slow", 1)
    cron.delete("slow")
    release.set()
    barrier(cron, calls, after="500ms")
    assert calls.count("slow") == 1
    assert client.get(Keys(namespace).counter("slow")) is None


def test_10000_past_due_one_shots_fire_once_with_bounded_threads(make_cron, calls, producer):
    names = [f"job-{i:05d}" for i in range(10_000)]
    bulk_add(producer, {n: Job(due_time="0s") for n in names})
    before = threading.active_count()
    peak = [before]

    def trigger(req):
        calls.add(req)
        peak[0] = max(peak[0], threading.active_count())

    cron = make_cron(trigger, workers=8)
    cron.start()
    calls.wait(None, 10_000, timeout=120)
    wait_until(lambda: not cron.list(), 60)
    assert calls.counts() == {n: 1 for n in names}
    # 8 workers + timer, 3 recorders, watch, lease, leader watch, election, gc, and gRPC's
    # stream threads: a constant, not one per job.
    assert peak[0] - before <= 8 + 9 + 4


def test_a_job_never_has_two_triggers_in_flight(make_cron, calls):
    lock = threading.Lock()
    running = {"now": 0, "max": 0}

    def slow(req):
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        calls.add(req)
        threading.Event().wait(0.3)  # longer than the schedule's period
        with lock:
            running["now"] -= 1

    cron = make_cron(slow, workers=8)
    cron.start()
    cron.add("slow", Job(schedule="@every 50ms", repeats=5))
    wait_until(lambda: gone(cron, "slow"), 20)
    assert calls.count("slow") == 5
    assert running["max"] == 1
    times = calls.times("slow")
    assert all(b - a >= 0.3 for a, b in zip(times, times[1:]))  # each after the previous ended


def test_a_listing_loads_as_it_is_read_a_chunk_at_a_time(make_cron, calls):
    """A replica over a million jobs never holds them all decoded: the engine loads a listing
    a chunk at a time while it is still being read (and so while later pages arrive)."""
    from etcd3.etcdrpc import kv_pb2

    from etcdcron.engine import LOAD_CHUNK
    from etcdcron.validation import prepare_job

    cron = make_cron(calls.add)
    cron.start()
    cron.add("probe", Job(due_time="0s"))
    calls.wait("probe", 1)  # the informer's own listing is loaded (it would forget the rest)
    engine, keys = cron._engine, cron._keys
    now = datetime.now(timezone.utc)
    seen_loaded = []

    def listing():
        for i in range(2 * LOAD_CHUNK + 5):
            if i == LOAD_CHUNK + 1:
                seen_loaded.append(len(engine.index))  # the first chunk is in; the rest unread
            name = f"chunk-{i:05d}"
            value = prepare_job(name, Job(due_time="1h"), now).SerializeToString()
            yield kv_pb2.KeyValue(key=keys.job(name), value=value, mod_revision=10**9), None

    engine.load(engine.index.ownership, listing(), [], 10**9)

    assert seen_loaded == [LOAD_CHUNK]
    assert len(engine.index) == 2 * LOAD_CHUNK + 5


def test_a_listing_from_before_a_one_shot_finished_does_not_bring_it_back(make_cron, calls):
    """After a watch falls behind compaction, the informer lists again, possibly at a revision
    older than the delete that recorded a finished one-shot and before it has seen that delete.
    Loading that listing must not bring the one-shot back and fire it again."""
    release, resume = threading.Event(), threading.Event()

    def held(req):
        calls.add(req)
        release.wait(10)

    cron = make_cron(held)
    cron.start()
    cron.add("once", Job(due_time="0s"))
    calls.wait("once", 1)
    engine, client, keys = cron._engine, cron._client, cron._keys
    revision, jobs = client.list_prefix(keys.jobs)  # taken while the trigger still runs
    assert [keys.job_name(kv.key) for kv in jobs] == ["once"]

    apply_events = engine.apply_events
    engine.apply_events = lambda *args: (resume.wait(10), apply_events(*args))  # hold the watch
    release.set()
    wait_until(lambda: gone(cron, "once") and engine.index.names() == [], 10)
    engine.load(engine.index.ownership, [(kv, None) for kv in jobs], [], revision)
    loaded = engine.index.names()
    resume.set()

    assert loaded == []
    cron.add("after", Job(due_time="0s"))  # fires after anything armed by the load would have
    calls.wait("after", 1)
    assert calls.count("once") == 1


def test_a_counter_changed_by_another_writer_is_taken_over(make_cron, calls):
    """A result whose counter write loses to another writer is dropped, and the job continues
    from the counter etcd holds."""
    release = threading.Event()

    def trigger(req):
        calls.add(req)
        if calls.count("adopt") == 2:
            release.wait(10)

    cron = make_cron(trigger)
    cron.start()
    cron.add("adopt", Job(schedule="@every 100ms", repeats=6))
    calls.wait("adopt", 2)  # the second trigger is held
    client, key = cron._client, cron._keys.counter("adopt")
    counter = stored_pb2.Counter.FromString(client.get(key).value)
    assert counter.count == 1
    counter.count = 4
    client.put(key, counter.SerializeToString())
    release.set()
    wait_until(lambda: gone(cron, "adopt"), 10)
    assert calls.count("adopt") == 2 + 2  # the held result was dropped; 4 of 6 came from etcd


@pytest.mark.etcd
def test_the_read_barrier_of_jobs_falling_due_runs_before_their_time(cron, calls, monkeypatch):
    # Every trigger waits for a read barrier begun at most FRESH_FOR before it; the one for jobs
    # falling due is run LEAD ahead of their time, so that they need not wait a round trip.
    barrier = cron._engine.informer.barrier
    began = []
    check = barrier._check

    def recording(ownership, timeout):
        began.append(time.time())
        return check(ownership, timeout)

    monkeypatch.setattr(barrier, "_check", recording)
    due = math.ceil(time.time()) + 2
    cron.add("aligned", Job(due_time=datetime.fromtimestamp(due, timezone.utc).isoformat()))
    calls.wait("aligned", 1)
    assert calls.times("aligned")[0] >= due
    assert [t for t in began if due - LEAD - 0.05 <= t < due], (due, began)
