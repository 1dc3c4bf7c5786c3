"""The recorder's batching and its threads (pure logic: a fake commit, no etcd)."""

from __future__ import annotations

import collections
import threading

import pytest

from etcdcron.recorder import BACKLOG, MAX_BATCH, Outcome, Recorder
from etcdcron.testing import wait_until

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
