"""The fault-injecting TCP proxy of ``etcdcron.testing``: first on plain TCP, then under etcd
clients and Cron replicas."""

from __future__ import annotations

import select
import socket
import threading
import time

import grpc
import pytest

from etcdcron import Cron, EtcdError, EtcdUnavailableError, Job
from etcdcron._etcd import EtcdClient
from etcdcron.keys import prefix_end
from etcdcron.testing import EtcdCluster, EtcdProxy, EtcdServer, wait_until
from tests.conftest import Calls
from tests.test_security import pki  # noqa: F401  (a fixture)


def _proxy_threads(proxy: EtcdProxy) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"etcdcron-proxy-{proxy.port}"]


# -- plain TCP: a real echo server behind the proxy ----------------------------------------------


class EchoServer:
    """A TCP server on 127.0.0.1 that sends back what it receives, one thread per connection.

    ``received`` counts the bytes it got; ``ended`` counts connections that ended (reset or
    closed) from the other side.
    """

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        # Guards received, ended and _conns.
        self._lock = threading.Lock()
        self.received = 0
        self.ended = 0
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                with self._lock:
                    self.received += len(data)
                conn.sendall(data)
        except OSError:
            pass
        with self._lock:
            self.ended += 1
        conn.close()

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way (Linux)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def echo_proxy(echo):
    with EtcdProxy(echo.endpoint) as proxy:
        yield proxy


def _connect(proxy: EtcdProxy, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    parts, have = [], 0
    while have < size:
        data = sock.recv(min(65536, size - have))
        if not data:
            raise EOFError(f"connection ended after {have} of {size} bytes")
        parts.append(data)
        have += len(data)
    return b"".join(parts)


def _is_broken(sock: socket.socket) -> bool:
    """Whether the connection was reset or closed by the other side (waits up to its timeout)."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _refused(proxy: EtcdProxy) -> bool:
    """Whether a new connection to ``proxy`` is reset or closed at once."""
    try:
        sock = _connect(proxy)
    except ConnectionError:  # the reset came while connect() returned
        return True
    with sock:
        return _is_broken(sock)


def test_bytes_pass_both_ways_in_order_under_jittered_latency(echo_proxy):
    echo_proxy.latency(0.005, jitter=0.02)  # jitter must not reorder bytes
    payload = b"".join(i.to_bytes(4, "big") for i in range(256 * 1024))  # 1 MiB
    with _connect(echo_proxy) as sock:
        writer = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        writer.start()
        assert _read_exactly(sock, len(payload)) == payload
        writer.join(10)


def test_half_close_is_passed_on_after_the_bytes_before_it(echo_proxy):
    with _connect(echo_proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert _read_exactly(sock, 10) == b"last words"
        assert sock.recv(1) == b""  # the echo server saw our end and ended too
    wait_until(lambda: echo_proxy.connections == 0, 10, message="the link to close")


def test_cut_resets_both_sides_and_refuses_until_heal(echo, echo_proxy):
    with _connect(echo_proxy) as sock:
        sock.sendall(b"hello")
        assert _read_exactly(sock, 5) == b"hello"
        echo_proxy.cut()
        assert echo_proxy.connections == 0
        assert _is_broken(sock)
    wait_until(lambda: echo.ended == 1, 10, message="the target to see its connection end")

    assert _refused(echo_proxy)  # accepted, then reset at once

    echo_proxy.heal()
    with _connect(echo_proxy) as sock:
        sock.sendall(b"again")
        assert _read_exactly(sock, 5) == b"again"


def test_blackhole_holds_bytes_silently_and_delivers_them_on_heal(echo, echo_proxy):
    with _connect(echo_proxy) as sock:
        sock.sendall(b"before")
        assert _read_exactly(sock, 6) == b"before"
        echo_proxy.blackhole()
        sock.sendall(b"during")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):  # no answer, and no error either
            sock.recv(1)
        assert echo.received == 6  # nothing reached the target
        assert echo_proxy.connections == 1

        with _connect(echo_proxy) as second:  # new connections are accepted and held too
            second.sendall(b"x")
            wait_until(lambda: echo_proxy.connections == 2, 10, message="the second link")
            second.settimeout(0.2)
            with pytest.raises(socket.timeout):
                second.recv(1)

        echo_proxy.heal()
        sock.settimeout(10)
        assert _read_exactly(sock, 6) == b"during"  # what was held goes on, in order


def test_a_blackholed_connection_holds_a_bounded_amount(echo):
    with EtcdProxy(echo.endpoint, buffer_size=64 * 1024) as proxy, _connect(proxy) as sock:
        proxy.blackhole()
        sock.setblocking(False)
        chunk = b"\0" * 65536
        sent, limit = 0, 128 * 1024 * 1024
        while sent < limit:  # the kernel's buffers fill, then the proxy's; then nothing drains
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], 1.0)
                if not writable:
                    break
        assert sent < limit, "the proxy kept reading while it could forward nothing"
        assert echo.received == 0


def test_close_while_blackholed_is_prompt_and_stops_the_thread(echo):
    proxy = EtcdProxy(echo.endpoint).start()
    assert _proxy_threads(proxy)
    with _connect(proxy) as sock:
        sock.sendall(b"hello")
        assert _read_exactly(sock, 5) == b"hello"
        proxy.blackhole()  # the loop now waits for nothing but a command
        started = time.monotonic()
        proxy.close()
        assert time.monotonic() - started < 5
        assert not _proxy_threads(proxy)
        assert _is_broken(sock)
    with pytest.raises(RuntimeError, match="closed"):
        proxy.heal()
    proxy.close()  # idempotent


def test_commands_are_checked():
    proxy = EtcdProxy("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="seconds must be a number >= 0, not -1"):
            proxy.latency(-1)
        with pytest.raises(ValueError, match="jitter must be a number >= 0, not 'x'"):
            proxy.latency(0.1, jitter="x")
        with pytest.raises(ValueError, match="not host:port"):
            EtcdProxy("nowhere")
    finally:
        proxy.close()


def test_a_refusing_target_makes_the_proxy_refuse():
    with EtcdProxy(f"127.0.0.1:{_closed_port()}") as proxy:
        assert _refused(proxy)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens on it once closed


# -- etcd clients through the proxy --------------------------------------------------------------


@pytest.fixture
def proxy(etcd):
    with EtcdProxy(etcd.endpoint) as p:
        yield p


@pytest.fixture
def proxied_client(proxy):
    client = EtcdClient(proxy.endpoint, request_timeout=2)
    yield client
    client.close()


@pytest.mark.etcd
def test_crud_through_the_proxy(proxy, make_cron):
    cron = make_cron(print, endpoints=proxy.endpoint)
    cron.add("a", Job(schedule="@every 1h"))
    cron.add("b", Job(due_time="1h"))
    assert cron.get("a").schedule == "@every 1h"
    assert [j.name for j in cron.list()] == ["a", "b"]
    cron.delete("a")
    assert [j.name for j in cron.list()] == ["b"]
    assert proxy.accepted >= 1


@pytest.mark.etcd
def test_cut_makes_calls_fail_and_heal_makes_them_work(proxy, proxied_client):
    proxied_client.put(b"proxy/cut", b"1")
    proxy.cut()
    with pytest.raises(EtcdUnavailableError) as caught:
        proxied_client.get(b"proxy/cut")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    proxy.heal()
    value = wait_until(lambda: _get_or_none(proxied_client, b"proxy/cut"), 20,
                       message="a read through the healed proxy")
    assert value == b"1"


def _get_or_none(client: EtcdClient, key: bytes) -> bytes | None:
    try:
        kv = client.get(key)
    except EtcdUnavailableError:
        return None
    return kv.value if kv else b"(missing)"


@pytest.mark.etcd
def test_blackhole_makes_a_call_time_out_and_heal_recovers(proxy, proxied_client):
    proxied_client.put(b"proxy/blackhole", b"1")
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(EtcdUnavailableError) as caught:
        proxied_client.get(b"proxy/blackhole")
    assert time.monotonic() - started >= 1.5  # it waited for its deadline, did not fail fast
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    proxy.heal()
    value = wait_until(lambda: _get_or_none(proxied_client, b"proxy/blackhole"), 30,
                       message="a read through the healed proxy")
    assert value == b"1"


@pytest.mark.etcd
def test_latency_slows_every_round_trip(proxy, proxied_client):
    proxied_client.put(b"proxy/latency", b"1")  # the connection is up
    proxy.latency(0.3)
    for _ in range(3):
        started = time.monotonic()
        assert proxied_client.get(b"proxy/latency").value == b"1"
        assert time.monotonic() - started >= 0.6  # 0.3 s each way, at least
    proxy.heal()
    assert proxied_client.get(b"proxy/latency").value == b"1"


@pytest.mark.etcd
def test_a_watch_stream_survives_latency(etcd, proxy, proxied_client, client, namespace):
    prefix = f"{namespace}/".encode()
    stream = proxied_client.watch(prefix, prefix_end(prefix), client.current_revision() + 1)
    events: list[bytes] = []
    reader = threading.Thread(target=lambda: [events.extend(e.kv.key for e in batch)
                                              for batch in stream], daemon=True)
    reader.start()
    try:
        client.put(prefix + b"k000", b"")
        wait_until(lambda: events, 10, message="the watch to deliver")
        accepted = proxy.accepted
        proxy.latency(0.2, jitter=0.1)
        keys = [prefix + f"k{i:03d}".encode() for i in range(1, 30)]
        for key in keys:
            client.put(key, b"")
        wait_until(lambda: len(events) == 30, 20, message=lambda: f"30 events (have {len(events)})")
        assert events == [prefix + b"k000", *keys]
        assert proxy.accepted == accepted  # the same stream, never reconnected
    finally:
        stream.cancel()
        reader.join(10)


@pytest.mark.etcd
def test_close_while_a_client_is_blackholed_is_prompt(etcd):
    proxy = EtcdProxy(etcd.endpoint).start()
    client = EtcdClient(proxy.endpoint, request_timeout=5)
    outcome: list = []
    stuck = threading.Thread(target=_call_into, args=(outcome, client.get, b"proxy/close"),
                             daemon=True)
    try:
        client.put(b"proxy/close", b"1")
        proxy.blackhole()
        stuck.start()  # a call in flight on the silent connection
        started = time.monotonic()
        proxy.close()
        assert time.monotonic() - started < 5
        assert not _proxy_threads(proxy)
        stuck.join(20)
        assert isinstance(outcome[0], EtcdUnavailableError)  # reconnects now find nobody
    finally:
        proxy.close()
        stuck.join(20)
        client.close()


def _call_into(outcome: list, function, *args) -> None:
    try:
        outcome.append(function(*args))
    except EtcdError as exc:
        outcome.append(exc)


@pytest.mark.etcd
@pytest.mark.slow
def test_tls_passes_through(pki):  # noqa: F811
    ca, key, cert = str(pki / "ca.pem"), str(pki / "client.key"), str(pki / "client.pem")
    with EtcdServer(tls=(str(pki / "server.pem"), str(pki / "server.key"), ca)) as etcd:
        proxy = etcd.proxy()
        client = EtcdClient(f"https://{proxy.endpoint}", ca_cert=ca, cert_key=key, cert_cert=cert,
                            request_timeout=5)
        try:
            client.put(b"proxy/tls", b"secret")
            assert client.get(b"proxy/tls").value == b"secret"
        finally:
            client.close()
    assert not _proxy_threads(proxy)  # closed with its server


# -- Cron replicas behind proxies ----------------------------------------------------------------

LEASE_TTL = 3


def _spread_jobs(cron: Cron, count: int = 12) -> list[str]:
    names = [f"job-{i:02d}" for i in range(count)]  # random partition ids: both replicas get some
    for name in names:
        cron.add(name, Job(schedule="@every 500ms"))
    return names


@pytest.mark.etcd
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_a_partitioned_replica_loses_its_jobs_to_the_other_and_rejoins(make_cron, proxy, fault):
    behind, direct = Calls(), Calls()
    a = make_cron(behind.add, endpoints=proxy.endpoint, lease_ttl=LEASE_TTL, replica_id="a",
                  request_timeout=2)
    b = make_cron(direct.add, lease_ttl=LEASE_TTL, replica_id="b")
    a.start()
    b.start()
    names = _spread_jobs(b)
    wait_until(lambda: a.is_elected() and b.is_elected() and behind.count() and direct.count(),
               30, message="both replicas elected and triggering")

    getattr(proxy, fault)()
    started = time.monotonic()
    wait_until(lambda: not a.is_elected(), LEASE_TTL + 10, message="a to lose its election")
    lost_after = time.monotonic() - started
    assert lost_after < LEASE_TTL + 2, f"a held on for {lost_after:.1f}s with a {LEASE_TTL}s lease"

    wait_until(b.is_elected, 30, message="b to be elected alone")
    seen = direct.counts()
    wait_until(lambda: all(direct.count(n) > seen.get(n, 0) for n in names), 30,
               message="b to trigger every job")
    quiet = behind.count()
    assert not a.is_elected()
    assert behind.count() == quiet  # a triggers nothing while cut off

    proxy.heal()
    wait_until(lambda: a.is_elected() and b.is_elected(), 60, message="a to rejoin")
    wait_until(lambda: behind.count() > quiet, 30, message="a to trigger again")


@pytest.mark.etcd
@pytest.mark.slow
def test_a_replica_behind_a_slow_link_keeps_its_lease_and_triggers(make_cron, proxy, calls):
    proxy.latency(0.3, jitter=0.1)
    cron = make_cron(calls.add, endpoints=proxy.endpoint, lease_ttl=LEASE_TTL)
    cron.start()
    assert cron.wait_elected(30)
    cron.add("tick", Job(schedule="@every 500ms"))
    calls.wait("tick", 2, timeout=20)
    # It holds its lease for two lease periods through the slow keepalive stream.
    assert _stays(cron.is_elected, 2 * LEASE_TTL)
    assert calls.count("tick") >= 4


def _stays(predicate, seconds: float) -> bool:
    """Whether ``predicate`` holds at every poll for ``seconds``."""
    deadline = time.monotonic() + seconds
    wait_until(lambda: not predicate() or time.monotonic() >= deadline, seconds + 30)
    return bool(predicate())


# -- a cluster behind a proxy group --------------------------------------------------------------


@pytest.mark.etcd
@pytest.mark.slow
def test_a_proxy_group_partitions_a_client_from_one_member_or_all():
    with EtcdCluster(3) as cluster:
        group = cluster.proxies()
        assert len(group) == 3 and group.endpoints == [p.endpoint for p in group]
        client = EtcdClient(group.endpoints, request_timeout=3)
        direct = EtcdClient(cluster.endpoints, request_timeout=10)
        try:
            client.put(b"group/k", b"1")
            group[0].cut()  # one member unreachable: the channel uses another one
            group[1].cut()
            assert wait_until(lambda: _get_or_none(client, b"group/k"), 30,
                              message="a read through the third member") == b"1"

            group.cut()  # all of etcd unreachable for this client
            with pytest.raises(EtcdUnavailableError):
                client.get(b"group/k")
            direct.put(b"group/k", b"2")  # the cluster itself is fine: peers talk directly

            group.heal()
            assert wait_until(lambda: _get_or_none(client, b"group/k") == b"2", 30,
                              message="a read after heal")
        finally:
            client.close()
            direct.close()
    assert not any(_proxy_threads(p) for p in group)  # closed with the cluster
