"""Transient etcd errors under load: "too many requests", a leader that changes, timeouts.

For each: every thread of a running replica survives and works afterwards, and a user's API call
either succeeds within its ``request_timeout`` or raises an :class:`EtcdCronError` subclass that
carries the gRPC code.

"too many requests": etcd 3.5 refuses a proposal (``ErrTooManyRequests``, RESOURCE_EXHAUSTED)
while its applied index lags the committed index by more than 5,000 entries. Committing is cheap
(a log append) and applying is where the work is, so :class:`ApplyBacklog` commits thousands of
transactions whose apply is expensive at once: each compares a key that is never there and, on
failure, counts a range of tens of thousands of keys (a read inside a transaction that can write
goes through raft and runs in the apply loop). The applier falls that far behind on one machine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from etcdcron import Cron, EtcdCronError, EtcdUnavailableError, Job
from etcdcron.keys import prefix_end
from etcdcron.testing import EtcdCluster, EtcdProxy, EtcdServer, wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

REQUEST_TIMEOUT = 2.0
SLACK = 1.0  # scheduling slack on a loaded machine, beyond the request timeout


@dataclass
class Outcome:
    op: str
    took: float
    error: BaseException | None


class UserCalls:
    """A thread calling ``add``/``get``/``delete``/``list`` over and over, timing each call."""

    def __init__(self, cron: Cron, tag: str):
        self._cron = cron
        self._tag = tag
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._thread = threading.Thread(target=self._run, name=f"user-{tag}", daemon=True)

    def __enter__(self) -> UserCalls:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            name = f"user-{self._tag}-{n % 5}"
            for op, call in (("add", lambda: self._cron.add(name, Job(due_time="1h"))),
                             ("get", lambda: self._cron.get(name)),
                             ("list", lambda: self._cron.list(f"user-{self._tag}")),
                             ("delete", lambda: self._cron.delete(name))):
                began = time.monotonic()
                error = None
                try:
                    call()
                except BaseException as exc:  # noqa: BLE001 - what escapes is the point
                    error = exc
                with self._lock:
                    self.outcomes.append(Outcome(op, time.monotonic() - began, error))
            self._stop.wait(0.05)

    def check(self) -> list[Outcome]:
        """Assert the contract on every call made; return the failed ones: each call returned
        within its request timeout (and some scheduling slack), or raised an
        :class:`EtcdCronError` carrying the gRPC code, raised from the gRPC error."""
        with self._lock:
            outcomes = list(self.outcomes)
        assert outcomes, "no call was made"
        for o in outcomes:
            assert o.took <= REQUEST_TIMEOUT + SLACK, f"{o.op} took {o.took:.2f}s: {o.error!r}"
            if o.error is None:
                continue
            assert isinstance(o.error, EtcdCronError), f"{o.op} raised {o.error!r}"
            assert isinstance(getattr(o.error, "code", None), grpc.StatusCode), \
                f"{o.op} raised {o.error!r} without a gRPC code"
            assert o.error.__cause__ is not None, f"{o.op}: {o.error!r} not raised from"
        return [o for o in outcomes if o.error is not None]


def _wait_healthy(cron: Cron, timeout: float = 30.0) -> None:
    wait_until(lambda: cron.health().ok and cron.is_elected(), timeout,
               message=lambda: f"a healthy, elected replica: {cron.health().problems}")


def _start_ticking(cron: Cron, calls, ticks: int = 1) -> None:
    """Start ``cron``, wait until it is elected and a job ``tick`` fired ``ticks`` times."""
    cron.start()
    assert cron.wait_elected(10)
    cron.add("tick", Job(schedule="@every 1s"))
    calls.wait("tick", ticks)


def _still_works(cron: Cron, calls, name: str) -> None:
    cron.add(name, Job(due_time="0s"))
    calls.wait(name, 1, timeout=20)


# -- too many requests ----------------------------------------------------------------------------


class ApplyBacklog:
    """Puts etcd's applier more than 5,000 entries behind its commits (see the module doc)."""

    def __init__(self, endpoint: str, keys: int = 40_000, proposals: int = 6_000,
                 counts: int = 1):
        self._channel = grpc.insecure_channel(endpoint)
        self._kv = rpc_grpc.KVStub(self._channel)
        self._prefix = b"backlog/"
        self._keys, self._proposals, self._counts = keys, proposals, counts
        self._futures: list = []
        self._closed = threading.Event()
        self._flooder: threading.Thread | None = None

    def fill(self) -> None:
        value = b"x" * 64
        for start in range(0, self._keys, 128):
            ops = [rpc.RequestOp(request_put=rpc.PutRequest(
                key=self._prefix + b"%08d" % i, value=value))
                for i in range(start, min(start + 128, self._keys))]
            self._kv.Txn(rpc.TxnRequest(success=ops), timeout=30)

    def flood(self, seconds: float) -> None:
        """Keep proposing for ``seconds`` (on a thread), faster than etcd applies, so that
        the gap stays at its limit and every other write is refused meanwhile."""
        never = self._prefix + b"never"
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=never, target=rpc.Compare.VALUE,
                                 result=rpc.Compare.EQUAL, value=b"never")],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=never, value=b"never"))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(
                key=self._prefix, range_end=prefix_end(self._prefix), count_only=True))]
            * self._counts)

        def propose() -> None:
            self._futures = [self._kv.Txn.future(request, timeout=120)
                             for _ in range(self._proposals)]
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self._closed.is_set():
                self._futures += [self._kv.Txn.future(request, timeout=120)
                                  for _ in range(200)]
                self._closed.wait(0.05)

        self._flooder = threading.Thread(target=propose, name="backlog-flood", daemon=True)
        self._flooder.start()

    def refuses(self) -> bool:
        """Whether etcd refuses a write with "too many requests" now."""
        try:
            self._kv.Put(rpc.PutRequest(key=self._prefix + b"probe", value=b"1"), timeout=0.5)
        except grpc.RpcError as exc:
            return "too many requests" in (exc.details() or "")
        return False

    def drained(self) -> bool:
        try:
            self._kv.Put(rpc.PutRequest(key=self._prefix + b"probe", value=b"1"), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self._closed.set()
        if self._flooder is not None:
            self._flooder.join(30)
        for future in self._futures:
            future.cancel()
        self._channel.close()


@pytest.fixture
def backlog_etcd():
    """An etcd of its own (the backlog slows everything on it) and its backlog maker."""
    with EtcdServer() as etcd:
        backlog = ApplyBacklog(etcd.endpoint)
        backlog.fill()
        yield etcd, backlog
        backlog.close()


def test_too_many_requests_under_load_every_thread_survives_and_calls_keep_the_contract(
        backlog_etcd, namespace, calls):
    etcd, backlog = backlog_etcd
    cron = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=calls.add,
                lease_ttl=30, request_timeout=REQUEST_TIMEOUT)
    try:
        _start_ticking(cron, calls, 2)
        with UserCalls(cron, "a") as user:
            wait_until(lambda: len(user.outcomes) >= 8, 10)
            backlog.flood(8.0)
            assert wait_until(backlog.refuses, 8, interval=0.05,
                              message="etcd to say 'too many requests'")
            seen = len(user.outcomes)
            wait_until(lambda: len(user.outcomes) >= seen + 4, 30,
                       message="user calls during the backlog")
            wait_until(backlog.drained, 180, interval=1.0, message="the backlog to drain")
        assert user.check(), "no user call met the backlog"
        _wait_healthy(cron, 60)
        ticks = calls.count("tick")
        calls.wait("tick", ticks + 2, timeout=15)
        _still_works(cron, calls, "after-backlog")
    finally:
        cron.stop(timeout=30)


def test_too_many_requests_is_retried_like_any_transient_error(backlog_etcd, namespace):
    """Writes refused with "too many requests" are retried until the request timeout; what
    reaches the user then is an EtcdUnavailableError, never an error raised at once."""
    etcd, backlog = backlog_etcd
    cron = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=print,
                request_timeout=REQUEST_TIMEOUT)
    try:
        backlog.flood(6.0)
        assert wait_until(backlog.refuses, 8, interval=0.05)
        failures = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                cron.add("refused", Job(due_time="1h"))
            except EtcdCronError as exc:
                failures.append((time.monotonic() - began, exc))
        assert failures, "no add() met the refusals"
        for took, exc in failures:
            assert isinstance(exc, EtcdUnavailableError), f"after {took:.2f}s: {exc!r}"
            assert took >= REQUEST_TIMEOUT - 0.3, f"gave up after {took:.2f}s: {exc!r}"
    finally:
        cron.stop()


# -- timeouts and partitions through a proxy ------------------------------------------------------


@pytest.mark.parametrize("fault", ["blackhole", "cut", "latency"])
def test_calls_through_a_failing_link_keep_the_contract_and_the_replica_recovers(
        etcd, namespace, calls, fault):
    with EtcdProxy(etcd.endpoint) as proxy:
        cron = Cron(endpoints=proxy.endpoint, namespace=namespace, trigger=calls.add,
                    lease_ttl=5, request_timeout=REQUEST_TIMEOUT)
        try:
            _start_ticking(cron, calls)
            with UserCalls(cron, "b") as user:
                wait_until(lambda: len(user.outcomes) >= 8, 10)
                if fault == "latency":
                    proxy.latency(0.4, 0.2)
                else:
                    getattr(proxy, fault)()
                seen = len(user.outcomes)
                wait_until(lambda: len(user.outcomes) >= seen + 6, 30,
                           message="user calls during the fault")
                proxy.heal()
                seen = len(user.outcomes)
                wait_until(lambda: len(user.outcomes) >= seen + 8, 30)
            failed = user.check()
            if fault != "latency":
                assert failed, "no call failed through a broken link"
            _wait_healthy(cron)
            _still_works(cron, calls, f"after-{fault}")
        finally:
            cron.stop(timeout=15)


def test_a_paged_list_is_bounded_by_its_request_timeout(etcd, namespace):
    """``list()`` reads page by page; over a slow link, all its pages together must still
    answer within the request timeout (or raise), not one timeout per page."""
    from etcdcron.testing import bulk_add

    producer = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=print)
    bulk_add(producer, {f"job-{i:05d}": Job(due_time="1h") for i in range(3500)})
    producer.stop()
    with EtcdProxy(etcd.endpoint) as proxy:
        cron = Cron(endpoints=proxy.endpoint, namespace=namespace, trigger=print,
                    request_timeout=REQUEST_TIMEOUT)
        try:
            assert len(cron.list()) == 3500
            proxy.latency(0.4)  # a page takes one round trip, > 0.8 s: four pages, > 3.2 s
            began = time.monotonic()
            try:
                cron.list()
            except EtcdCronError as exc:
                assert isinstance(exc.code, grpc.StatusCode)
            took = time.monotonic() - began
            assert took <= REQUEST_TIMEOUT + SLACK, f"list() took {took:.1f}s"
        finally:
            cron.stop()


def test_a_call_through_a_cut_link_keeps_retrying_until_its_request_timeout(etcd, namespace):
    with EtcdProxy(etcd.endpoint) as proxy:
        cron = Cron(endpoints=proxy.endpoint, namespace=namespace, trigger=print,
                    request_timeout=REQUEST_TIMEOUT)
        try:
            cron.get("warm-up")
            proxy.cut()
            for _ in range(12):
                began = time.monotonic()
                with pytest.raises(EtcdUnavailableError):
                    cron.get("cut-off")
                took = time.monotonic() - began
                assert took >= REQUEST_TIMEOUT - 0.3, f"gave up after {took:.2f}s"
        finally:
            cron.stop()


# -- the leader changes under load ----------------------------------------------------------------


@pytest.mark.cluster
def test_leader_kills_under_load_every_thread_survives_and_calls_keep_the_contract(
        namespace, calls):
    with EtcdCluster(3) as cluster:
        cron = Cron(endpoints=cluster.endpoints, namespace=namespace, trigger=calls.add,
                    lease_ttl=10, request_timeout=REQUEST_TIMEOUT)
        try:
            cron.start()
            assert cron.wait_elected(10)
            for i in range(20):
                cron.add(f"tick-{i}", Job(schedule="@every 1s"))
            calls.wait("tick-0", 2)
            with UserCalls(cron, "c") as user, UserCalls(cron, "d") as other:
                for _ in range(2):
                    leader = cluster.leader()
                    leader.kill()
                    seen = len(user.outcomes)
                    wait_until(lambda: len(user.outcomes) >= seen + 8, 30,
                               message="user calls after the leader was killed")
                    leader.start()
                    wait_until(lambda: len(user.outcomes) >= seen + 16, 30)
            user.check()
            other.check()
            _wait_healthy(cron)
            ticks = calls.count("tick-0")
            calls.wait("tick-0", ticks + 2, timeout=15)
            _still_works(cron, calls, "after-leader-kills")
        finally:
            cron.stop(timeout=15)
