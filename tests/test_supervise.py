"""The supervisor of background loops (pure threads, no etcd)."""

from __future__ import annotations

import threading

import pytest

from etcdcron.supervise import STUCK_FAILURES, Health, Loop
from etcdcron.testing import wait_until

pytestmark = pytest.mark.unit


def _loop(body, stop: threading.Event, **kw) -> Loop:
    return Loop("etcdcron-test", body, stopping=stop.is_set, wait=stop.wait, **kw)


def test_a_loop_that_raises_anything_is_run_again_and_reports_the_error():
    stop = threading.Event()
    runs = []

    def body(loop: Loop) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise SystemExit("a stray exit")  # a BaseException, not an Exception
        if len(runs) == 2:
            raise KeyError("boom")
        loop.progress()
        stop.wait()

    loop = _loop(body, stop)
    loop.start()
    wait_until(lambda: len(runs) == 3 and loop.health().failures == 0, 5)
    health = loop.health()
    assert health.alive and health.restarts == 2 and health.ok
    assert health.last_error == "KeyError: 'boom'" and health.last_error_at is not None
    assert health.last_progress is not None
    stop.set()
    loop.thread.join(5)
    assert not loop.thread.is_alive()


def test_a_loop_that_keeps_failing_asks_to_resign_once_per_run_of_failures():
    stop = threading.Event()
    resigned: list[str] = []
    succeed = threading.Event()

    def body(loop: Loop) -> None:
        if succeed.is_set():
            loop.progress()
            stop.wait()
            return
        raise RuntimeError("cannot work")

    loop = _loop(body, stop, on_stuck=resigned.append, backoff_cap=0.01)
    loop.start()
    wait_until(lambda: loop.health().failures >= STUCK_FAILURES + 3, 5)
    assert len(resigned) == 1 and "etcdcron-test failed 3 times" in resigned[0]
    assert "RuntimeError: cannot work" in resigned[0]
    assert not loop.health().ok
    succeed.set()
    wait_until(lambda: loop.health().ok, 5)
    stop.set()
    loop.thread.join(5)


def test_stuck_needs_the_failures_to_last_stuck_after_seconds():
    stop = threading.Event()
    resigned: list[str] = []
    loop = _loop(lambda _: None, stop, on_stuck=resigned.append, stuck_after=3600)
    for _ in range(10):
        loop.failed(OSError("refused"))
    assert resigned == [] and loop.health().failures == 10
    loop.progress()
    assert loop.health().failures == 0


def test_an_exception_while_stopping_ends_the_thread():
    stop = threading.Event()

    def body(loop: Loop) -> None:
        stop.set()
        raise RuntimeError("on the way out")

    loop = _loop(body, stop)
    loop.start()
    loop.thread.join(5)
    assert not loop.thread.is_alive() and loop.health().restarts == 0


def test_health_lists_what_is_wrong():
    stop = threading.Event()
    loop = _loop(lambda _: None, stop)
    loop.failed(ValueError("bad"))
    health = Health(state="running", election=None, elected=True,
                    threads={loop.name: loop.health()}, unrecorded=("a",))
    assert not health.ok
    assert health.problems == ["etcdcron-test: dead (1 failure(s) in a row)",
                               "results not recorded yet for job(s): a"]
