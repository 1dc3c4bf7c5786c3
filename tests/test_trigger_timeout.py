"""``trigger_timeout``: a trigger that never returns, or a Future that never resolves, never holds
its job forever."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from etcdcron import FailurePolicy, FailurePolicyConstant, Job, TriggerResult
from etcdcron.testing import wait_until
from tests.conftest import Calls

pytestmark = pytest.mark.etcd

RETRY_ONCE = FailurePolicy(constant=FailurePolicyConstant(interval={"nanos": 100_000_000},
                                                          max_retries=1))


def test_a_future_that_never_resolves_counts_as_failed_and_a_late_result_is_ignored(make_cron,
                                                                                    calls):
    futures: list[Future] = []

    def trigger(req):
        calls.add(req)
        future = Future()
        futures.append(future)
        if calls.count(req.name) >= 3:
            future.set_result(TriggerResult.SUCCESS)
        return future

    cron = make_cron(trigger, trigger_timeout=0.5)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("job", Job(schedule="@every 100ms", repeats=2, failure_policy=RETRY_ONCE))
    # tick 1: two deliveries time out (its policy allows one retry); tick 2 succeeds at once
    wait_until(lambda: cron.get("job") is None, 15, message="the job to finish")
    assert calls.count("job") == 3
    for future in futures[:2]:
        future.set_result(TriggerResult.SUCCESS)  # far too late: ignored
    cron.add("barrier", Job(due_time="0s"))
    calls.wait("barrier", 1)
    assert calls.count("job") == 3 and cron.get("job") is None


def test_a_trigger_that_never_returns_is_failed_and_its_worker_replaced(make_cron, calls):
    release = threading.Event()

    def trigger(req):
        calls.add(req)
        if req.name == "hung" and calls.count("hung") == 1:
            release.wait(60)

    cron = make_cron(trigger, workers=1, trigger_timeout=0.5)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("hung", Job(due_time="0s", failure_policy=RETRY_ONCE))
    # the first delivery hangs; after the timeout it counts as FAILED and is retried, on the
    # worker that replaced the stuck one
    calls.wait("hung", 2, timeout=10)
    wait_until(lambda: cron.get("hung") is None, 10)
    assert cron.health().stuck == ("hung",)
    assert not cron.health().ok
    cron.add("other", Job(schedule="@every 100ms", repeats=3))
    calls.wait("other", 3)
    release.set()
    wait_until(lambda: cron.health().stuck == (), 10)
    wait_until(lambda: len(cron._engine.pool.threads) == 1, 10,
               message="the stuck worker to leave once its trigger returned")
    assert calls.count("hung") == 2


def test_a_handed_over_trigger_that_times_out_releases_its_job(make_cron):
    fired = Calls()
    release = threading.Event()

    def trigger(req):
        fired.add(req)
        if fired.count(req.name) == 1:
            release.wait(60)

    first = make_cron(trigger, replica_id="a", trigger_timeout=4, drain_timeout=0.2)
    first.start()
    assert first.wait_elected(10)
    first.add("long", Job(schedule="@every 1s", repeats=2))
    fired.wait("long", 1)
    second = make_cron(trigger, replica_id="b", trigger_timeout=4, drain_timeout=0.2)
    second.start()
    assert second.wait_elected(10)
    wait_until(lambda: first._engine.handed_over == ["long"], 10)
    # handed over, then timed out: FAILED (retried per the default policy), and the job goes on
    wait_until(lambda: first.get("long") is None, 20, message="the job to finish")
    assert first._engine.handed_over == []
    release.set()
