"""etcdcron.metrics against a real prometheus_client registry, scraped as Prometheus would."""

from __future__ import annotations

import subprocess
import sys
import timeit
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from etcdcron import TriggerResult, ValidationError
from etcdcron.metrics import (
    DEFAULT_REGISTRY,
    METRIC_NAMES,
    NO_METRICS,
    Metrics,
    PrometheusMetrics,
    make_metrics,
)
from etcdcron.testing import free_port

pytestmark = pytest.mark.unit


def scrape(text: str) -> dict:
    """``{(sample name, frozenset of labels): value}`` of a text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_triggers_lateness_and_duration(registry):
    metrics = make_metrics(registry, namespace="app", replica_id="r1")
    assert isinstance(metrics, PrometheusMetrics) and metrics.enabled
    r1 = {"namespace": "app", "replica": "r1"}
    before = scrape(generate_latest(registry).decode())
    for result in TriggerResult:  # every result is there from the start, at 0
        assert value(before, "etcdcron_triggers_total", **r1, result=result.name.lower()) == 0

    metrics.trigger_done(TriggerResult.SUCCESS, lateness=0.02, duration=0.003)
    metrics.trigger_done(TriggerResult.SUCCESS, lateness=7.0, duration=0.2)
    metrics.trigger_done(TriggerResult.FAILED, lateness=-0.001, duration=0.0)  # clock skew: 0
    samples = scrape(generate_latest(registry).decode())
    assert value(samples, "etcdcron_triggers_total", **r1, result="success") == 2
    assert value(samples, "etcdcron_triggers_total", **r1, result="failed") == 1
    assert value(samples, "etcdcron_triggers_total", **r1, result="undeliverable") == 0
    lateness = "etcdcron_trigger_lateness_seconds"
    assert value(samples, f"{lateness}_count", **r1) == 3
    assert value(samples, f"{lateness}_sum", **r1) == pytest.approx(7.02)
    assert value(samples, f"{lateness}_bucket", **r1, le="0.005") == 1
    assert value(samples, f"{lateness}_bucket", **r1, le="0.025") == 2
    assert value(samples, f"{lateness}_bucket", **r1, le="5.0") == 2
    assert value(samples, f"{lateness}_bucket", **r1, le="10.0") == 3
    duration = "etcdcron_trigger_duration_seconds"
    assert value(samples, f"{duration}_count", **r1) == 3
    assert value(samples, f"{duration}_bucket", **r1, le="0.005") == 2


def test_state_gauges_are_read_at_scrape_time(registry):
    metrics = make_metrics(registry, namespace="app", replica_id="r1")
    state = {"owned": 3, "staged": 1, "partition": (2, 5)}
    metrics.bind_state(owned_jobs=lambda: state["owned"], staged_jobs=lambda: state["staged"],
                       elected=lambda: state["partition"] is not None,
                       partition=lambda: state["partition"])
    r1 = {"namespace": "app", "replica": "r1"}
    samples = scrape(generate_latest(registry).decode())
    assert [value(samples, f"etcdcron_{n}", **r1) for n in (
        "owned_jobs", "staged_jobs", "elected", "partition_index", "partition_total")] == [
        3, 1, 1, 2, 5]
    state.update(owned=0, staged=0, partition=None)
    samples = scrape(generate_latest(registry).decode())
    assert [value(samples, f"etcdcron_{n}", **r1) for n in (
        "owned_jobs", "staged_jobs", "elected", "partition_index", "partition_total")] == [
        0, 0, 0, -1, 0]


def test_etcd_errors_retries_rebalances_and_unrecorded_results(registry):
    metrics = make_metrics(registry, namespace="app", replica_id="r1")
    for _ in range(3):
        metrics.etcd_retry("UNAVAILABLE")
    metrics.etcd_error("UNAVAILABLE")
    metrics.etcd_error("RESOURCE_EXHAUSTED")
    metrics.rebalance("membership")
    metrics.rebalance("membership")
    metrics.rebalance("lease")
    metrics.unrecorded(4)
    samples = scrape(generate_latest(registry).decode())
    r1 = {"namespace": "app", "replica": "r1"}
    assert value(samples, "etcdcron_etcd_retries_total", **r1, code="UNAVAILABLE") == 3
    assert value(samples, "etcdcron_etcd_errors_total", **r1, code="UNAVAILABLE") == 1
    assert value(samples, "etcdcron_etcd_errors_total", **r1, code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, "etcdcron_rebalances_total", **r1, reason="membership") == 2
    assert value(samples, "etcdcron_rebalances_total", **r1, reason="lease") == 1
    assert value(samples, "etcdcron_unrecorded_results_total", **r1) == 4
    metrics.bind_state(owned_jobs=lambda: 0, staged_jobs=lambda: 0, elected=lambda: False,
                       partition=lambda: None)
    exported = {family.name for family in text_string_to_metric_families(
        generate_latest(registry).decode()) if not family.name.endswith("_created")}
    assert exported == set(METRIC_NAMES)


def test_two_crons_share_one_registry_and_close_only_their_own_series(registry):
    one = make_metrics(registry, namespace="app", replica_id="r1")
    two = make_metrics(registry, namespace="app", replica_id="r2")  # no duplicate error
    same_as_two = make_metrics(registry, namespace="app", replica_id="r2")  # a passive twin
    for metrics, owned in ((one, 1), (two, 2)):
        metrics.bind_state(owned_jobs=lambda n=owned: n, staged_jobs=lambda: 0,
                           elected=lambda: True, partition=lambda: (0, 2))
        metrics.trigger_done(TriggerResult.SUCCESS, 0.01, 0.01)
        metrics.etcd_error("UNAVAILABLE")
    samples = scrape(generate_latest(registry).decode())
    assert value(samples, "etcdcron_owned_jobs", namespace="app", replica="r1") == 1
    assert value(samples, "etcdcron_owned_jobs", namespace="app", replica="r2") == 2

    two.close()  # the twin still uses these labels: they stay
    two.close()  # idempotent
    samples = scrape(generate_latest(registry).decode())
    assert value(samples, "etcdcron_owned_jobs", namespace="app", replica="r2") == 2
    same_as_two.close()
    samples = scrape(generate_latest(registry).decode())
    assert not any(dict(labels).get("replica") == "r2" for _, labels in samples)
    assert value(samples, "etcdcron_owned_jobs", namespace="app", replica="r1") == 1
    assert value(samples, "etcdcron_etcd_errors_total", namespace="app", replica="r1",
                 code="UNAVAILABLE") == 1
    again = make_metrics(registry, namespace="app", replica_id="r2")  # a new Cron, same id
    again.trigger_done(TriggerResult.FAILED, 0, 0)
    samples = scrape(generate_latest(registry).decode())
    assert value(samples, "etcdcron_triggers_total", namespace="app", replica="r2",
                 result="failed") == 1


def test_scraped_over_http(registry):
    metrics = make_metrics(registry, namespace="app", replica_id="r1")
    metrics.trigger_done(TriggerResult.UNDELIVERABLE, 0.5, 0.1)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            samples = scrape(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert value(samples, "etcdcron_triggers_total", namespace="app", replica="r1",
                 result="undeliverable") == 1


def test_no_registry_means_no_metrics_and_a_bad_one_is_refused(registry):
    assert make_metrics(None, namespace="app", replica_id="r1") is NO_METRICS
    assert not NO_METRICS.enabled
    with pytest.raises(ValidationError, match="metrics_registry"):
        make_metrics("prometheus", namespace="app", replica_id="r1")
    from prometheus_client import REGISTRY

    default = make_metrics(DEFAULT_REGISTRY, namespace="app-default", replica_id="r1")
    try:
        assert REGISTRY.get_sample_value("etcdcron_triggers_total", {
            "namespace": "app-default", "replica": "r1", "result": "success"}) == 0
    finally:
        default.close()


BLOCKED = """
import sys
sys.modules["prometheus_client"] = None  # as if the metrics extra were not installed
import etcdcron, etcdcron.cli, etcdcron.metrics
from etcdcron.metrics import DEFAULT_REGISTRY, NO_METRICS, make_metrics
assert make_metrics(DEFAULT_REGISTRY, namespace="a", replica_id="r") is NO_METRICS
assert sys.modules["prometheus_client"] is None
print("ok")
"""

UNUSED = """
import sys
import etcdcron, etcdcron.cli, etcdcron.metrics
from etcdcron.metrics import make_metrics
make_metrics(None, namespace="a", replica_id="r")
assert "prometheus_client" not in sys.modules, "imported without being asked for"
print("ok")
"""


@pytest.mark.parametrize("script", [BLOCKED, UNUSED], ids=["not-installed", "not-asked-for"])
def test_without_the_extra_nothing_is_imported(script):
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_the_no_op_costs_a_method_call(registry):
    """Not a benchmark: a guard that the no-op stays a bare call (well under a microsecond)."""
    noop = Metrics()
    calls = 200_000
    seconds = min(timeit.repeat(lambda: noop.trigger_done(TriggerResult.SUCCESS, 0.1, 0.1),
                                number=calls, repeat=3))
    assert seconds / calls < 2e-6
