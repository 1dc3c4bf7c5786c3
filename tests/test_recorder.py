"""The recorder's batching, its threads and its hold (pure logic: a fake commit, no etcd)."""

from __future__ import annotations

import collections
import threading
import time
import types

import pytest

from etcdcron.engine import HOLD_FOR, Engine
from etcdcron.recorder import BACKLOG, MAX_BATCH, Outcome, Recorder
from etcdcron.testing import wait_until
from etcdcron.workers import WorkerPool

pytestmark = pytest.mark.unit


class FakeCommit:
    """Records each batch and the thread that committed it; each commit takes ``delay``
    seconds (an etcd round trip) so that a backlog can build up."""

    def __init__(self, delay: float):
        self.delay = delay
        self.lock = threading.Lock()
        self.names: list[str] = []
        self.threads: collections.Counter = collections.Counter()
        self.sizes: list[int] = []

    def __call__(self, batch: list[Outcome]) -> None:
        threading.Event().wait(self.delay)
        with self.lock:
            self.names += [outcome.name for outcome in batch]
            self.threads[threading.current_thread().name] += 1
            self.sizes.append(len(batch))

    def count(self) -> int:
        with self.lock:
            return len(self.names)


@pytest.fixture
def recorder_with():
    made = []

    def make(commit):
        recorder = Recorder(commit)
        recorder.start()
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        recorder.stop()
        for loop in recorder.loops:
            loop.thread.join(10)


def test_a_burst_is_committed_once_each_by_several_threads(recorder_with):
    commit = FakeCommit(delay=0.02)
    recorder = recorder_with(commit)
    total = 10 * BACKLOG
    for i in range(total):
        recorder.put(Outcome(f"job-{i}", 1, None))
    wait_until(lambda: commit.count() >= total, 30, message="every outcome committed")
    assert sorted(commit.names) == sorted(f"job-{i}" for i in range(total))  # each once
    assert len(commit.threads) > 1, commit.threads  # the helpers took batches too
    assert max(commit.sizes) <= MAX_BATCH


def test_a_trickle_stays_on_one_thread_in_large_batches(recorder_with):
    commit = FakeCommit(delay=0.01)
    recorder = recorder_with(commit)
    for i in range(3 * MAX_BATCH):
        recorder.put(Outcome(f"job-{i}", 1, None))  # less than a backlog
    wait_until(lambda: commit.count() >= 3 * MAX_BATCH, 10, message="every outcome committed")
    assert list(commit.threads) == ["etcdcron-recorder"]


def test_stop_commits_what_was_queued(recorder_with):
    commit = FakeCommit(delay=0.005)
    recorder = recorder_with(commit)
    for i in range(2 * BACKLOG):
        recorder.put(Outcome(f"job-{i}", 1, None))
    recorder.stop()
    for loop in recorder.loops:
        loop.thread.join(30)
        assert not loop.thread.is_alive()
    assert sorted(commit.names) == sorted(f"job-{i}" for i in range(2 * BACKLOG))


def test_hold_is_called_before_each_batch_is_committed(recorder_with):
    order = []
    commit = FakeCommit(delay=0.0)
    recorder = Recorder(lambda batch: (order.append("commit"), commit(batch)),
                        hold=lambda: order.append("hold"))
    recorder.start()
    try:
        recorder.put(Outcome("one", 1, None))
        wait_until(lambda: commit.count() == 1, 10, message="the outcome committed")
        recorder.put(Outcome("two", 1, None))
        wait_until(lambda: commit.count() == 2, 10, message="the second committed")
        assert order == ["hold", "commit", "hold", "commit"]
    finally:
        recorder.stop()
        recorder.loop.thread.join(10)


def test_results_are_held_back_a_bounded_time_while_triggers_wait_for_a_worker():
    # The engine's hold, on a real pool whose workers are not running: the items wait.
    pool = WorkerPool(1, lambda *item: None)
    engine = types.SimpleNamespace(pool=pool, _holding_since=None)
    began = time.monotonic()
    Engine._hold(engine)
    assert time.monotonic() - began < HOLD_FOR  # nothing waits: no hold
    pool.submit([("job", 1, 1)])
    began = time.monotonic()
    Engine._hold(engine)
    assert HOLD_FOR <= time.monotonic() - began < HOLD_FOR + 5
    began = time.monotonic()
    Engine._hold(engine)  # the same hold goes on: its time is spent
    assert time.monotonic() - began < HOLD_FOR
    pool._queue.get()  # a worker took it
    Engine._hold(engine)
    assert engine._holding_since is None  # over; the next one waits again
    pool.submit([("job", 1, 2)])
    began = time.monotonic()
    Engine._hold(engine)
    assert time.monotonic() - began >= HOLD_FOR


def test_a_hold_ends_as_soon_as_a_worker_takes_the_last_waiting_trigger():
    release, taken = threading.Event(), []
    pool = WorkerPool(1, lambda *item: (taken.append(item), release.wait(10)))
    pool.submit([("first", 1, 1), ("second", 1, 1)])
    pool.start()
    try:
        wait_until(lambda: taken, 10, message="the first item taken")
        assert not pool.wait_taken(0.05)  # the second waits behind the first
        release.set()
        assert pool.wait_taken(10)
    finally:
        release.set()
        pool.stop()
        for thread in pool.threads:
            thread.join(10)
