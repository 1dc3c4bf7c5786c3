"""What etcdcron logs, read from a real run: module loggers, no payload or metadata ever, one
line per meaningful event and none per successful trigger above DEBUG."""

from __future__ import annotations

import logging
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from google.protobuf import any_pb2, wrappers_pb2

import etcdcron
from etcdcron import (
    Cron,
    EtcdUnavailableError,
    FailurePolicy,
    FailurePolicyDrop,
    Job,
    TriggerResult,
)
from etcdcron.testing import EtcdProxy, wait_until

pytestmark = pytest.mark.etcd

PAYLOAD = "PAYLOAD-c0ffee-7f3a"
METADATA = "METADATA-f00d-91c2"
MODULES = {f"etcdcron.{m.name}" for m in pkgutil.iter_modules(etcdcron.__path__)}


class Records(logging.Handler):
    """Every record, and its full text (message, traceback, stack) as a handler would write."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record))

    def at_least(self, level: int) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= level]

    def lines(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.at_least(level)]


@contextmanager
def captured() -> Iterator[Records]:
    """All of etcdcron's log records at DEBUG, while the block runs."""
    handler = Records()
    logger = logging.getLogger("etcdcron")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def packed(text: str) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(wrappers_pb2.StringValue(value=text))
    return value


def trigger(req):
    assert PAYLOAD in str(req.payload) and METADATA in str(req.metadata)
    if req.name.startswith("ok"):
        return TriggerResult.SUCCESS
    if req.name == "returns-failed":
        return False
    if req.name == "undeliverable":
        return TriggerResult.UNDELIVERABLE
    if req.name == "returns-request":  # not a result: its repr would show the payload
        return req
    raise RuntimeError("this trigger fails")


JOBS = {
    "ok-once-1": {"due_time": "0s"},
    "ok-once-2": {"due_time": "0s"},
    "ok-every": {"schedule": "@every 100ms", "repeats": 10},
    "returns-failed": {"due_time": "0s"},
    "raises": {"due_time": "0s"},
    "undeliverable": {"due_time": "0s"},
    "returns-request": {"due_time": "0s"},
}


@pytest.fixture(scope="module")
def run_log(etcd) -> Records:
    """One replica running every kind of job to its end, with all logs captured at DEBUG."""
    with captured() as records:
        cron = Cron(trigger=trigger, endpoints=etcd.endpoint, namespace="logging-run",
                    lease_ttl=5, consumer_sink=lambda event: None, metrics_registry=None)
        try:
            cron.start()
            assert cron.wait_elected(10)
            cron.delete_prefixes("")
            for name, fields in JOBS.items():
                cron.add(name, Job(payload=packed(PAYLOAD), metadata=packed(METADATA),
                                   failure_policy=FailurePolicy(drop=FailurePolicyDrop()),
                                   **fields))
            wait_until(lambda: {j.name for j in cron.list()} == {"undeliverable"}, 20,
                       message=lambda: f"the jobs to finish: {[j.name for j in cron.list()]}")
            assert [j.name for j in cron.list()] == ["undeliverable"]
            cron.delete("undeliverable")
        finally:
            cron.stop()
    return records


def test_no_log_line_shows_a_payload_or_metadata(run_log):
    assert any(r.levelno == logging.DEBUG for r in run_log.records)  # DEBUG was captured
    assert any("Traceback" in text for text in run_log.texts)  # with tracebacks
    leaks = [text for text in run_log.texts if PAYLOAD in text or METADATA in text]
    assert not leaks, leaks


def test_each_line_comes_from_a_module_logger(run_log):
    names = {r.name for r in run_log.records}
    assert names <= MODULES, names - MODULES
    assert {"etcdcron.election", "etcdcron.engine", "etcdcron.lease"} <= names


def test_at_info_successes_log_nothing_and_each_failure_names_its_job(run_log):
    lines = run_log.lines(logging.INFO)
    assert not [line for line in lines if "'ok-" in line]  # 12 successful triggers, no line
    failed = [r for r in run_log.at_least(logging.WARNING) if "'returns-failed'" in r.getMessage()]
    assert [r.getMessage() for r in failed] == ["job 'returns-failed': its trigger returned FAILED"]
    raised = [r for r in run_log.at_least(logging.ERROR) if "'raises'" in r.getMessage()]
    assert len(raised) == 1 and raised[0].exc_info is not None
    wrong = [line for line in lines if "'returns-request'" in line]
    assert len(wrong) == 1 and "a TriggerRequest" in wrong[0], wrong
    # the session's own lines: elected, and leaving its partition on stop
    assert "replica %r: elected for partition(s) %s of %d" in {r.msg for r in run_log.records}


def test_a_rebalance_logs_the_new_number_of_replicas(make_cron):
    with captured() as records:
        one = make_cron(print, replica_id="one")
        one.start()
        assert one.wait_elected(10)
        two = make_cron(print, replica_id="two")
        two.start()
        wait_until(lambda: "replica 'two': elected for partition(s) [1] of 2"
                   in records.lines(logging.INFO), 20, message="two elected")
        wait_until(lambda: "replica 'one': elected for partition(s) [0] of 2"
                   in records.lines(logging.INFO), 20, message="one elected again")
    lines = records.lines(logging.INFO)
    assert "replica 'one': leaving partition(s) [0] of 1: membership changed to 2 replica(s)" \
        in lines


def test_etcd_unreachable_and_reachable_again_are_one_line_each(etcd, namespace):
    with EtcdProxy(etcd.endpoint) as proxy, captured() as records:
        cron = Cron(trigger=print, endpoints=proxy.endpoint, namespace=namespace,
                    request_timeout=1.5, metrics_registry=None)
        try:
            assert cron.get("x") is None
            proxy.cut()
            for _ in range(2):  # many failed attempts, two calls: one line
                with pytest.raises(EtcdUnavailableError):
                    cron.get("x")
            proxy.heal()
            assert cron.get("x") is None
        finally:
            cron.stop()
    lines = records.lines(logging.INFO)
    down = [line for line in lines if line.startswith("etcd unreachable (")]
    up = [line for line in lines if line.startswith("etcd reachable again after ")]
    assert len(down) == 1 and len(up) == 1, lines
    assert lines.index(down[0]) < lines.index(up[0])
    assert [r.name for r in records.records if r.getMessage() in (down[0], up[0])] == [
        "etcdcron._etcd", "etcdcron._etcd"]
