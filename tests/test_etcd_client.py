"""The etcd access layer against real etcd: large listings, watch restarts, failover between
members, at-most-once writes, keepalive settings; and the pure parts (page sizes) alone."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2, rpc_pb2_grpc
from google.protobuf import any_pb2, wrappers_pb2

from etcdcron import Cron, EtcdError, Job
from etcdcron import _connection
from etcdcron._etcd import EtcdClient, PageSizer
from etcdcron.keys import Keys, prefix_end
from etcdcron.testing import EtcdCluster, EtcdProxy, EtcdServer, free_port, wait_until


def happens_within(predicate, seconds: float) -> bool:
    """Whether ``predicate`` becomes true within ``seconds`` (polled); for "nothing happens"."""
    try:
        wait_until(predicate, seconds, interval=0.05)
    except TimeoutError:
        return False
    return True


# -- page sizes (pure) ----------------------------------------------------------------------------


@pytest.mark.unit
def test_pages_of_small_records_grow_to_the_key_limit():
    pages = PageSizer(8 << 20, first=100, max_keys=50_000, growth=8)
    limits = []
    for _ in range(6):
        limits.append(pages.limit)
        pages.observe(pages.limit, pages.limit * 150)  # 150 bytes a key
    assert limits == [100, 800, 6400, 50_000, 50_000, 50_000]


@pytest.mark.unit
def test_pages_of_large_records_are_bounded_by_bytes():
    pages = PageSizer(8 << 20, first=100)
    pages.observe(100, 100 * 950_000)  # 950 KB records
    assert pages.limit == 8
    pages.observe(8, 8 * 950_000)
    assert pages.limit == 8


@pytest.mark.unit
def test_a_page_too_large_for_the_receive_limit_shrinks_until_one_key_is_left():
    pages = PageSizer(1 << 20, first=100)
    assert pages.too_large(100 * 400_000, 2 << 20)  # 40 MB against 2 MiB
    assert pages.limit == 4
    assert pages.too_large(0, 2 << 20)  # size unknown: a fifth of it, and at least one less
    assert pages.limit == 1
    assert not pages.too_large(3 << 20, 2 << 20)  # one key is too large: give up


# -- large records and a small receive limit ------------------------------------------------------


@pytest.fixture
def small_receive_limit(monkeypatch):
    """Channels opened from now on accept messages of at most 2 MiB."""
    monkeypatch.setattr(_connection, "MAX_RECEIVE_BYTES", 2 << 20)
    return 2 << 20


def big(i: int, size: int = 400_000) -> bytes:
    return bytes([65 + i % 26]) * size


@pytest.mark.etcd
def test_a_listing_of_records_larger_than_the_receive_limit_succeeds(own_etcd,
                                                                     small_receive_limit):
    client = EtcdClient(own_etcd.endpoint)
    try:
        for i in range(12):  # 4.8 MB in all: no page of the old fixed 1,000 keys fits
            client.put(b"big/%02d" % i, big(i))
        revision, kvs = client.list_prefix(b"big/")
        assert [kv.key for kv in kvs] == [b"big/%02d" % i for i in range(12)]
        assert all(kv.value == big(i) for i, kv in enumerate(kvs))

        client.put(b"huge/one", b"x" * 1_400_000)
        client.put(b"huge/two", b"y" * 1_400_000)
        assert len(client.list_prefix(b"huge/")[1]) == 2  # one key a page

        # a watch replaying all of it from before arrives in fragments, put together again
        stream = client.watch(b"big/", prefix_end(b"big/"), revision - 11)
        events = next(iter(stream))
        stream.cancel()
        assert [e.kv.key for e in events] == [b"big/%02d" % i for i in range(12)]
    finally:
        client.close()


def ranges_started(server: EtcdServer) -> int:
    """How many Range calls etcd has begun (its own metric)."""
    import urllib.request
    with urllib.request.urlopen(f"http://{server.endpoint}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("grpc_server_started_total") and 'grpc_method="Range"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("etcd reports no Range metric")


@pytest.mark.etcd
def test_the_next_page_of_a_listing_is_requested_while_the_caller_reads_this_one(own_etcd):
    client = EtcdClient(own_etcd.endpoint)
    try:
        for i in range(30):
            client.put(b"ahead/%02d" % i, b"v%d" % i)
        began = ranges_started(own_etcd)
        pages = client.iter_prefix(b"ahead/", page_size=10)
        _, first = next(pages)
        # The caller holds the first page and asks for nothing: etcd is asked for the next.
        wait_until(lambda: ranges_started(own_etcd) == began + 2, 10)
        rest = [kv for _, page in pages for kv in page]
        assert [kv.key for kv in first + rest] == [b"ahead/%02d" % i for i in range(30)]
        assert [kv.value for kv in first + rest] == [b"v%d" % i for i in range(30)]

        # A listing given up early leaves no request behind it.
        pages = client.iter_prefix(b"ahead/", page_size=10)
        next(pages)
        pages.close()
        assert client.list_prefix(b"ahead/")[1][-1].key == b"ahead/29"
    finally:
        client.close()


@pytest.mark.etcd
def test_a_page_requested_ahead_that_fails_is_read_again(own_etcd):
    proxy = EtcdProxy(own_etcd.endpoint).start()
    client = EtcdClient(proxy.endpoint, request_timeout=30)
    try:
        for i in range(30):
            client.put(b"again/%02d" % i, b"v%d" % i)
        proxy.latency(0.5)  # each way: the request sent ahead is still on its way when cut
        pages = client.iter_prefix(b"again/", page_size=10)
        _, first = next(pages)
        proxy.cut()  # the request sent ahead fails with the connection
        proxy.heal()
        rest = [kv for _, page in pages for kv in page]
        assert [kv.key for kv in first + rest] == [b"again/%02d" % i for i in range(30)]
    finally:
        client.close()
        proxy.close()


@pytest.mark.etcd
def test_a_single_key_over_the_receive_limit_is_a_clear_error(own_etcd, monkeypatch):
    monkeypatch.setattr(_connection, "MAX_RECEIVE_BYTES", 1 << 20)
    client = EtcdClient(own_etcd.endpoint)
    try:
        client.put(b"p/a", b"small")
        client.put(b"p/b", b"z" * 1_200_000)
        with pytest.raises(EtcdError, match="larger than this client's receive limit"):
            client.list_prefix(b"p/")
    finally:
        client.close()


@pytest.mark.etcd
@pytest.mark.slow
def test_a_replica_loads_and_fires_jobs_too_large_for_one_page(own_etcd, small_receive_limit,
                                                               namespace, calls):
    cron = Cron(endpoints=own_etcd.endpoint, namespace=namespace, trigger=calls.add, lease_ttl=5)
    try:
        for i in range(12):
            payload = any_pb2.Any()
            payload.Pack(wrappers_pb2.BytesValue(value=big(i)))
            cron.add(f"big-{i:02d}", Job(due_time="0s", payload=payload))
        assert len(cron.list()) == 12
        cron.start()
        wait_until(lambda: calls.count() >= 12, 30, message="12 large jobs to fire")
        assert sorted(calls.names()) == [f"big-{i:02d}" for i in range(12)]
    finally:
        cron.stop()


# -- streams --------------------------------------------------------------------------------------


@pytest.mark.etcd
@pytest.mark.slow
def test_watch_reconnects_leak_no_threads(own_etcd):
    client = EtcdClient(own_etcd.endpoint, request_timeout=30)
    seen: list[bytes] = []
    stream = client.watch(b"w/", prefix_end(b"w/"), client.put(b"w/start", b"-").header.revision)
    reader = threading.Thread(target=lambda: [seen.extend(e.kv.value for e in events)
                                              for events in stream], daemon=True)
    reader.start()
    try:
        wait_until(lambda: b"-" in seen, 10)
        before = threading.active_count()
        for i in range(5):
            own_etcd.restart()
            client.put(b"w/key", b"%d" % i)
            wait_until(lambda: b"%d" % i in seen, 20, message=f"event {i} after restart {i}")
        # each broken stream used to leave gRPC's request-feeding thread behind (2 a restart)
        assert threading.active_count() <= before + 1
    finally:
        stream.cancel()
        reader.join(10)
        client.close()


@pytest.mark.etcd
@pytest.mark.slow
def test_keepalive_pings_fit_etcds_enforcement(monkeypatch, capfd):
    """etcd answers pings on a connection without streams, or more often than its minimum, with
    GOAWAY too_many_pings: an idle connection, and a quiet watch, must outlive several pings."""
    monkeypatch.setattr(_connection, "KEEPALIVE_TIME_MS", 1000)  # fast, within the server's 500 ms
    with EtcdServer(extra_args=["--grpc-keepalive-min-time=500ms"]) as etcd:
        client = EtcdClient(etcd.endpoint)
        try:
            client.get(b"x")
            channel = client.channel
            changes: list = []
            channel.subscribe(lambda state: changes.append(state))
            wait_until(lambda: changes, 5)  # the subscription reports the current state first
            assert changes == [grpc.ChannelConnectivity.READY]

            # idle: no call, no stream, for five keepalive periods
            assert not happens_within(lambda: len(changes) > 1, 5.0), changes

            # a quiet watch, for five keepalive periods: pings go, and etcd accepts them
            stream = client.watch(b"q", b"", client.current_revision() + 1)
            events: list = []
            reader = threading.Thread(target=lambda: [events.extend(e) for e in stream],
                                      daemon=True)
            reader.start()
            wait_until(lambda: stream._call is not None, 5)
            call = stream._call
            assert not happens_within(lambda: len(changes) > 1, 5.0), changes
            client.put(b"q", b"1")
            wait_until(lambda: events, 5)
            assert stream._call is call  # never reconnected
            stream.cancel()
            reader.join(5)
        finally:
            client.close()
    assert "too_many_pings" not in capfd.readouterr().err


# -- failover between members ---------------------------------------------------------------------


@pytest.mark.unit
def test_each_member_has_a_channel_to_its_own_host_name():
    client = EtcdClient(["localhost:1", "127.0.0.1:2", "[::1]:3"])
    try:
        conn = client._conn
        assert [e.target for e in conn.spec.endpoints] == ["localhost:1", "127.0.0.1:2",
                                                            "[::1]:3"]
        first = conn.link()
        assert first.endpoint.target == "localhost:1"  # resolved by gRPC, not here
        error = grpc.RpcError()
        error.code = lambda: grpc.StatusCode.UNAVAILABLE
        error.details = lambda: "test"
        conn.failed(first, error, 2.0)
        assert first.retired and client.endpoint.target == "127.0.0.1:2"
        conn.failed(conn.link(), error, 2.0)
        conn.failed(conn.link(), error, 2.0)
        again = conn.link()
        assert again.endpoint.target == "localhost:1" and again is not first  # a new channel
    finally:
        client.close()


def _cut_off_member() -> EtcdServer:
    """An etcd member whose two peers are unreachable: it accepts connections and, having no
    leader, answers UNAVAILABLE (or nothing) to every request, as an isolated member does."""
    own = free_port()
    peers = ",".join(f"m{i}=http://127.0.0.1:{free_port()}" for i in (1, 2))
    member = EtcdServer(name="m0", peer_port=own,
                        initial_cluster=f"m0=http://127.0.0.1:{own},{peers}")
    member.start(wait=False)

    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", member.client_port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(accepts, 30, message="the cut-off member to listen")
    return member


@pytest.mark.etcd
@pytest.mark.slow
def test_a_member_without_a_leader_is_left_for_a_healthy_one(etcd, namespace, calls):
    cut_off = _cut_off_member()
    try:
        endpoints = [cut_off.endpoint, etcd.endpoint]
        cron = Cron(endpoints=endpoints, namespace=namespace, trigger=calls.add, lease_ttl=5,
                    request_timeout=5)
        try:
            start = time.monotonic()
            cron.add("first", Job(due_time="0s"))
            assert time.monotonic() - start < 3
            assert cron._client.endpoint.target == etcd.endpoint
            cron.start()
            assert cron.wait_elected(15)
            calls.wait("first", 1)
        finally:
            cron.stop()
    finally:
        cut_off.close()


@pytest.mark.etcd
@pytest.mark.cluster
@pytest.mark.slow
def test_a_frozen_member_is_left_by_calls_and_streams(namespace, calls):
    with EtcdCluster(3) as cluster:
        frozen = cluster.members[0]
        cron = Cron(endpoints=cluster.endpoints, namespace=namespace, trigger=calls.add,
                    lease_ttl=10)
        try:
            cron.start()
            assert cron.wait_elected(20)
            cron.add("every", Job(schedule="@every 300ms"))
            calls.wait("every", 3)
            assert cron._client.endpoint.target == frozen.endpoint

            frozen.pause()  # its connections stay open; it answers nothing
            start = time.monotonic()
            cron.add("after", Job(due_time="0s"))
            assert time.monotonic() - start < 9
            assert cron._client.endpoint.target != frozen.endpoint
            calls.wait("after", 1, timeout=30)
            fired = calls.count("every")
            calls.wait("every", fired + 5, timeout=30)
        finally:
            frozen.resume()
            cron.stop(timeout=15)


# -- writes that must not happen twice ------------------------------------------------------------


class LostAnswer(grpc.RpcError, grpc.Call, grpc.Future):
    """What a call returns when its connection broke after etcd applied the request."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the connection broke before the answer came (test)"

    def result(self, timeout=None):
        raise self

    def exception(self, timeout=None):
        return self

    def traceback(self, timeout=None):
        return None

    def add_done_callback(self, fn):
        fn(self)

    def done(self):
        return True

    def running(self):
        return False

    def cancelled(self):
        return False

    def cancel(self):
        return False

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def add_callback(self, callback):
        return False

    def initial_metadata(self):
        return None

    def trailing_metadata(self):
        return None


class LoseAnswer(grpc.UnaryUnaryClientInterceptor):
    """Lets the first transaction that puts ``key`` reach etcd, then, once ``until()`` holds,
    drops its answer as a broken connection would."""

    def __init__(self, key: bytes, until):
        self.key = key
        self.until = until
        self.dropped = 0

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        puts = isinstance(request, rpc_pb2.TxnRequest) and any(
            op.request_put.key == self.key for op in request.success)
        if puts and not self.dropped:
            outcome.result()  # applied
            self.dropped += 1
            wait_until(self.until, 20, message="the job to fire and be deleted")
            return LostAnswer()
        return outcome


class LostAnswerSetup:
    """A running replica and a producer on ``own_etcd``, every channel opened through
    :class:`LoseAnswer`; ``exists(key)`` reads etcd around them."""

    def __init__(self, etcd: EtcdServer, namespace: str, calls, monkeypatch):
        self.keys = Keys(namespace)
        self._raw = grpc.insecure_channel(etcd.endpoint)
        self.loser = None
        opened = _connection.open_channel
        monkeypatch.setattr(_connection, "open_channel",
                            lambda *a: grpc.intercept_channel(opened(*a), self.loser))
        self.replica = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=calls.add,
                            lease_ttl=5)
        self.producer = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=print)

    def exists(self, key: bytes) -> bool:
        return bool(rpc_pb2_grpc.KVStub(self._raw).Range(rpc_pb2.RangeRequest(key=key)).kvs)

    def start(self, key: bytes, until) -> None:
        self.loser = LoseAnswer(key, until)
        self.replica.start()
        assert self.replica.wait_elected(10)

    def close(self) -> None:
        self.producer.stop()
        self.replica.stop()
        self._raw.close()


@pytest.fixture
def lost_answer(own_etcd, namespace, calls, monkeypatch):
    setup = LostAnswerSetup(own_etcd, namespace, calls, monkeypatch)
    yield setup
    setup.close()


@pytest.mark.etcd
@pytest.mark.slow
@pytest.mark.parametrize("method", ["add", "add_if_not_exists"])
def test_an_add_whose_answer_was_lost_is_not_applied_again(lost_answer, calls, method):
    key = lost_answer.keys.job("once")
    lost_answer.start(key, lambda: calls.count("once") >= 1 and not lost_answer.exists(key))
    getattr(lost_answer.producer, method)("once", Job(due_time="0s"))
    assert lost_answer.loser.dropped == 1
    # a second trigger would come within moments of a second write
    assert not happens_within(lambda: calls.count("once") > 1, 2.0)
    assert lost_answer.producer.get("once") is None


@pytest.mark.etcd
@pytest.mark.slow
def test_a_scheduled_job_whose_add_answer_was_lost_keeps_its_counter(lost_answer, calls):
    lost_answer.start(lost_answer.keys.job("tick"), lambda: calls.count("tick") >= 1
                      and lost_answer.exists(lost_answer.keys.counter("tick")))
    lost_answer.producer.add("tick", Job(schedule="@every 1s", repeats=2))
    assert lost_answer.loser.dropped == 1
    wait_until(lambda: lost_answer.producer.get("tick") is None, 15, message="both ticks")
    assert not happens_within(lambda: calls.count("tick") > 2, 1.5)
    assert calls.count("tick") == 2  # a second write would have started it afresh: 3
