"""A running Cron updates every metric it exports: real etcd, a real registry, scraped as
Prometheus would (``generate_latest``). Each test fails if the call site it covers is gone."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from etcdcron import (
    Cron,
    EtcdUnavailableError,
    FailurePolicy,
    FailurePolicyDrop,
    Job,
    TriggerResult,
    ValidationError,
)
from etcdcron._etcd import EtcdClient
from etcdcron.testing import EtcdProxy, EtcdServer, wait_until
from tests.conftest import fill_until_nospace, free_nospace

pytestmark = pytest.mark.etcd

DROP = FailurePolicy(drop=FailurePolicyDrop())


def scrape(registry: CollectorRegistry) -> dict:
    """``{(sample name, frozenset of labels): value}`` of the registry's text exposition."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(registry: CollectorRegistry, name: str, cron: Cron, **labels) -> float | None:
    labels.update(namespace=cron._keys.namespace, replica=cron.replica_id)
    return scrape(registry).get((name, frozenset(labels.items())))


def test_triggers_by_result_lateness_and_duration(make_cron):
    registry = CollectorRegistry()
    slow = threading.Event()  # never set: waiting on it is how the "slow" job takes its time

    def trigger(req):
        if req.name.startswith("ok"):
            return TriggerResult.SUCCESS
        if req.name == "slow":
            slow.wait(0.3)
            return True
        if req.name == "later":
            return TriggerResult.UNDELIVERABLE
        raise RuntimeError("this job fails")

    cron = make_cron(trigger, metrics_registry=registry)
    cron.start()
    assert cron.wait_elected(10)
    for name in ("ok-1", "ok-2", "ok-3"):
        cron.add(name, Job(due_time="0s"))
    cron.add("ok-late", Job(due_time="-5s"))  # due 5 s ago: fires at once, 5 s late
    cron.add("slow", Job(due_time="0s"))
    cron.add("bad", Job(due_time="0s", failure_policy=DROP))
    cron.add("later", Job(due_time="0s"))

    def count(result: str) -> float:
        return metric(registry, "etcdcron_triggers_total", cron, result=result) or 0

    wait_until(lambda: count("success") >= 5 and count("failed") >= 1
               and count("undeliverable") >= 1, 15,
               message=lambda: f"trigger counts {[count(r) for r in ('success', 'failed')]}")
    wait_until(lambda: cron.get("ok-late") is None and cron.get("bad") is None, 10,
               message="the one-shots to finish")
    assert count("success") == 5 and count("failed") == 1
    assert count("undeliverable") == 1  # parked: it is not triggered again
    calls = count("success") + count("failed") + count("undeliverable")
    lateness = "etcdcron_trigger_lateness_seconds"
    assert metric(registry, f"{lateness}_count", cron) == calls
    assert metric(registry, f"{lateness}_sum", cron) >= 5.0  # the job due 5 s ago
    assert metric(registry, f"{lateness}_bucket", cron, le="2.5") == calls - 1
    duration = "etcdcron_trigger_duration_seconds"
    assert metric(registry, f"{duration}_count", cron) == calls
    assert metric(registry, f"{duration}_sum", cron) >= 0.3  # the slow job
    assert metric(registry, f"{duration}_bucket", cron, le="0.25") == calls - 1


def test_a_trigger_past_its_timeout_counts_as_failed_once(make_cron):
    registry = CollectorRegistry()
    release = threading.Event()

    def trigger(req):
        release.wait(30)
        return True

    cron = make_cron(trigger, metrics_registry=registry, trigger_timeout=0.2)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("stuck", Job(due_time="0s", failure_policy=DROP))
    try:
        wait_until(lambda: metric(registry, "etcdcron_triggers_total", cron,
                                  result="failed") == 1, 10, message="the timeout to count")
        wait_until(lambda: cron.get("stuck") is None, 10, message="the one-shot to finish")
    finally:
        release.set()
    wait_until(lambda: not cron.health().stuck, 10, message="the stuck worker to return")
    # its late SUCCESS is ignored, by the recorder and by the metrics
    assert metric(registry, "etcdcron_triggers_total", cron, result="success") == 0
    assert metric(registry, "etcdcron_trigger_duration_seconds_count", cron) == 1


def test_state_gauges_of_two_replicas_in_one_registry(make_cron):
    registry = CollectorRegistry()
    parked = []

    def trigger(req):
        if req.name == "parked":
            parked.append(req.name)
            return TriggerResult.UNDELIVERABLE
        return True

    one = make_cron(trigger, metrics_registry=registry, replica_id="one")
    one.start()
    assert one.wait_elected(10)
    for n in range(20):
        one.add(f"job-{n}", Job(due_time="1h"))
    wait_until(lambda: metric(registry, "etcdcron_owned_jobs", one) == 20, 10,
               message="20 owned jobs")
    assert metric(registry, "etcdcron_elected", one) == 1
    assert metric(registry, "etcdcron_partition_index", one) == 0
    assert metric(registry, "etcdcron_partition_total", one) == 1
    assert metric(registry, "etcdcron_staged_jobs", one) == 0

    two = make_cron(trigger, metrics_registry=registry, replica_id="two")
    two.start()
    wait_until(lambda: one.is_elected() and two.is_elected() and all(
        metric(registry, "etcdcron_partition_total", c) == 2 for c in (one, two)), 20,
        message="two replicas elected")
    assert {metric(registry, "etcdcron_partition_index", c) for c in (one, two)} == {0, 1}
    wait_until(lambda: sum(metric(registry, "etcdcron_owned_jobs", c) for c in (one, two)) == 20,
               10, message="the 20 jobs split between the replicas")
    assert metric(registry, "etcdcron_rebalances_total", one, reason="membership") >= 1

    one.add("parked", Job(due_time="0s"))
    wait_until(lambda: sum(metric(registry, "etcdcron_staged_jobs", c) for c in (one, two)) == 1,
               10, message="one staged job")

    two.stop()
    samples = scrape(registry)
    assert not any(dict(labels).get("replica") == "two" for _, labels in samples)
    wait_until(lambda: metric(registry, "etcdcron_partition_total", one) == 1
               and metric(registry, "etcdcron_owned_jobs", one) == 21, 20,
               message="the remaining replica to own every job")
    one.stop()
    assert metric(registry, "etcdcron_owned_jobs", one) is None  # its series left with it


def test_etcd_retries_and_errors_by_code(etcd, namespace):
    registry = CollectorRegistry()
    with EtcdProxy(etcd.endpoint) as proxy:
        cron = Cron(trigger=print, endpoints=proxy.endpoint, namespace=namespace, lease_ttl=10,
                    request_timeout=1.0, metrics_registry=registry)
        try:
            cron.start()
            assert cron.wait_elected(10)
            assert metric(registry, "etcdcron_etcd_retries_total", cron,
                          code="UNAVAILABLE") is None
            proxy.cut()
            with pytest.raises(EtcdUnavailableError):
                cron.get("anything")
            assert metric(registry, "etcdcron_etcd_retries_total", cron,
                          code="UNAVAILABLE") >= 1
            assert metric(registry, "etcdcron_etcd_errors_total", cron,
                          code="UNAVAILABLE") >= 1
            proxy.heal()
            assert cron.get("anything") is None
        finally:
            cron.stop()


def test_results_etcd_refuses_count_as_unrecorded(namespace):
    registry = CollectorRegistry()
    with EtcdServer(extra_args=["--quota-backend-bytes=16777216"]) as etcd:
        client = EtcdClient(etcd.endpoint)
        cron = Cron(trigger=lambda req: True, endpoints=etcd.endpoint, namespace=namespace,
                    lease_ttl=5, metrics_registry=registry)
        try:
            cron.start()
            assert cron.wait_elected(10)
            cron.add("tick", Job(schedule="@every 200ms"))
            wait_until(lambda: metric(registry, "etcdcron_triggers_total", cron,
                                      result="success") >= 2, 10, message="two triggers")
            assert metric(registry, "etcdcron_unrecorded_results_total", cron) == 0
            fill_until_nospace(client)
            wait_until(lambda: metric(registry, "etcdcron_unrecorded_results_total", cron) >= 1,
                       10, message="the refused result to count")
            assert metric(registry, "etcdcron_etcd_errors_total", cron,
                          code="RESOURCE_EXHAUSTED") >= 1
            free_nospace(client)
        finally:
            cron.stop()
            client.close()


def test_lease_loss_counts_a_rebalance(own_etcd, namespace):
    registry = CollectorRegistry()
    cron = Cron(trigger=print, endpoints=own_etcd.endpoint, namespace=namespace, lease_ttl=2,
                metrics_registry=registry)
    try:
        cron.start()
        assert cron.wait_elected(10)
        own_etcd.pause()  # SIGSTOP: the lease cannot be renewed and runs out
        try:
            wait_until(lambda: not cron.is_elected(), 15, message="the lease to run out")
        finally:
            own_etcd.resume()
        wait_until(lambda: cron.is_elected(), 30, message="elected again")
        assert metric(registry, "etcdcron_rebalances_total", cron, reason="lease") >= 1
    finally:
        cron.stop()


def test_metrics_registry_is_validated_and_none_exports_nothing(etcd, namespace):
    with pytest.raises(ValidationError, match="metrics_registry must be a prometheus_client"):
        Cron(trigger=print, endpoints=etcd.endpoint, namespace=namespace,
             metrics_registry="default")
    cron = Cron(trigger=print, endpoints=etcd.endpoint, namespace=namespace,
                metrics_registry=None)
    cron.stop()


def test_a_cron_exports_into_the_default_registry(make_cron):
    from prometheus_client import REGISTRY

    cron = make_cron(print)
    cron.start()
    assert cron.wait_elected(10)
    labels = {"namespace": cron._keys.namespace, "replica": cron.replica_id}
    assert REGISTRY.get_sample_value("etcdcron_elected", labels) == 1
    cron.stop()
    assert REGISTRY.get_sample_value("etcdcron_elected", labels) is None


WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # as if the metrics extra were not installed
from etcdcron import Cron, Job
from etcdcron.testing import wait_until
fired = []
cron = Cron(trigger=lambda req: fired.append(req.name), endpoints=sys.argv[1],
            namespace=sys.argv[2])
cron.start()
assert cron.wait_elected(10)
cron.add("once", Job(due_time="0s"))
wait_until(lambda: fired == ["once"], 10)
cron.stop()
assert sys.modules["prometheus_client"] is None
print("ok")
"""


def test_a_cron_runs_without_prometheus_client(etcd, namespace):
    result = subprocess.run([sys.executable, "-c", WITHOUT_PROMETHEUS, etcd.endpoint, namespace],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
