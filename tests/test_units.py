"""Unit tests of the small pure pieces: timer, staging, workers, keys, gc, index, api, errors."""

from __future__ import annotations

import enum
import logging
import re
import threading
from datetime import datetime, timezone

import pytest
from etcd3.etcdrpc.kv_pb2 import KeyValue
from google.protobuf.any_pb2 import Any
from google.protobuf.duration_pb2 import Duration

import etcdcron.timer as timer_module
from etcdcron import (
    EtcdCronError,
    EtcdError,
    EtcdUnavailableError,
    Job,
    JobExistsError,
    LifecycleError,
    StopTimeoutError,
    TriggerResponse,
    TriggerResult,
    ValidationError,
)
from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.gc import find_garbage
from etcdcron.index import JobIndex, Ownership, Phase
from etcdcron.keys import Keys, prefix_end
from etcdcron.schedule import parse_schedule
from etcdcron.staging import Staging
from etcdcron.ticks import pending, to_timestamp
from etcdcron.timer import Timer, TimerHeap
from etcdcron.validation import prepare_job
from etcdcron.workers import WorkerPool, to_result

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
WAIT = 5.0  # seconds to wait for another thread before failing (never reached when all is well)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logger(request):
    log = logging.getLogger(f"etcdcron.tests.{request.node.name}")
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    log.records = handler.records
    yield log
    log.removeHandler(handler)


# -- TimerHeap -----------------------------------------------------------------------------------

def test_timer_heap_orders_by_due_then_insertion():
    heap = TimerHeap()
    for due, name in [(30, "c"), (10, "a1"), (20, "b"), (10, "a2"), (10, "a3")]:
        heap.push(due, name, ord(name[0]))
    assert len(heap) == 5
    assert heap.pop_due(100) == [("a1", 97), ("a2", 97), ("a3", 97), ("b", 98), ("c", 99)]
    assert len(heap) == 0


@pytest.mark.parametrize("now, popped, left", [
    (9.999, [], 4),
    (10, ["a"], 3),
    (15, ["a"], 3),
    (20, ["a", "b", "b2"], 1),
    (30, ["a", "b", "b2", "c"], 0),
])
def test_timer_heap_pop_due_pops_exactly_the_due_entries(now, popped, left):
    heap = TimerHeap()
    heap.push(20, "b", 2)
    heap.push(30, "c", 3)
    heap.push(10, "a", 1)
    heap.push(20, "b2", 4)
    assert [name for name, _ in heap.pop_due(now)] == popped
    assert len(heap) == left


def test_timer_heap_push_reports_whether_earliest():
    heap = TimerHeap()
    assert heap.push(10, "a", 1) is True
    assert heap.push(20, "b", 2) is False
    assert heap.push(10, "c", 3) is False  # a tie arms after the existing entry
    assert heap.push(5, "d", 4) is True
    assert heap.pop_due(100) == [("d", 4), ("a", 1), ("c", 3), ("b", 2)]


def test_timer_heap_next_due_and_clear():
    heap = TimerHeap()
    assert heap.next_due() is None
    heap.push(20, "b", 2)
    assert heap.next_due() == 20
    heap.push(10.5, "a", 1)
    assert heap.next_due() == 10.5
    heap.pop_due(15)
    assert heap.next_due() == 20
    heap.clear()
    assert heap.next_due() is None
    assert len(heap) == 0
    assert heap.pop_due(1e12) == []


# -- Timer ---------------------------------------------------------------------------------------

class Deliveries:
    """Records ``on_due`` calls; ``wait(n)`` waits for the n-th call."""

    def __init__(self, fail_first: bool = False):
        self.batches: list[list[tuple[str, int]]] = []
        self.threads: list[str] = []
        self._cond = threading.Condition()
        self._fail_first = fail_first

    def __call__(self, entries):
        with self._cond:
            self.batches.append(list(entries))
            self.threads.append(threading.current_thread().name)
            self._cond.notify_all()
        if self._fail_first and len(self.batches) == 1:
            raise RuntimeError("on_due failed")

    def wait(self, count: int) -> list[list[tuple[str, int]]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.batches) >= count, WAIT), (
                f"on_due was called {len(self.batches)} times, expected {count}")
            return list(self.batches)


@pytest.fixture
def fake_clock():
    clock = [1000.0]
    return clock


@pytest.fixture
def make_timer(monkeypatch, fake_clock, logger):
    # Without a wake-up on arm, the timer would now sleep a minute: every wait below would fail.
    monkeypatch.setattr(timer_module, "MAX_WAIT", 60.0)
    made = []

    def make(on_due):
        t = Timer(on_due, clock=lambda: fake_clock[0], logger=logger)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()
        t.thread.join(WAIT)


def test_timer_delivers_an_earlier_entry_at_once(make_timer, fake_clock):
    deliveries = Deliveries()
    timer = make_timer(deliveries)
    timer.start()
    start = fake_clock[0]
    timer.arm_many([(start + 1000, "far", 1)])
    timer.arm_many([(start - 1, "due", 2)])
    assert deliveries.wait(1) == [[("due", 2)]]
    assert deliveries.threads == ["etcdcron-timer"]
    # the far entry is still armed: once it is due, the next wake-up delivers it too, in order
    fake_clock[0] += 2000
    timer.arm_many([(start + 500, "earlier", 3)])
    assert deliveries.wait(2) == [[("due", 2)], [("earlier", 3), ("far", 1)]]


def test_timer_delivers_in_due_order(make_timer, fake_clock):
    deliveries = Deliveries()
    timer = make_timer(deliveries)
    now = fake_clock[0]
    for due, name, token in [(now - 1, "c", 3), (now - 30, "a", 1), (now - 20, "b", 2),
                             (now - 30, "a2", 4), (now + 50, "later", 5)]:
        timer.arm_many([(due, name, token)])
    timer.start()
    assert deliveries.wait(1) == [[("a", 1), ("a2", 4), ("b", 2), ("c", 3)]]
    fake_clock[0] += 100
    timer.arm_many([(now - 5, "early", 6)])
    assert deliveries.wait(2)[1] == [("early", 6), ("later", 5)]


def test_timer_arm_many_wakes_the_thread(make_timer, fake_clock):
    deliveries = Deliveries()
    timer = make_timer(deliveries)
    timer.start()
    now = fake_clock[0]
    timer.arm_many([(now + 10, "first", 1)])
    fake_clock[0] += 100
    # not earlier than "first", but arm_many always wakes the timer
    timer.arm_many([(now + 30, "third", 3), (now + 20, "second", 2)])
    assert deliveries.wait(1) == [[("first", 1), ("second", 2), ("third", 3)]]


def test_timer_clear_drops_armed_entries(make_timer, fake_clock):
    deliveries = Deliveries()
    timer = make_timer(deliveries)
    timer.start()
    timer.arm_many([(fake_clock[0] + 10, "cleared", 1)])
    timer.clear()
    fake_clock[0] += 100
    timer.arm_many([(fake_clock[0], "kept", 2)])
    assert deliveries.wait(1) == [[("kept", 2)]]


def test_timer_survives_a_failing_on_due_and_delivers_those_entries_again(make_timer, fake_clock,
                                                                          logger):
    deliveries = Deliveries(fail_first=True)
    timer = make_timer(deliveries)
    timer.start()
    timer.arm_many([(fake_clock[0], "one", 1)])
    assert deliveries.wait(2)[:2] == [[("one", 1)], [("one", 1)]]
    timer.arm_many([(fake_clock[0], "two", 2)])
    assert deliveries.wait(3)[2] == [("two", 2)]
    assert timer.thread.is_alive()
    errors = [r for r in logger.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert timer.loop.health().restarts == 1


def test_timer_tells_on_soon_once_per_due_time_before_it_falls_due(monkeypatch, fake_clock,
                                                                   logger):
    monkeypatch.setattr(timer_module, "MAX_WAIT", 60.0)
    deliveries, soon = Deliveries(), Deliveries()
    timer = Timer(deliveries, clock=lambda: fake_clock[0], logger=logger,
                  on_soon=lambda due: soon([(due, 0)]))
    start = fake_clock[0]
    timer.arm_many([(start + timer_module.LEAD / 2, "near", 1), (start + 5, "far", 2)])
    timer.start()
    try:
        assert soon.wait(1) == [[(start + timer_module.LEAD / 2, 0)]]
        assert deliveries.batches == []  # told ahead of time, not yet due
        timer.arm_many([(start + 50, "farther", 3)])  # wakes the timer: nothing new to tell
        fake_clock[0] = start + timer_module.LEAD  # "near" is due, "far" is 5 s away
        timer.arm_many([(start + 60, "farthest", 4)])
        assert deliveries.wait(1) == [[("near", 1)]]
        assert len(soon.batches) == 1
        fake_clock[0] = start + 5 - timer_module.LEAD / 2  # "far" is near now
        timer.arm_many([(start + 70, "last", 5)])
        assert soon.wait(2)[1] == [(start + 5, 0)]
        assert len(deliveries.batches) == 1
        fake_clock[0] = start + 5
        timer.arm_many([(start + 80, "wake", 6)])
        assert deliveries.wait(2)[1] == [("far", 2)]
        assert len(soon.batches) == 2 and soon.threads == ["etcdcron-timer"] * 2
    finally:
        timer.stop()
        timer.thread.join(WAIT)


def test_timer_heap_stays_in_proportion_to_its_jobs_under_replaces_and_deletes():
    heap = TimerHeap()
    for version in range(5000):  # one job, replaced again and again, far in the future
        heap.push(1e9 + version, "job", version)
        heap.push(2e9, f"deleted-{version}", version)
        heap.discard(f"deleted-{version}")
    assert len(heap) == 1 and heap.size <= 2 * len(heap) + 65
    assert heap.pop_due(3e9) == [("job", 4999)]
    assert heap.size == 0


def test_timer_heap_skips_replaced_and_discarded_entries():
    heap = TimerHeap()
    heap.push(10, "a", 1)
    heap.push(20, "b", 2)
    heap.push(30, "a", 3)  # a new version of "a" replaces its entry at 10
    heap.discard("b")
    assert heap.next_due() == 30
    assert heap.pop_due(100) == [("a", 3)]


def test_timer_stop_ends_the_thread(make_timer, fake_clock):
    timer = make_timer(Deliveries())
    timer.start()
    timer.arm_many([(fake_clock[0] + 1000, "far", 1)])
    assert timer.thread.is_alive()
    timer.stop()
    timer.thread.join(WAIT)
    assert not timer.thread.is_alive()


# -- Staging -------------------------------------------------------------------------------------

class Releases:
    def __init__(self):
        self.staging: Staging | None = None
        self.calls: list[list[tuple[str, int]]] = []
        self.lock_free: list[bool] = []

    def __call__(self, entries):
        self.calls.append(sorted(entries))
        # The lock is free when release runs: another thread can take it right away.
        probe = threading.Thread(target=self.staging.parked)
        probe.start()
        probe.join(WAIT)
        self.lock_free.append(not probe.is_alive())


@pytest.fixture
def releases():
    r = Releases()
    r.staging = Staging(r)
    return r


def test_park_holds_a_job_when_no_prefix_matches(releases):
    staging = releases.staging
    assert staging.park("tenant-a||job", 1) is True
    assert staging.park("other", 2) is True
    assert staging.parked() == ["other", "tenant-a||job"]
    staging.register(("tenant-b||",))
    assert staging.parked() == ["other", "tenant-a||job"]
    assert releases.calls == []


def test_register_releases_matching_parked_jobs_outside_the_lock(releases):
    staging = releases.staging
    staging.park("tenant-a||one", 1)
    staging.park("tenant-a||two", 2)
    staging.park("tenant-b||three", 3)
    handle = staging.register(("tenant-a||", "nothing"))
    assert handle is not None
    assert handle.prefixes == ("tenant-a||", "nothing")
    assert releases.calls == [[("tenant-a||one", 1), ("tenant-a||two", 2)]]
    assert releases.lock_free == [True]
    assert staging.parked() == ["tenant-b||three"]


def test_park_keeps_the_latest_token(releases):
    staging = releases.staging
    staging.park("job", 1)
    staging.park("job", 7)
    staging.register(("j",))
    assert releases.calls == [[("job", 7)]]


def test_park_refuses_while_a_matching_prefix_is_registered(releases):
    staging = releases.staging
    handle = staging.register(("tenant-a||",))
    assert staging.park("tenant-a||job", 1) is False
    assert staging.parked() == []
    assert staging.park("tenant-b||job", 2) is True
    handle.cancel()
    assert staging.park("tenant-a||job", 3) is True
    assert staging.parked() == ["tenant-a||job", "tenant-b||job"]


def test_empty_prefix_matches_everything(releases):
    staging = releases.staging
    staging.park("x", 1)
    with staging.register(("",)):
        assert releases.calls == [[("x", 1)]]
        assert staging.park("anything", 2) is False


def test_registrations_are_reference_counted(releases):
    staging = releases.staging
    first = staging.register(("a",))
    second = staging.register(("a",))
    first.cancel()
    assert staging.park("abc", 1) is False
    first.cancel()  # idempotent: does not remove the second registration
    assert staging.park("abc", 1) is False
    second.cancel()
    assert staging.park("abc", 1) is True
    second.cancel()
    assert staging.parked() == ["abc"]
    third = staging.register(("a",))
    assert releases.calls == [[("abc", 1)]]
    third.cancel()
    assert staging.park("abc", 2) is True


def test_handle_is_a_context_manager(releases):
    staging = releases.staging
    with staging.register(("a",)) as handle:
        assert handle.prefixes == ("a",)
        assert staging.park("a1", 1) is False
    assert staging.park("a1", 1) is True
    handle.cancel()  # already cancelled by the with block: no effect
    assert staging.parked() == ["a1"]


def test_discard_and_clear(releases):
    staging = releases.staging
    staging.park("a1", 1)
    staging.park("a2", 2)
    staging.park("b1", 3)
    staging.discard("a1")
    staging.discard("missing")
    assert staging.parked() == ["a2", "b1"]
    staging.register(("a",))
    assert releases.calls == [[("a2", 2)]]
    staging.clear()
    assert staging.parked() == []
    staging.register(("b",))
    assert releases.calls == [[("a2", 2)]]


# -- to_result -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, TriggerResult.SUCCESS),
    (True, TriggerResult.SUCCESS),
    (False, TriggerResult.FAILED),
    (TriggerResult.SUCCESS, TriggerResult.SUCCESS),
    (TriggerResult.FAILED, TriggerResult.FAILED),
    (TriggerResult.UNDELIVERABLE, TriggerResult.UNDELIVERABLE),
    (0, TriggerResult.SUCCESS),
    (1, TriggerResult.FAILED),
    (2, TriggerResult.UNDELIVERABLE),
    (TriggerResponse(), TriggerResult.SUCCESS),
    (TriggerResponse(result=api_pb2.FAILED), TriggerResult.FAILED),
    (TriggerResponse(result=api_pb2.UNDELIVERABLE), TriggerResult.UNDELIVERABLE),
], ids=repr)
def test_to_result(value, expected):
    result = to_result(value)
    assert result is expected


@pytest.mark.parametrize("value", [3, -1, 1.0, "SUCCESS", "ok", object(), [], {}, b"0"],
                         ids=lambda value: type(value).__name__ + ":" + (
                             "" if type(value) is object else repr(value)))
def test_to_result_rejects_anything_else(value):
    with pytest.raises(TypeError) as info:
        to_result(value)
    scalar = isinstance(value, (int, float, str, bytes))
    assert (repr(value) if scalar else f"a {type(value).__name__}") in str(info.value)


def test_to_result_does_not_show_a_message_it_is_given():
    """A trigger that returns its request by mistake: the error (which is logged) names the
    type only, never the payload in it."""
    request = api_pb2.TriggerRequest(name="x")
    request.payload.value = b"secret-payload"
    with pytest.raises(TypeError, match="trigger returned a TriggerRequest;") as info:
        to_result(request)
    assert "secret" not in str(info.value)


# -- WorkerPool ----------------------------------------------------------------------------------

def test_worker_pool_runs_items_on_size_named_threads(logger):
    size = 3
    barrier = threading.Barrier(size, timeout=WAIT)
    ran = []
    lock = threading.Lock()

    def run(name, token):
        barrier.wait()  # passes only when `size` items run at the same time
        with lock:
            ran.append((name, token, threading.current_thread().name))

    pool = WorkerPool(size, run, logger)
    names = [t.name for t in pool.threads]
    assert len(names) == size
    assert len(set(names)) == size
    assert all(re.fullmatch(r"etcdcron-worker-\d+", n) for n in names)
    pool.start()
    try:
        pool.submit([("a", 1), ("b", 2), ("c", 3)])
        pool.stop()
        for thread in pool.threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in pool.threads)
        assert sorted((n, t) for n, t, _ in ran) == [("a", 1), ("b", 2), ("c", 3)]
        assert sorted(thread for _, _, thread in ran) == sorted(names)
        assert logger.records == []
    finally:
        barrier.abort()
        pool.stop()


def test_worker_survives_a_raising_run(logger):
    done = threading.Event()
    ran = []

    def run(name, token):
        ran.append((name, token))
        if name == "bad":
            raise RuntimeError("boom")
        done.set()

    pool = WorkerPool(1, run, logger)
    pool.start()
    try:
        pool.submit([("bad", 1), ("good", 2)])
        assert done.wait(WAIT)
        assert ran == [("bad", 1), ("good", 2)]
        assert pool.threads[0].is_alive()
        errors = [r for r in logger.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "'bad'" in errors[0].getMessage()
        assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError
    finally:
        pool.stop()
        pool.threads[0].join(WAIT)
    assert not pool.threads[0].is_alive()


def test_worker_pool_stop_ends_idle_threads(logger):
    pool = WorkerPool(4, lambda name, token: None, logger)
    pool.start()
    pool.stop()
    for thread in pool.threads:
        thread.join(WAIT)
    assert [t.is_alive() for t in pool.threads] == [False] * 4


# -- keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, end", [
    (b"a", b"b"),
    (b"a\xff", b"b"),
    (b"a\xff\xff", b"b"),
    (b"ns/jobs/", b"ns/jobs0"),
    (b"a\x00", b"a\x01"),
    (b"\xff", b"\x00"),
    (b"\xff\xff", b"\x00"),
    (b"", b"\x00"),
])
def test_prefix_end(prefix, end):
    assert prefix_end(prefix) == end


def test_keys_layout():
    keys = Keys("NS")
    assert keys.namespace == "NS"
    assert keys.jobs == b"NS/jobs/"
    assert keys.counters == b"NS/counters/"
    assert keys.leadership == b"NS/leadership/"
    assert keys.job("tenant||my job") == b"NS/jobs/tenant||my job"
    assert keys.counter("my-job") == b"NS/counters/my-job"
    assert keys.leader("replica-1") == b"NS/leadership/replica-1"


@pytest.mark.parametrize("namespace", ["NS", "a/b", "caf\u00e9", ""])
@pytest.mark.parametrize("name", ["x", "foo.BAR_f-oo||foo", "h\u00e9llo world"])
def test_keys_inverses(namespace, name):
    keys = Keys(namespace)
    assert keys.job_name(keys.job(name)) == name
    assert keys.counter_name(keys.counter(name)) == name
    assert keys.replica_id(keys.leader(name)) == name
    assert keys.job(name).startswith(keys.jobs)
    assert keys.job(name) < prefix_end(keys.jobs)


# -- gc ------------------------------------------------------------------------------------------

def counter_kv(partition_id: int, mod_revision: int) -> KeyValue:
    value = stored_pb2.Counter(job_partition_id=partition_id, count=3).SerializeToString()
    return KeyValue(value=value, mod_revision=mod_revision)


def test_find_garbage():
    jobs = {
        "same": (11, 100),
        "other": (22, 101),
        "undecodable-job": (None, 102),
        "undecodable-counter": (44, 103),
        "zero": (0, 104),
    }
    counters = [
        ("same", counter_kv(11, 200)),
        ("other", counter_kv(99, 201)),
        ("orphan", counter_kv(11, 202)),
        ("undecodable-job", counter_kv(99, 203)),
        ("undecodable-counter", KeyValue(value=b"\xff\xff", mod_revision=204)),
        ("zero", KeyValue(value=b"", mod_revision=205)),
        # a record that cannot be decoded is never deleted, even without its job
        ("undecodable-orphan", KeyValue(value=b"\xff", mod_revision=206)),
    ]
    assert find_garbage(jobs, counters) == [
        ("other", 201, 101),
        ("orphan", 202, 0),
    ]


def test_find_garbage_of_nothing():
    assert find_garbage({}, []) == []
    assert find_garbage({"a": (1, 5)}, []) == []
    assert find_garbage({}, [("a", counter_kv(1, 7))]) == [("a", 7, 0)]


# -- index ---------------------------------------------------------------------------------------

def record(partition_id: int, job: Job | None = None) -> stored_pb2.Job:
    r = prepare_job("job", job or Job(schedule="@every 1s"), NOW)
    r.partition_id = partition_id
    return r


def test_put_new_job():
    index = JobIndex()
    rec = record(7)
    with index.lock:
        state = index.put_locked("job", rec, 10, None, 0)
        assert index.get_locked("job") is state
    assert state.name == "job"
    assert state.record == rec
    assert state.mod_revision == 10
    assert state.counter == stored_pb2.Counter(job_partition_id=7)
    assert state.counter_revision == 0
    assert state.phase is Phase.IDLE
    assert state.next == pending(rec, state.counter, parse_schedule("@every 1s"))
    assert state.next.tick == NOW.replace(second=6)
    assert index.names() == ["job"]
    assert len(index) == 1


def test_put_uses_a_counter_of_the_same_partition():
    index = JobIndex()
    rec = record(7)
    c = stored_pb2.Counter(job_partition_id=7, count=2, last_trigger=to_timestamp(NOW.replace(second=30)))
    with index.lock:
        state = index.put_locked("job", rec, 10, c, 12)
    assert state.counter == c
    assert state.counter_revision == 12
    assert state.next.tick == NOW.replace(second=31)


def test_put_ignores_a_counter_of_another_partition():
    index = JobIndex()
    c = stored_pb2.Counter(job_partition_id=8, count=2, last_trigger=to_timestamp(NOW))
    with index.lock:
        state = index.put_locked("job", record(7), 10, c, 12)
    assert state.counter == stored_pb2.Counter(job_partition_id=7)
    assert state.next.tick == NOW.replace(second=6)


def test_put_same_mod_revision_is_ignored():
    index = JobIndex()
    with index.lock:
        first = index.put_locked("job", record(7), 10, None, 0)
        assert index.put_locked("job", record(7), 10, None, 0) is None
        assert index.put_locked("job", record(9), 10, None, 0) is None
        assert index.get_locked("job") is first


def test_re_put_of_the_same_partition_updates_the_state_in_place():
    index = JobIndex()
    with index.lock:
        first = index.put_locked("job", record(7), 10, None, 0)
        first.counter = stored_pb2.Counter(job_partition_id=7, count=5)
        first.counter_revision = 15
        stale = stored_pb2.Counter(job_partition_id=7, count=1)
        paused = record(7)
        paused.paused = True
        second = index.put_locked("job", paused, 11, stale, 12)
    assert second is first and second.token == first.token
    assert second.mod_revision == 11 and second.record.paused
    assert second.counter == stored_pb2.Counter(job_partition_id=7, count=5)
    assert second.counter_revision == 15


def test_re_put_of_a_state_in_flight_leaves_its_delivery_alone():
    index = JobIndex()
    with index.lock:
        state = index.put_locked("job", record(7), 10, None, 0)
        delivery = state.next
        index.set_phase_locked(state, Phase.RUNNING)
        changed = record(7)
        changed.due_time.seconds += 3600
        assert index.put_locked("job", changed, 11, None, 0) is state
    assert state.next is delivery and state.phase is Phase.RUNNING and index.running == 1


def test_put_of_a_new_partition_starts_a_fresh_counter():
    index = JobIndex()
    with index.lock:
        first = index.put_locked("job", record(7), 10, None, 0)
        first.counter = stored_pb2.Counter(job_partition_id=7, count=5)
        second = index.put_locked("job", record(8), 11, first.counter, 13)
        third = index.put_locked("job", record(9), 12,
                                 stored_pb2.Counter(job_partition_id=9, count=3), 14)
    assert second.counter == stored_pb2.Counter(job_partition_id=8)
    assert third.counter == stored_pb2.Counter(job_partition_id=9, count=3)
    assert third.counter_revision == 14
    assert len({first.token, second.token, third.token}) == 3


def test_put_of_a_finished_job_has_no_next():
    index = JobIndex()
    with index.lock:
        state = index.put_locked("job", record(1, Job(due_time="1s")), 10,
                                 stored_pb2.Counter(job_partition_id=1, count=1), 11)
    assert state is not None
    assert state.next is None


def test_put_of_an_unschedulable_version_raises_and_changes_nothing():
    index = JobIndex()
    bad = record(7)
    bad.job.schedule = "not a schedule"
    out_of_range = record(7)
    out_of_range.due_time.seconds = 10**13  # beyond datetime's year 9999
    with index.lock:
        old = index.put_locked("job", record(7), 10, None, 0)
        index.set_phase_locked(old, Phase.RUNNING)
        with pytest.raises(ValueError, match="not a schedule"):
            index.put_locked("job", bad, 11, None, 0)
        with pytest.raises(ValueError, match="due_time is out of range"):
            index.put_locked("job", out_of_range, 12, None, 0)
        assert index.get_locked("job") is old
    assert index.running == 1


def test_running_count_follows_phases():
    index = JobIndex()
    with index.lock:
        a = index.put_locked("a", record(1), 10, None, 0)
        b = index.put_locked("b", record(2), 11, None, 0)
        c = index.put_locked("c", record(3), 12, None, 0)
        assert index.running == 0
        index.set_phase_locked(a, Phase.ARMED)
        assert index.running == 0
        index.set_phase_locked(a, Phase.RUNNING)
        index.set_phase_locked(b, Phase.RUNNING)
        assert index.running == 2
        index.set_phase_locked(a, Phase.RUNNING)  # no change
        assert index.running == 2
        index.set_phase_locked(a, Phase.STAGED)
        assert a.phase is Phase.STAGED
        assert index.running == 1
        index.set_phase_locked(a, Phase.RUNNING)
        assert index.running == 2
        # removal of a RUNNING job
        assert index.remove_locked("a") is a
        assert index.running == 1
        # replacement of a RUNNING job
        replaced = index.put_locked("b", record(20), 13, None, 0)
        assert replaced.phase is Phase.IDLE
        assert b.phase is Phase.IDLE
        assert index.running == 0
        # removal of a non-running job changes nothing
        index.set_phase_locked(replaced, Phase.RUNNING)
        assert index.remove_locked("c") is c
        assert index.running == 1
        index.clear_locked()
        assert index.running == 0
        assert len(index) == 0


def test_get_and_remove_check_the_token():
    index = JobIndex()
    with index.lock:
        state = index.put_locked("job", record(1), 10, None, 0)
        assert index.get_locked("job", state.token) is state
        assert index.get_locked("job", state.token + 1000) is None
        assert index.remove_locked("job", state.token + 1000) is None
        assert index.get_locked("job") is state
        assert index.remove_locked("job", state.token) is state
        assert index.get_locked("job") is None
        assert index.remove_locked("job") is None


def test_a_deleted_version_is_not_loaded_again_until_the_informer_caught_up():
    index = JobIndex()
    with index.lock:
        state = index.put_locked("job", record(1), 10, None, 0)
        index.remove_locked("job", state.token)
        index.mark_deleted_locked("job", 15)
        assert index.put_locked("job", record(1), 10, None, 0) is None  # a listing at < 15
        assert index.put_locked("job", record(2), 16, None, 0) is not None  # re-added after
        index.remove_locked("job")
        index.caught_up_locked(14)  # not yet
        assert index.put_locked("job", record(1), 10, None, 0) is None
        index.caught_up_locked(15)
        assert index.put_locked("job", record(1), 10, None, 0) is not None
        index.remove_locked("job")
        index.mark_deleted_locked("a", 20)
        index.mark_deleted_locked("b", 30)
        index.caught_up_locked(25)  # a listing at 25 knows of a's delete, not of b's
        assert index.put_locked("a", record(1), 5, None, 0) is not None
        assert index.put_locked("b", record(1), 5, None, 0) is None
        index.clear_locked()  # a new session lists afresh
        assert index.put_locked("b", record(1), 5, None, 0) is not None


@pytest.mark.parametrize("partition_id, total, indices, owned", [
    (0, 1, {0}, True),
    (12345678901234567890, 1, {0}, True),
    (5, 3, {2}, True),
    (5, 3, {0, 1}, False),
    (6, 3, {0}, True),
    (7, 4, {0, 1, 2}, False),
    (2 ** 64 - 1, 2, {1}, True),
    (2 ** 64 - 1, 2, {0}, False),
    (4, 5, frozenset(), False),
])
def test_ownership_owns(partition_id, total, indices, owned):
    ownership = Ownership(total=total, indices=frozenset(indices), fence_key=b"NS/leadership/r",
                          fence_revision=3)
    assert ownership.owns(partition_id) is owned


# -- api and errors ------------------------------------------------------------------------------

def test_trigger_result_is_an_int_enum():
    assert issubclass(TriggerResult, enum.IntEnum)
    assert [(m.name, m.value) for m in TriggerResult] == [
        ("SUCCESS", 0), ("FAILED", 1), ("UNDELIVERABLE", 2)]
    assert TriggerResult.FAILED == api_pb2.FAILED
    assert TriggerResult.UNDELIVERABLE == api_pb2.UNDELIVERABLE


@pytest.mark.parametrize("error, bases", [
    (ValidationError("v"), (ValueError, EtcdCronError)),
    (JobExistsError("x"), (EtcdCronError,)),
    (StopTimeoutError("s"), (TimeoutError, EtcdCronError)),
    (LifecycleError("l"), (RuntimeError, EtcdCronError)),
    (EtcdUnavailableError("u"), (ConnectionError, EtcdError, EtcdCronError)),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "")
def test_error_bases(error, bases):
    for base in bases:
        assert isinstance(error, base)


def test_job_exists_error_message():
    error = JobExistsError("x")
    assert str(error) == "job already exists: 'x'"
    assert error.name == "x"
