"""Shared fixtures: one real etcd per test session, a fresh namespace per test, Cron factories.

Tests that restart or kill etcd take their own server (``own_etcd``) so the others are not
disturbed. When a test fails, the tail of the etcd log is attached to its report.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import defaultdict

import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc

from etcdcron import Cron
from etcdcron._etcd import EtcdClient
from etcdcron.testing import EtcdServer, wait_until

_servers: list[EtcdServer] = []
_namespaces = itertools.count(1)


@pytest.fixture(scope="session")
def etcd():
    server = EtcdServer()
    server.start()
    _servers.append(server)
    yield server
    server.close()


@pytest.fixture
def own_etcd():
    """An etcd of this test alone (for restarts and kills)."""
    server = EtcdServer()
    server.start()
    _servers.append(server)
    yield server
    server.close()
    _servers.remove(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _servers:
            report.sections.append((f"etcd {server.name} log ({server.endpoint})",
                                    server.log_tail(30)))


@pytest.fixture
def namespace(request) -> str:
    """A namespace no other test uses."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"t{next(_namespaces)}-{name}"


@pytest.fixture
def client(etcd):
    c = EtcdClient(etcd.endpoint)
    yield c
    c.close()


class Calls:
    """A thread-safe record of trigger calls: ``(name, time, payload)`` in arrival order."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls: list[tuple[str, float, object]] = []

    def add(self, req) -> None:
        with self._lock:
            self.calls.append((req.name, time.time(), req))

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _, _ in self.calls]

    def count(self, name: str | None = None) -> int:
        with self._lock:
            return sum(1 for n, _, _ in self.calls if name is None or n == name)

    def times(self, name: str) -> list[float]:
        with self._lock:
            return [t for n, t, _ in self.calls if n == name]

    def counts(self) -> dict[str, int]:
        result: dict[str, int] = defaultdict(int)
        with self._lock:
            for name, _, _ in self.calls:
                result[name] += 1
        return dict(result)

    def wait(self, name: str | None, count: int, timeout: float = 10.0) -> None:
        wait_until(lambda: self.count(name) >= count, timeout,
                   message=lambda: f"{count} calls of {name!r} (have {self.count(name)})")


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def make_cron(etcd, namespace):
    """Build Crons on the session etcd and this test's namespace; all are stopped at the end."""
    made: list[Cron] = []

    def make(trigger, **options) -> Cron:
        options.setdefault("endpoints", etcd.endpoint)
        options.setdefault("namespace", namespace)
        options.setdefault("lease_ttl", 5)
        cron = Cron(trigger=trigger, **options)
        made.append(cron)
        return cron

    yield make
    for cron in made:
        cron.stop(timeout=15)


@pytest.fixture
def producer(make_cron):
    """A Cron that is never started: it only adds and reads jobs."""
    return make_cron(print)


@pytest.fixture
def cron(make_cron, calls):
    """A started single replica whose trigger records into ``calls`` and succeeds."""
    c = make_cron(calls.add)
    c.start()
    assert c.wait_elected(10)
    return c


def fill_until_nospace(client: EtcdClient) -> None:
    """Write 1 MB values under ``fill/`` until etcd's NOSPACE alarm refuses them."""
    with pytest.raises(Exception, match="database space exceeded"):
        for n in range(100):
            client.put(b"fill/%d" % n, b"x" * 1_000_000)


def free_nospace(client: EtcdClient) -> None:
    """What an operator does after a NOSPACE alarm: delete, compact, defragment, disarm."""
    client.delete(b"fill/", b"fill0")
    client.compact(client.current_revision())
    client.call(client._maintenance.Defragment, rpc.DefragmentRequest(), "defragment")
    member = client.call(client._maintenance.Status, rpc.StatusRequest(), "status")
    client.call(client._maintenance.Alarm, rpc.AlarmRequest(
        action=rpc.AlarmRequest.DEACTIVATE, memberID=member.header.member_id,
        alarm=rpc.NOSPACE), "alarm")
