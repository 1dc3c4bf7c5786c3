"""etcdcron's own etcd access layer: one gRPC channel, retries, paginated ranges, watches, leases.

The generated etcd stubs come from the ``etcd3`` package (``python3-etcd3``); everything else is
here, because no Python etcd client survives a broken stream or a restarting server as shipped
(see ``DESIGN.md`` section 8).

Thread safety: an :class:`EtcdClient` is shared by every thread of a :class:`~etcdcron.Cron`
(gRPC channels are thread-safe). A :class:`WatchStream` or :class:`KeepAliveStream` is read by
one thread; ``cancel()`` may be called from any thread.

Retries: unary calls are retried on transient failures (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
etcd's "too many requests", an expired auth token) with capped exponential backoff and full
jitter, until the call's deadline passes or its stop event is set.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Callable

import grpc
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from etcdcron.errors import EtcdError, EtcdUnavailableError
from etcdcron.keys import prefix_end

__all__ = [
    "EtcdClient",
    "Compacted",
    "Stopped",
    "WatchStream",
    "KeepAliveStream",
    "Backoff",
    "cmp_mod",
    "cmp_create",
    "op_put",
    "op_delete",
    "op_range",
    "op_txn",
]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 1000

_CHANNEL_OPTIONS = [
    # Reconnect quickly after etcd comes back (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a frozen or unreachable server on an idle stream; etcd allows pings every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A watch replay after a long outage can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


class Stopped(Exception):
    """The stop event of a call was set while it waited to retry."""


class Compacted(Exception):
    """A watch asked for a revision etcd has already compacted away."""

    def __init__(self, compact_revision: int):
        super().__init__(f"revision compacted; oldest available is {compact_revision}")
        self.compact_revision = compact_revision


# -- building requests ----------------------------------------------------------------------------

def cmp_mod(key: bytes, revision: int) -> rpc.Compare:
    """Whether a key's mod revision is ``revision`` (0 for a missing key)."""
    return rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                       mod_revision=revision)


def cmp_create(key: bytes, revision: int) -> rpc.Compare:
    """Whether a key's create revision is ``revision`` (0 for a missing key)."""
    return rpc.Compare(key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL,
                       create_revision=revision)


def op_put(key: bytes, value: bytes, lease: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes, range_end: bytes = b"") -> rpc.RequestOp:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=range_end))


def op_range(key: bytes, range_end: bytes = b"") -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end))


def op_txn(
    compare: Sequence[rpc.Compare],
    success: Sequence[rpc.RequestOp],
    failure: Sequence[rpc.RequestOp] = (),
) -> rpc.RequestOp:
    """A transaction nested in another one (etcd >= 3.3)."""
    return rpc.RequestOp(
        request_txn=rpc.TxnRequest(compare=compare, success=success, failure=failure)
    )


# -- retries --------------------------------------------------------------------------------------


class Backoff:
    """Capped exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**n))``."""

    def __init__(self, base: float = 0.05, cap: float = 2.0):
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * (2**self.failures)))
        self.failures = min(self.failures + 1, 30)
        return delay

    def reset(self) -> None:
        self.failures = 0


_TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def is_transient(exc: grpc.RpcError) -> bool:
    """Whether retrying the same request may succeed."""
    code = exc.code()
    if code in _TRANSIENT_CODES:
        return True
    details = exc.details() or ""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in details


def is_token_error(exc: grpc.RpcError) -> bool:
    details = exc.details() or ""
    return exc.code() == grpc.StatusCode.UNAUTHENTICATED and "auth token" in details


def wrap_rpc_error(exc: grpc.RpcError, what: str) -> EtcdError:
    """An :class:`EtcdError` describing ``exc``; raise it ``from exc``."""
    code, details = exc.code(), exc.details() or ""
    cls = EtcdUnavailableError if is_transient(exc) else EtcdError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"etcd {what} failed: {name}: {details}", code=code, details=details)


# -- endpoints ------------------------------------------------------------------------------------


def _split_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of ``host:port``, ``http://host:port`` or ``https://host:port``."""
    text = endpoint.strip()
    tls = False
    for scheme, secure in (("https://", True), ("http://", False)):
        if text.startswith(scheme):
            text, tls = text[len(scheme):], secure
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port), tls


def build_target(endpoints: Sequence[str]) -> tuple[str, bool, str | None]:
    """The gRPC target for ``endpoints``, whether any asks for TLS, and the TLS name override.

    Several IP endpoints become one ``ipv4:``/``ipv6:`` target, so that one channel fails over
    between them; several host names are resolved here to their addresses, and TLS checks the
    certificate against the first host name.
    """
    parsed = [_split_endpoint(e) for e in endpoints]
    tls = any(secure for _, _, secure in parsed)
    if len(parsed) == 1:
        host, port, _ = parsed[0]
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), tls, None
    addresses: list[tuple[str, int]] = []
    override = None
    for host, port, _ in parsed:
        try:
            ipaddress.ip_address(host)
            addresses.append((host, port))
        except ValueError:
            override = override or host
            for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                addresses.append((info[4][0], port))
    v6 = [a for a in addresses if ":" in a[0]]
    if v6 and len(v6) == len(addresses):
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in addresses), tls, override
    v4 = [a for a in addresses if ":" not in a[0]]
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in v4), tls, override


# -- the client -----------------------------------------------------------------------------------


class EtcdClient:
    """A thread-safe etcd v3 client over one gRPC channel.

    :param endpoints: ``"host:port"``, a comma-separated string of them, or a list.
    :param request_timeout: how long a unary call may keep retrying, in seconds, unless the
        caller passes its own deadline.
    :param ca_cert: path of the CA certificate (PEM) that signs the server certificates; TLS.
    :param cert_key: path of the client key (PEM), with ``cert_cert`` for client TLS auth.
    :param cert_cert: path of the client certificate (PEM).
    :param user: etcd user name (with ``password``); the token is refreshed when it expires.
    :param channel: use this channel instead of opening one (not closed by :meth:`close`).
    :param metadata: extra gRPC metadata sent with every call (e.g. an existing auth token).
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:2379",
        *,
        request_timeout: float = 10.0,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        user: str | None = None,
        password: str | None = None,
        channel: grpc.Channel | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ):
        self.request_timeout = request_timeout
        self._owns_channel = channel is None
        if channel is None:
            channel = _channels.acquire(endpoints, ca_cert, cert_key, cert_cert)
        self.channel = channel
        self._closed = False
        self._kv = rpc_grpc.KVStub(channel)
        self._watch = rpc_grpc.WatchStub(channel)
        self._lease = rpc_grpc.LeaseStub(channel)
        self._auth = rpc_grpc.AuthStub(channel)
        self._maintenance = rpc_grpc.MaintenanceStub(channel)
        self._base_metadata = tuple(metadata)
        self._user, self._password = user, password
        # Guards _token; the token is fetched lazily and again when etcd says it expired.
        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_generation = 0

    def close(self) -> None:
        """Release the channel (closed once no client of this process uses it). Idempotent."""
        if self._owns_channel and not self._closed:
            self._closed = True
            _channels.release(self.channel)

    # -- auth ------------------------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata for the next call: the base metadata plus the current auth token.

        :raises grpc.RpcError: if etcd could not be reached to authenticate (transient).
        :raises EtcdError: if etcd refused the user name or password.
        """
        if self._user is None:
            return self._base_metadata
        token = self._token  # the lock only for fetching one: every call comes through here
        if token is None:
            with self._token_lock:
                if self._token is None:
                    self._token = self._authenticate()
                    self._token_generation += 1
                token = self._token
        # Plain metadata, not call credentials: those are refused on plaintext channels.
        return self._base_metadata + (("token", token),)

    def _authenticate(self) -> str:
        try:
            response = self._auth.Authenticate(
                rpc.AuthenticateRequest(name=self._user, password=self._password or ""),
                timeout=self.request_timeout,
            )
        except grpc.RpcError as exc:
            if is_transient(exc):
                raise
            raise wrap_rpc_error(exc, f"authentication as {self._user!r}") from exc
        return response.token

    def _drop_token(self) -> None:
        with self._token_lock:
            self._token = None

    # -- calls -----------------------------------------------------------------------------------

    def call(
        self,
        method: Callable,
        request,
        what: str,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
        forever: bool = False,
    ):
        """Call a unary RPC, retrying transient failures.

        :param deadline: ``time.monotonic()`` value after which to give up; by default
            ``request_timeout`` from now, or never with ``forever=True``.
        :param stop: give up (raising :class:`Stopped`) when this event is set.
        :raises EtcdUnavailableError: etcd kept failing transiently until the deadline.
        :raises EtcdError: etcd refused the request.
        :raises Stopped: ``stop`` was set.
        """
        if deadline is None and not forever:
            deadline = time.monotonic() + self.request_timeout
        backoff = Backoff()
        while True:
            if stop is not None and stop.is_set():
                raise Stopped()
            attempt_timeout = self.request_timeout
            if deadline is not None:
                attempt_timeout = min(attempt_timeout, max(deadline - time.monotonic(), 0.05))
            try:
                return method(request, timeout=attempt_timeout, metadata=self.metadata())
            except grpc.RpcError as exc:
                if is_token_error(exc):
                    self._drop_token()
                elif not is_transient(exc):
                    raise wrap_rpc_error(exc, what) from exc
                delay = backoff.next_delay()
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise wrap_rpc_error(exc, what) from exc
                log.debug("etcd %s failed (%s); retrying in %.2fs", what, exc.code(), delay)
                if stop is not None:
                    if stop.wait(delay):
                        raise Stopped() from exc
                else:
                    time.sleep(delay)

    def range(self, key: bytes, range_end: bytes = b"", *, revision: int = 0, limit: int = 0,
              keys_only: bool = False, count_only: bool = False, **kw) -> rpc.RangeResponse:
        request = rpc.RangeRequest(key=key, range_end=range_end, revision=revision, limit=limit,
                                   keys_only=keys_only, count_only=count_only)
        return self.call(self._kv.Range, request, "range", **kw)

    def get(self, key: bytes, **kw):
        """The ``KeyValue`` at ``key``, or ``None``."""
        response = self.range(key, **kw)
        return response.kvs[0] if response.kvs else None

    def put(self, key: bytes, value: bytes, *, lease: int = 0, **kw) -> rpc.PutResponse:
        return self.call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease), "put",
                         **kw)

    def delete(self, key: bytes, range_end: bytes = b"", **kw) -> rpc.DeleteRangeResponse:
        request = rpc.DeleteRangeRequest(key=key, range_end=range_end)
        return self.call(self._kv.DeleteRange, request, "delete", **kw)

    def txn(self, compare: Sequence[rpc.Compare], success: Sequence[rpc.RequestOp],
            failure: Sequence[rpc.RequestOp] = (), **kw) -> rpc.TxnResponse:
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return self.call(self._kv.Txn, request, "transaction", **kw)

    def compact(self, revision: int, **kw) -> None:
        self.call(self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=True),
                  "compact", **kw)

    def current_revision(self, **kw) -> int:
        return self.range(b"\0", count_only=True, **kw).header.revision

    def iter_prefix(self, prefix: bytes, *, revision: int = 0, page_size: int = DEFAULT_PAGE_SIZE,
                    keys_only: bool = False, **kw) -> Iterator[tuple[int, list]]:
        """Page through every key under ``prefix`` at one revision.

        Yields ``(revision, kvs)`` per page, in key order. The first page fixes the revision
        (the current one unless ``revision`` is given) and every later page reads at it.
        """
        end = prefix_end(prefix)
        key = prefix
        while True:
            response = self.range(key, end, revision=revision, limit=page_size,
                                  keys_only=keys_only, **kw)
            revision = response.header.revision if revision == 0 else revision
            yield revision, list(response.kvs)
            if not response.more or not response.kvs:
                return
            key = response.kvs[-1].key + b"\0"

    def list_prefix(self, prefix: bytes, *, revision: int = 0, **kw) -> tuple[int, list]:
        """Every key under ``prefix`` at one revision, read page by page: ``(revision, kvs)``."""
        kvs: list = []
        for revision, page in self.iter_prefix(prefix, revision=revision, **kw):
            kvs.extend(page)
        return revision, kvs

    # -- leases ----------------------------------------------------------------------------------

    def lease_grant(self, ttl: int, **kw) -> tuple[int, int]:
        """Grant a lease; returns ``(lease id, granted ttl)``."""
        response = self.call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl), "lease grant",
                             **kw)
        if response.error:
            raise EtcdError(f"etcd lease grant failed: {response.error}", details=response.error)
        return response.ID, response.TTL

    def lease_revoke(self, lease_id: int, **kw) -> None:
        try:
            self.call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id), "lease revoke",
                      **kw)
        except EtcdError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise

    def keepalive(self, lease_id: int) -> KeepAliveStream:
        return KeepAliveStream(self, lease_id)

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> WatchStream:
        return WatchStream(self, key, range_end, start_revision)


def _open_channel(endpoints: Sequence[str], ca_cert, cert_key, cert_cert) -> grpc.Channel:
    target, tls, override = build_target(endpoints)
    options = list(_CHANNEL_OPTIONS)
    if len(endpoints) > 1:
        options.append(("grpc.lb_policy_name", "pick_first"))
    if tls or ca_cert or cert_cert:
        root = _read(ca_cert)
        key, chain = _read(cert_key), _read(cert_cert)
        credentials = grpc.ssl_channel_credentials(root, key, chain)
        if override:
            options.append(("grpc.ssl_target_name_override", override))
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


class _ChannelPool:
    """One gRPC channel per (endpoints, TLS files) in this process, shared by every client.

    A process that runs several :class:`~etcdcron.Cron` (threads of a web worker, tests) then
    holds one connection and one gRPC polling thread instead of one per Cron. Channels are
    reference counted, and keyed by process id too, so a forked child never uses its parent's.
    """

    def __init__(self):
        # Guards _entries: key -> [channel, users].
        self._lock = threading.Lock()
        self._entries: dict[tuple, list] = {}

    def acquire(self, endpoints, ca_cert, cert_key, cert_cert) -> grpc.Channel:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        endpoints = [e.strip() for e in endpoints]
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        key = (os.getpid(), tuple(endpoints), ca_cert, cert_key, cert_cert)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [
                    _open_channel(endpoints, ca_cert, cert_key, cert_cert), 0]
            entry[1] += 1
            return entry[0]

    def release(self, channel: grpc.Channel) -> None:
        with self._lock:
            for key, entry in self._entries.items():
                if entry[0] is channel:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._entries[key]
                        channel.close()
                    return


_channels = _ChannelPool()


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read()


# -- streams --------------------------------------------------------------------------------------


class _RequestQueue:
    """The request side of a bidirectional stream: gRPC's own thread drains it."""

    _END = object()

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, request) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item


class WatchStream:
    """One ``Watch`` RPC on ``[key, range_end)`` from ``start_revision``, resumed on failure.

    Iterating yields lists of events (``mvccpb.Event``), each list from one watch response, and
    reconnects by itself (with backoff) after the stream breaks, from the revision after the last
    one it delivered. It raises :class:`Compacted` when the revision to resume from is gone, and
    ends once :meth:`cancel` was called.

    :ivar next_revision: the revision the stream would resume from.
    """

    def __init__(self, client: EtcdClient, key: bytes, range_end: bytes, start_revision: int):
        self._client = client
        self._key, self._range_end = key, range_end
        self.next_revision = start_revision
        # Guards _call and _cancelled: cancel() may run on another thread than the reader.
        self._lock = threading.Lock()
        self._call = None
        self._requests: _RequestQueue | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            call, requests = self._call, self._requests
        if requests is not None:
            requests.close()
        if call is not None:
            call.cancel()

    def _open(self):
        requests = _RequestQueue()
        requests.put(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=self._key, range_end=self._range_end, start_revision=self.next_revision,
            progress_notify=True)))
        call = self._client._watch.Watch(iter(requests), metadata=self._client.metadata())
        with self._lock:
            if self._cancelled.is_set():
                requests.close()
                call.cancel()
                return None
            self._call, self._requests = call, requests
        return call

    def __iter__(self) -> Iterator[list]:
        backoff = Backoff()
        while not self._cancelled.is_set():
            try:
                call = self._open()
                if call is None:
                    return
                for response in call:
                    if response.compact_revision:
                        raise Compacted(response.compact_revision)
                    if response.canceled:
                        raise EtcdError(f"etcd cancelled the watch: {response.cancel_reason}",
                                        details=response.cancel_reason)
                    backoff.reset()
                    if response.events:
                        self.next_revision = response.events[-1].kv.mod_revision + 1
                        yield list(response.events)
                    elif not response.created:
                        # A progress notification: everything up to header.revision was sent.
                        self.next_revision = max(self.next_revision, response.header.revision + 1)
            except grpc.RpcError as exc:
                if self._cancelled.is_set():
                    return
                if is_token_error(exc):
                    self._client._drop_token()
                elif not is_transient(exc) and exc.code() != grpc.StatusCode.CANCELLED:
                    raise wrap_rpc_error(exc, "watch") from exc
                log.debug("watch on %r broke (%s); resuming from revision %d",
                          self._key, exc.code(), self.next_revision)
            if self._cancelled.wait(backoff.next_delay()):
                return


class KeepAliveStream:
    """A ``LeaseKeepAlive`` stream for one lease.

    :meth:`send` asks for one renewal (any thread); iterating yields ``(sent_at, ttl)`` per
    answer, where ``sent_at`` is the ``time.monotonic()`` of the request it answers and ``ttl``
    the lease's remaining seconds (0: the lease is gone). The iteration raises the
    ``grpc.RpcError`` that broke the stream, and ends after :meth:`cancel`.
    """

    def __init__(self, client: EtcdClient, lease_id: int):
        self._requests = _RequestQueue()
        self._lease_id = lease_id
        # Monotonic send times of unanswered requests, oldest first; etcd answers in order.
        self._sent: queue.SimpleQueue = queue.SimpleQueue()
        self._call = client._lease.LeaseKeepAlive(iter(self._requests),
                                                  metadata=client.metadata())

    def send(self) -> None:
        self._sent.put(time.monotonic())
        self._requests.put(rpc.LeaseKeepAliveRequest(ID=self._lease_id))

    def cancel(self) -> None:
        self._requests.close()
        self._call.cancel()

    def __iter__(self) -> Iterator[tuple[float, int]]:
        for response in self._call:
            try:
                sent_at = self._sent.get_nowait()
            except queue.Empty:
                sent_at = time.monotonic()
            yield sent_at, response.TTL

