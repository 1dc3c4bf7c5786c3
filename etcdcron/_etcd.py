"""etcdcron's own etcd access layer: connections with failover, retries, paged ranges, watches,
leases, TLS and user/password auth.

The generated etcd stubs come from the ``etcd3`` package (``python3-etcd3``); everything else is
here, because no Python etcd client survives a broken stream or a restarting server as shipped
(see ``DESIGN.md`` section 8).

Threads: an :class:`EtcdClient` is shared by every thread of a :class:`~etcdcron.Cron`, and its
connection by every client of the process with the same endpoints and TLS files. A
:class:`WatchStream` or :class:`KeepAliveStream` is read by one thread; ``cancel()`` may be called
from any thread. Nothing here starts a thread of its own except gRPC's (and a short-lived timer
per lease keepalive, see :class:`KeepAliveStream`).

Connections (:mod:`etcdcron._connection`): one gRPC channel per endpoint, calls going to one
member at a time and moving on when it fails. Every call carries etcd's ``hasleader`` metadata,
so a member without a leader answers ``UNAVAILABLE`` at once instead of stalling.

Retries: unary calls are retried on transient failures (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
etcd's "too many requests", an expired or outdated auth token) with capped exponential backoff
and full jitter, until the call's deadline passes or its stop event is set. A write that must not
happen twice (:meth:`EtcdClient.txn_once`) looks up etcd's history before it is sent again.

Secrets: the password is sent only in the ``Authenticate`` request, which is built where no
exception can keep it; the locals of every frame a gRPC error passed through are cleared before
the error goes on, so neither the password nor the auth token reaches a traceback.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import re
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any, cast

import grpc
from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf import unknown_fields

from etcdcron._connection import (
    ConnectionSpec,
    Connection,
    Endpoint,
    Link,
    Method,
    Service,
    Token,
    check_credentials,
    check_timeout,
    connections,
)
from etcdcron.errors import EtcdError, EtcdUnavailableError, ValidationError
from etcdcron.keys import prefix_end
from etcdcron.metrics import NO_METRICS, Metrics

__all__ = [
    "EtcdClient",
    "connect",
    "ConnectionSpec",
    "Endpoint",
    "Compacted",
    "Stopped",
    "WatchStream",
    "KeepAliveStream",
    "Backoff",
    "PageSizer",
    "cmp_mod",
    "cmp_create",
    "op_put",
    "op_delete",
    "op_range",
    "op_txn",
    "length_delimited",
    "guarded_write",
    "guarded",
    "guarded_check",
    "compare_mod",
]

log = logging.getLogger(__name__)

#: The first attempt of a call on a connection with several endpoints may take this long before
#: it is given up as a frozen member's (and retried on the next); each retry gets twice as long,
#: up to the client's request timeout.
FIRST_ATTEMPT_TIMEOUT = 2.0
#: A lease keepalive not answered within this many seconds counts as a failure of its member.
KEEPALIVE_ANSWER_TIMEOUT = 3.0
#: How often a call waiting on etcd looks at its stop event (seconds).
_STOP_POLL = 0.1
#: Ops per read-only transaction when looking through a key's history (etcd's --max-txn-ops
#: defaults to 128).
_HISTORY_BATCH = 100
#: How recent (seconds) the last revision this client saw must be to serve as the "before"
#: revision of a write that must not happen twice; older, it is read afresh first.
_FRESH_REVISION = 1.0
#: etcd's metadata asking a member to refuse a request at once while it has no leader.
_REQUIRE_LEADER = ("hasleader", "true")


class Stopped(Exception):
    """The stop event of a call was set while it waited."""


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


def op_range(key: bytes, range_end: bytes = b"", revision: int = 0) -> rpc.RequestOp:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end,
                                                        revision=revision))


def op_txn(
    compare: Sequence[rpc.Compare],
    success: Sequence[rpc.RequestOp],
    failure: Sequence[rpc.RequestOp] = (),
) -> rpc.RequestOp:
    """A transaction nested in another one (etcd >= 3.3)."""
    return rpc.RequestOp(
        request_txn=rpc.TxnRequest(compare=compare, success=success, failure=failure)
    )


def guarded_write(job_key: bytes, job_revision: int, counter_key: bytes, counter_revision: int,
                  counter: bytes | None) -> bytes:
    """The wire bytes of the nested transaction that records one trigger result: if the job
    and its counter still have these mod revisions, put ``counter`` (or, with ``None``, delete
    both keys). The same ``RequestOp`` as ``op_txn([cmp_mod(...), cmp_mod(...)],
    [op_put(...)])``; see :meth:`EtcdClient.txn_encoded`.

    The recorder builds up to a hundred of these per round trip: written as bytes and parsed
    once per batch, in C, they cost a third of building nested messages field by field.
    """
    compares = _ld(1, _compare_mod(job_key, job_revision)) + _ld(
        1, _compare_mod(counter_key, counter_revision))
    if counter is None:
        success = _ld(2, _ld(3, _ld(1, job_key))) + _ld(2, _ld(3, _ld(1, counter_key)))
    else:
        success = _ld(2, _ld(2, _ld(1, counter_key) + _ld(2, counter)))
    return _ld(4, compares + success)


def guarded_check(job_key: bytes, job_revision: int, counter_key: bytes,
                  counter_revision: int) -> bytes:
    """Like :func:`guarded_write`, writing nothing: whether both revisions still hold."""
    return _ld(4, _ld(1, _compare_mod(job_key, job_revision))
               + _ld(1, _compare_mod(counter_key, counter_revision)))


def guarded(compare: bytes, op: bytes) -> bytes:
    """``op`` (wire bytes of a ``RequestOp``) as the success branch of a nested transaction
    guarded by ``compare`` (wire bytes of one ``Compare``)."""
    return _ld(4, _ld(1, compare) + _ld(2, op))


def compare_mod(key: bytes, revision: int) -> bytes:
    """The wire bytes of :func:`cmp_mod`."""
    return _compare_mod(key, revision)


def _compare_mod(key: bytes, revision: int) -> bytes:
    # result EQUAL is 0 (omitted); target MOD = 2 (field 2); key (3); mod_revision (6, set even
    # when 0: it is a oneof member)
    return b"\x10\x02" + _ld(3, key) + b"\x30" + _varint(revision)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_BYTE = [bytes((i,)) for i in range(0x80)]


def length_delimited(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (field numbers below 16): tag, length, payload."""
    n = len(payload)
    if n < 0x80:
        return bytes((field << 3 | 2, n)) + payload
    return bytes((field << 3 | 2,)) + _varint(n) + payload


_ld = length_delimited


# -- errors and retries ---------------------------------------------------------------------------


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
#: The codes of a call that found no etcd to answer it (logged once until one answers again).
_UNREACHABLE_CODES = _TRANSIENT_CODES


def _code_name(exc: grpc.RpcError) -> str:
    code = exc.code()
    return code.name if code is not None else "UNKNOWN"


def is_transient(exc: grpc.RpcError) -> bool:
    """Whether retrying the same request may succeed (auth token errors aside)."""
    code = exc.code()
    if code in _TRANSIENT_CODES:
        return True
    details = exc.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "too many requests" in details
    # etcd's own timeout of a proposal on a member that lost its leader
    return code == grpc.StatusCode.UNKNOWN and "context deadline exceeded" in details


def is_token_error(exc: grpc.RpcError) -> bool:
    """Whether etcd refused the auth token: expired, unknown to this member, or issued before the
    last change of users or roles (``auth: revision in header is old``). A new token fixes it."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED and "auth token" in details:
        return True
    return "revision in header is old" in details or "revision of auth store is old" in details


def _surely_not_applied(exc: grpc.RpcError) -> bool:
    """Whether a failed write was certainly refused before etcd could apply it."""
    details = exc.details() or ""
    return is_token_error(exc) or "too many requests" in details


def _retryable(exc: grpc.RpcError) -> bool:
    """Whether a failed attempt is worth another: transient, a refused token (fetched again), or
    cut short by the retirement of its channel."""
    return is_transient(exc) or is_token_error(exc) or (
        exc.code() == grpc.StatusCode.CANCELLED and getattr(exc, "retired", False))


def wrap_rpc_error(exc: grpc.RpcError, what: str) -> EtcdError:
    """An :class:`EtcdError` describing ``exc``; raise it ``from exc``."""
    code, details = exc.code(), exc.details() or ""
    cls = EtcdUnavailableError if is_transient(exc) else EtcdError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"etcd {what} failed: {name}: {details}", code=code, details=details)


def _scrub(exc: BaseException) -> None:
    """Clear the locals of the finished frames ``exc`` passed through (requests, metadata: the
    password and the auth token), so no traceback of it shows them."""
    traceback.clear_frames(exc.__traceback__)


#: The shortest time left for one more attempt before a call's deadline.
_LAST_ATTEMPT = 0.05


class _Retry:
    """The time budget of one call: its deadline, stop event and backoff.

    :param deadline: ``time.monotonic()`` value after which to give up; ``None``: never.
    """

    def __init__(self, deadline: float | None, stop: threading.Event | None,
                 request_timeout: float, failover: bool):
        self.deadline = deadline
        self.stop = stop
        self._request_timeout = request_timeout
        self._failover = failover
        self._backoff = Backoff()
        self._attempts = 0

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped()

    def attempt_timeout(self) -> float:
        """The timeout of the next attempt; counts it."""
        timeout = self._request_timeout
        if self._failover:  # a frozen member is left in seconds, a slow cluster still answers
            timeout = min(timeout, FIRST_ATTEMPT_TIMEOUT * 2 ** min(self._attempts, 10))
        self._attempts += 1
        if self.deadline is not None:
            timeout = min(timeout, max(self.deadline - time.monotonic(), 0.05))
        return timeout

    def pause(self, exc: grpc.RpcError, what: str) -> None:
        """Wait before the next attempt after ``exc``.

        :raises EtcdError: describing ``exc`` if the deadline would pass first.
        :raises Stopped: if the stop event is set meanwhile.
        """
        delay = self._backoff.next_delay()
        if self.deadline is not None:
            # The last attempt goes out just before the deadline, not a backoff earlier.
            left = self.deadline - time.monotonic() - _LAST_ATTEMPT
            if left <= 0:
                raise wrap_rpc_error(exc, what) from exc
            delay = min(delay, left)
        log.debug("etcd %s failed (%s); retrying in %.2fs", what, exc.code(), delay)
        if self.stop is not None:
            if self.stop.wait(delay):
                raise Stopped() from exc
        else:
            time.sleep(delay)

    def wait_for(self, event: threading.Event, what: str) -> None:
        """Wait until ``event`` is set, within the deadline and until stopped."""
        while True:
            self.check_stop()
            timeout = _STOP_POLL if self.stop is not None else None
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise EtcdUnavailableError(f"etcd {what} did not finish before the deadline",
                                               code=grpc.StatusCode.DEADLINE_EXCEEDED)
                timeout = left if timeout is None else min(timeout, left)
            if event.wait(timeout):
                return


def _invoke(fn: Any, request: Any, timeout: float, metadata: Sequence[tuple[str, str]],
            stop: threading.Event | None) -> Any:
    """One attempt of a unary call; with a ``stop`` event, it is cancelled when that is set."""
    if stop is None:
        return fn(request, timeout=timeout, metadata=metadata)
    future = fn.future(request, timeout=timeout, metadata=metadata)
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    while not done.wait(_STOP_POLL):
        if stop.is_set():
            future.cancel()
            raise Stopped()
    return future.result()


def connect(*, endpoints: str | Sequence[str] | None = None, client: Any = None,
            request_timeout: float | timedelta = 10.0, ca_cert: str | None = None,
            cert_key: str | None = None, cert_cert: str | None = None, user: str | None = None,
            password: str | None = None) -> EtcdClient:
    """The :class:`EtcdClient` for :class:`~etcdcron.Cron`'s connection options.

    ``endpoints`` defaults to ``127.0.0.1:2379``. ``client`` is an existing, unauthenticated
    ``etcd3`` client whose channel (and TLS) is reused; it excludes every other option but
    ``request_timeout``.

    :raises ValidationError: if an option is invalid, contradicts another, or would connect
        with less TLS or auth than it asks for.
    """
    timeout = check_timeout(request_timeout)
    if client is None:
        return EtcdClient("127.0.0.1:2379" if endpoints is None else endpoints,
                          request_timeout=timeout, ca_cert=ca_cert, cert_key=cert_key,
                          cert_cert=cert_cert, user=user, password=password)
    beside = [name for name, value in (("endpoints", endpoints), ("ca_cert", ca_cert),
                                       ("cert_key", cert_key), ("cert_cert", cert_cert),
                                       ("user", user), ("password", password))
              if value is not None]
    if beside:
        raise ValidationError(f"give either client or {', '.join(beside)}, not both: client= "
                              "reuses that client's channel and TLS as they are")
    try:
        channel = client.channel
    except Exception as exc:  # an etcd3 client picks its channel when asked (and may fail)
        raise ValidationError(f"client must be an etcd3 client with a usable .channel, "
                              f"got {client!r} ({exc!r})") from None
    if not isinstance(channel, grpc.Channel):
        raise ValidationError(f"client must be an etcd3 client (with a .channel), got {client!r}")
    if getattr(client, "metadata", None) or getattr(client, "call_credentials", None):
        raise ValidationError(
            "client is an etcd3 client that authenticated as a user; etcd3 clients keep the "
            "token but not the password, so etcdcron could not renew the token when it expires "
            "(--auth-token-ttl, 300 s by default) or when users and roles change; pass "
            "endpoints=..., user=..., password=... (and the TLS options) instead")
    return EtcdClient(channel=channel, request_timeout=timeout)


# -- paging ---------------------------------------------------------------------------------------

_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


class PageSizer:
    """The limit of each page of a listing.

    etcd counts the rest of the range for every page, so many small pages cost far more than a
    few large ones (measured on a million keys: 1,000 pages of 1,000 keys take 60 s, 100 of
    10,000 take 7 s); but a page must fit the client's receive limit, whatever the records weigh.
    So pages start at ``first`` keys, and after each page the limit becomes what fills
    ``target_bytes`` at that page's bytes per key, growing at most ``growth`` times a page, up to
    ``max_keys``. A page refused as larger than the receive limit shrinks the limit to what fits.

    Pure: no etcd, no clock.
    """

    def __init__(self, target_bytes: int, *, first: int = 100, max_keys: int = 50_000,
                 growth: int = 8):
        self.target_bytes = max(1, target_bytes)
        self.max_keys = max(1, max_keys)
        self.growth = growth
        self._limit = max(1, min(first, self.max_keys))

    @property
    def limit(self) -> int:
        return self._limit

    def observe(self, keys: int, nbytes: int) -> None:
        """A page of ``keys`` keys and ``nbytes`` bytes came back."""
        if keys <= 0:
            return
        fits = int(self.target_bytes * keys / max(nbytes, 1))
        self._limit = max(1, min(fits, self._limit * self.growth, self.max_keys))

    def too_large(self, size: int | None, receive_limit: int) -> bool:
        """A page of the current limit was ``size`` bytes (if known), over ``receive_limit``:
        shrink. Returns ``False`` if a single key is already too large."""
        if self._limit <= 1:
            return False
        ratio = receive_limit / size if size else 0.25
        self._limit = max(1, min(self._limit - 1, int(self._limit * ratio * 0.8)))
        return True


def _too_large(exc: EtcdError) -> int | None:
    """The size of a response refused as larger than the receive limit, ``0`` if unknown, or
    ``None`` if ``exc`` is something else."""
    if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or "larger than max" not in exc.details:
        return None
    match = _TOO_LARGE.search(exc.details)
    return int(match.group(1)) if match else 0


# -- the client -----------------------------------------------------------------------------------


class _ReadAhead:
    """A page of a listing requested ahead of its turn, on gRPC's own threads: one attempt,
    no retries. :meth:`take` gives its answer if that attempt succeeded, else ``None``, and
    the page is then read again as any call is (retries, failover, a fresh token)."""

    __slots__ = ("_future", "_done")

    def __init__(self, future: Any):
        self._future = future
        self._done = threading.Event()
        future.add_done_callback(lambda _: self._done.set())

    def take(self, stop: threading.Event | None) -> Any:
        """The answer, or ``None``. :raises Stopped: if ``stop`` is set while it waits."""
        while not self._done.wait(_STOP_POLL):
            if stop is not None and stop.is_set():
                self._future.cancel()
                raise Stopped()
        try:
            return self._future.result()
        except (grpc.RpcError, grpc.FutureCancelledError):
            return None

    def cancel(self) -> None:
        self._future.cancel()


class EtcdClient:
    """A thread-safe etcd v3 client over one (shared) connection.

    :param endpoints: ``"host:port"`` (or ``http://``/``https://`` ones), a comma-separated string
        of them, or a list; tried in order, moving on when a member fails.
    :param request_timeout: how long a unary call may keep retrying, in seconds, unless the
        caller passes its own deadline.
    :param ca_cert: path of the CA certificate (PEM) that signs the server certificates; TLS.
    :param cert_key: path of the client key (PEM), with ``cert_cert`` for client TLS auth.
    :param cert_cert: path of the client certificate (PEM).
    :param user: etcd user name (with ``password``); the token is renewed when etcd refuses it.
    :param channel: use this channel instead of opening any (not closed by :meth:`close`).
    :param metadata: extra gRPC metadata sent with every call.
    :raises ValidationError: if an option is invalid (see :class:`ConnectionSpec`).
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
        self.request_timeout = check_timeout(request_timeout)
        self._credentials = check_credentials(user, password)
        if channel is None:
            spec = ConnectionSpec.parse(endpoints, ca_cert, cert_key, cert_cert)
            if self._credentials is not None and not spec.tls:
                log.info("etcd user %r authenticates without TLS: the password and every "
                            "request travel in clear text", self._credentials.user)
            self._conn = connections.acquire(spec)
            # released by close(), or when this client is garbage collected unclosed
            self._release: Callable[[], object] | None = weakref.finalize(
                self, connections.release, self._conn)
        else:
            self._conn = Connection(None, channel)
            self._release = None
        self._closed = False
        self._kv = Service(self._conn, "KV")
        self._watch = Service(self._conn, "Watch")
        self._lease = Service(self._conn, "Lease")
        self._auth = Service(self._conn, "Auth")
        self._maintenance = Service(self._conn, "Maintenance")
        self._cluster = Service(self._conn, "Cluster")
        self._base_metadata = (*tuple(metadata), _REQUIRE_LEADER)
        # Guards _token, _token_pending and _token_generation. The token is fetched by one thread
        # at a time (the others wait on _token_pending, within their own deadlines), never while
        # holding the lock.
        self._token_lock = threading.Lock()
        self._token: str | None = None
        self._token_pending: threading.Event | None = None
        self._token_generation = 0
        #: Where failed and retried calls are counted (the Cron sets it while it runs).
        self.metrics: Metrics = NO_METRICS
        # Guards _unreachable_since: the monotonic time calls began to find etcd unreachable
        # (None while it answers). Read without the lock on every answer.
        self._reach_lock = threading.Lock()
        self._unreachable_since: float | None = None
        # (revision, monotonic time) of the newest response header seen; written without a lock
        # (a lost race keeps an older revision, which only makes txn_once look further back).
        self._seen = (0, -math.inf)

    @property
    def channel(self) -> grpc.Channel:
        """The channel calls go to now."""
        return self._conn.channel

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint calls go to now (``None`` on a caller's channel)."""
        return self._conn.endpoint

    def close(self) -> None:
        """Release the connection (closed once no client of this process uses it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._release is not None:
            self._release()

    def __repr__(self) -> str:
        return f"<EtcdClient {self._conn.endpoint or 'on a caller channel'}>"

    # -- auth ------------------------------------------------------------------------------------

    def metadata(self, *, deadline: float | None = None,
                 stop: threading.Event | None = None) -> tuple[tuple[str, str], ...]:
        """The metadata for the next call or stream: base metadata plus the auth token.

        :raises grpc.RpcError: if etcd could not be reached to authenticate (transient).
        :raises EtcdError: if etcd refused the user name or password.
        """
        retry = _Retry(deadline if deadline is not None else
                       time.monotonic() + self.request_timeout, stop, self.request_timeout,
                       self._conn.size > 1)
        return self._metadata(self._token_for(retry))

    def _metadata(self, token: str | None) -> tuple[tuple[str, str], ...]:
        if token is None:
            return self._base_metadata
        # Plain metadata, not call credentials: those are refused on plaintext channels.
        return (*self._base_metadata, ("token", token))

    def _token_for(self, retry: _Retry) -> str | None:
        """The auth token (``None`` without auth), fetched if there is none."""
        if self._credentials is None:
            return None
        while True:
            with self._token_lock:
                if self._token is not None:
                    return self._token
                pending = self._token_pending
                mine = pending is None
                if mine:
                    pending = self._token_pending = threading.Event()
            assert pending is not None  # the event of another thread, or the one just made
            if not mine:  # another thread is authenticating
                retry.wait_for(pending, "authentication")
                continue
            token = None
            try:
                token = self._authenticate(retry)
                return token
            finally:
                with self._token_lock:
                    if token is not None:
                        self._token = token
                        self._token_generation += 1
                    self._token_pending = None
                pending.set()

    def _authenticate(self, retry: _Retry) -> str:
        """One ``Authenticate`` attempt within ``retry``'s deadline and stop event.

        :raises grpc.RpcError: if it failed transiently (the caller retries).
        :raises EtcdError: if etcd refused the credentials.
        """
        assert self._credentials is not None  # _token_for authenticates only with credentials
        link = self._conn.link()
        timeout = retry.attempt_timeout()
        try:
            response = _invoke(Method(self._conn, "Auth", "Authenticate").on(link),
                               self._credentials.request(), timeout, self._base_metadata,
                               retry.stop)
        except grpc.RpcError as exc:
            _scrub(exc)
            self._conn.failed(link, exc, timeout)
            if is_transient(exc):
                raise
            raise wrap_rpc_error(exc, f"authentication as {self._credentials.user!r}") from exc
        return Token(response.token)

    def _token_refused(self, token: str | None) -> None:
        """etcd refused ``token``: drop it (unless another thread has fetched a newer one)."""
        with self._token_lock:
            if self._token == token:
                self._token = None

    # -- calls -----------------------------------------------------------------------------------

    def call(
        self,
        method: Method,
        request: Any,
        what: str,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
        forever: bool = False,
        settle: Callable[[_Retry], object] | None = None,
    ) -> Any:
        """Call a unary RPC (``client._kv.Range`` and the like), retrying transient failures.

        :param deadline: ``time.monotonic()`` value after which to give up; by default
            ``request_timeout`` from now, or never with ``forever=True``.
        :param stop: give up (raising :class:`Stopped`) when this event is set.
        :param settle: for a request that must not be applied twice: called before the request
            is sent again after an attempt that may have been applied; its result, unless
            :data:`RESEND`, is returned instead of sending it again.
        :raises EtcdUnavailableError: etcd kept failing transiently until the deadline.
        :raises EtcdError: etcd refused the request.
        :raises Stopped: ``stop`` was set.
        """
        if deadline is None and not forever:
            deadline = time.monotonic() + self.request_timeout
        retry = _Retry(deadline, stop, self.request_timeout, self._conn.size > 1)
        unsettled = False
        while True:
            retry.check_stop()
            if unsettled:
                assert settle is not None  # unsettled is only ever set with a settle callback
                try:
                    outcome = settle(retry)
                except grpc.RpcError as exc:  # could not look yet: wait and look again
                    _scrub(exc)
                    self._retry_or_raise(retry, exc, what)
                    continue
                if outcome is not RESEND:
                    return outcome
                unsettled = False
            try:
                return self._attempt(method, request, retry)
            except grpc.RpcError as exc:
                _scrub(exc)  # _attempt's frame too, now that it is finished (it held the token)
                unsettled = settle is not None and not _surely_not_applied(exc)
                self._retry_or_raise(retry, exc, what)

    def _retry_or_raise(self, retry: _Retry, exc: grpc.RpcError, what: str) -> None:
        """Wait before the next attempt after ``exc``, or raise it as an :class:`EtcdError`
        (not retryable, or the deadline would pass); count either in the metrics."""
        code, name = exc.code(), _code_name(exc)
        if not _retryable(exc):
            self.metrics.etcd_error(name)
            raise wrap_rpc_error(exc, what) from exc
        if code in _UNREACHABLE_CODES:
            self._unreachable(name, exc.details() or "")
        try:
            retry.pause(exc, what)
        except EtcdError:
            self.metrics.etcd_error(name)
            raise
        self.metrics.etcd_retry(name)

    def _unreachable(self, code: str, details: str) -> None:
        """A call found etcd unreachable: say so once, until a call gets an answer again."""
        with self._reach_lock:
            if self._unreachable_since is not None:
                return
            self._unreachable_since = time.monotonic()
        log.warning("etcd unreachable (%s: %s); retrying until it answers", code, details)

    def _reachable(self) -> None:
        with self._reach_lock:
            since, self._unreachable_since = self._unreachable_since, None
        if since is not None:
            log.info("etcd reachable again after %.1fs", time.monotonic() - since)

    def _attempt(self, method: Method, request: Any, retry: _Retry) -> Any:
        """One attempt on the current link.

        :raises grpc.RpcError: the attempt's failure, its frames scrubbed, the link's failover
            done, a refused token dropped; ``exc.retired`` is set if the link was retired under
            it.
        """
        token = self._token_for(retry)
        link = self._conn.link()
        timeout = retry.attempt_timeout()
        try:
            response = _invoke(method.on(link), request, timeout, self._metadata(token),
                               retry.stop)
        except grpc.RpcError as exc:
            _scrub(exc)
            if is_token_error(exc):
                self._token_refused(token)
            exc.retired = link.retired  # type: ignore[attr-defined]  # read back by _retryable
            self._conn.failed(link, exc, timeout)
            raise
        if self._unreachable_since is not None:
            self._reachable()
        header = getattr(response, "header", None)
        if header is not None and header.revision > self._seen[0]:
            self._seen = (header.revision, time.monotonic())
        return response

    def range(self, key: bytes, range_end: bytes = b"", *, revision: int = 0, limit: int = 0,
              keys_only: bool = False, count_only: bool = False, **kw: Any) -> rpc.RangeResponse:
        request = rpc.RangeRequest(key=key, range_end=range_end, revision=revision, limit=limit,
                                   keys_only=keys_only, count_only=count_only)
        return self.call(self._kv.Range, request, "range", **kw)

    def get(self, key: bytes, **kw: Any) -> Any:
        """The ``KeyValue`` at ``key``, or ``None``."""
        response = self.range(key, **kw)
        return response.kvs[0] if response.kvs else None

    def put(self, key: bytes, value: bytes, *, lease: int = 0, **kw: Any) -> rpc.PutResponse:
        return self.call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease), "put",
                         **kw)

    def delete(self, key: bytes, range_end: bytes = b"",
               **kw: Any) -> rpc.DeleteRangeResponse:
        request = rpc.DeleteRangeRequest(key=key, range_end=range_end)
        return self.call(self._kv.DeleteRange, request, "delete", **kw)

    def txn(self, compare: Sequence[rpc.Compare], success: Sequence[rpc.RequestOp],
            failure: Sequence[rpc.RequestOp] = (), **kw: Any) -> rpc.TxnResponse:
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return self.call(self._kv.Txn, request, "transaction", **kw)

    def txn_encoded(self, compare: Sequence[bytes], success: Sequence[bytes],
                    **kw: Any) -> rpc.TxnResponse:
        """:meth:`txn` of compares and ops given as their wire bytes (see
        :func:`guarded_write`): the request is parsed from them in one go."""
        body = b"".join([*(_ld(1, c) for c in compare), *(_ld(2, op) for op in success)])
        return self.call(self._kv.Txn, rpc.TxnRequest.FromString(body), "transaction", **kw)

    def txn_once(self, compare: Sequence[rpc.Compare], success: Sequence[rpc.RequestOp],
                 failure: Sequence[rpc.RequestOp] = (), *, witness: tuple[bytes, bytes],
                 **kw: Any) -> rpc.TxnResponse | None:
        """A transaction applied at most once, although retried.

        etcd may apply a request whose answer never arrives (a timeout, a member lost, a leader
        change). Before such a request is sent again, etcd's history is looked through: if
        ``witness`` — a key and a value unique to this request that its success branch puts —
        was put since before the first attempt, the transaction was applied and is not sent
        again, even if the key has since been changed or deleted (a one-shot job that fired).

        Not covered: an attempt held up on its way to etcd (in a frozen member's socket, or a
        network delaying it for longer than the attempt's timeout) that arrives after the look
        into the history found nothing and the transaction was sent again; it is then applied
        twice. Closing that needs a fence key that every attempt compares and that is written
        before sending again.

        :returns: the response, or ``None`` if the transaction was applied but its answer lost.
        :raises EtcdError: as :meth:`call`; also if the history needed was compacted away.
        """
        key, value = witness
        kw.setdefault("deadline", None if kw.get("forever") else
                      time.monotonic() + self.request_timeout)
        since = self._revision_before_write(key, kw)
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)

        def settle(retry: _Retry) -> object:
            return None if self._put_since(key, value, since, retry) else RESEND

        return self.call(self._kv.Txn, request, "transaction", settle=settle, **kw)

    def _revision_before_write(self, key: bytes, kw: dict[str, Any]) -> int:
        """A revision etcd had reached before the write about to be sent."""
        revision, seen_at = self._seen
        if time.monotonic() - seen_at <= _FRESH_REVISION:
            return revision
        return cast(int, self.range(key, count_only=True, **kw).header.revision)

    def _put_since(self, key: bytes, value: bytes, since: int, retry: _Retry) -> bool:
        """Whether ``key`` was set to ``value`` at some revision after ``since``.

        :raises grpc.RpcError: if etcd failed transiently (the caller looks again later).
        :raises EtcdError: if the history after ``since`` was compacted.
        """
        now = self._attempt(self._kv.Range, rpc.RangeRequest(key=key), retry)
        kv = now.kvs[0] if now.kvs else None
        if kv is not None and (kv.value == value or kv.mod_revision <= since):
            return cast(bool, kv.value == value)
        # Changed or gone since: read the key at every revision in between (~140k revisions/s).
        end = now.header.revision
        for start in range(since + 1, end + 1, _HISTORY_BATCH):
            revisions = range(start, min(start + _HISTORY_BATCH, end + 1))
            request = rpc.TxnRequest(success=[op_range(key, revision=r) for r in revisions])
            try:
                history = self._attempt(self._kv.Txn, request, retry)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    raise EtcdError(
                        f"etcd compacted the history needed to tell whether a write to {key!r} "
                        f"was applied before its answer was lost: {exc.details()}",
                        code=exc.code(), details=exc.details() or "") from exc
                raise
            for reply in history.responses:
                kvs = reply.response_range.kvs
                if kvs and kvs[0].value == value:
                    return True
        log.debug("a write to %r was not applied before its answer was lost; sending it again",
                  key)
        return False

    def compact(self, revision: int, **kw: Any) -> None:
        self.call(self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=True),
                  "compact", **kw)

    def current_revision(self, key: bytes = b"\0", **kw: Any) -> int:
        """etcd's current revision, read linearizably through ``key`` (a user whose roles
        cover only a prefix must name a key under it)."""
        return cast(int, self.range(key, count_only=True, **kw).header.revision)

    def iter_prefix(self, prefix: bytes, *, revision: int = 0, page_size: int = 100,
                    keys_only: bool = False, **kw: Any) -> Iterator[tuple[int, list[Any]]]:
        """Page through every key under ``prefix`` at one revision.

        Yields ``(revision, kvs)`` per page, in key order. The first page fixes the revision
        (the current one unless ``revision`` is given) and every later page reads at it. Pages
        start at ``page_size`` keys and adapt (see :class:`PageSizer`).

        :raises EtcdError: also if a single key is larger than the receive limit.
        """
        end = prefix_end(prefix)
        key = prefix
        receive_limit = self._conn.spec.max_receive_bytes if self._conn.spec else 4 << 20
        pages = PageSizer(min(8 << 20, receive_limit // 4), first=page_size)
        ahead: _ReadAhead | None = None
        try:
            while True:
                response = ahead.take(kw.get("stop")) if ahead is not None else None
                ahead = None
                if response is None:
                    try:
                        response = self.range(key, end, revision=revision, limit=pages.limit,
                                              keys_only=keys_only, **kw)
                    except EtcdError as exc:
                        size = _too_large(exc)
                        if size is None:
                            raise
                        if not pages.too_large(size, receive_limit):
                            raise EtcdError(f"a key under {prefix!r} is larger than this "
                                            f"client's receive limit of {receive_limit} bytes",
                                            code=exc.code, details=exc.details) from exc
                        log.info("a page of %r was too large (%s); reading %d keys a page",
                                 prefix, exc.details, pages.limit)
                        continue
                revision = response.header.revision if revision == 0 else revision
                pages.observe(len(response.kvs), response.ByteSize())
                more = response.more and len(response.kvs) > 0
                if more:
                    key = response.kvs[-1].key + b"\0"
                    ahead = self._read_ahead(rpc.RangeRequest(
                        key=key, range_end=end, revision=revision, limit=pages.limit,
                        keys_only=keys_only))
                yield revision, list(response.kvs)
                if not more:
                    return
        finally:
            if ahead is not None:
                ahead.cancel()

    def _read_ahead(self, request: rpc.RangeRequest) -> _ReadAhead | None:
        """Send the next page's request now, while the caller works through this one."""
        if self._credentials is not None:
            with self._token_lock:
                token = self._token
            if token is None:
                return None  # authenticating is for the call proper
        else:
            token = None
        try:
            future = self._kv.Range.on(self._conn.link()).future(
                request, timeout=self.request_timeout, metadata=self._metadata(token))
        except grpc.RpcError:
            return None
        return _ReadAhead(future)

    def list_prefix(self, prefix: bytes, *, revision: int = 0,
                    **kw: Any) -> tuple[int, list[Any]]:
        """Every key under ``prefix`` at one revision, read page by page: ``(revision, kvs)``."""
        kvs: list[Any] = []
        for revision, page in self.iter_prefix(prefix, revision=revision, **kw):
            kvs.extend(page)
        return revision, kvs

    # -- leases ----------------------------------------------------------------------------------

    def lease_grant(self, ttl: int, **kw: Any) -> tuple[int, int]:
        """Grant a lease; returns ``(lease id, granted ttl)``."""
        response = self.call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl), "lease grant",
                             **kw)
        if response.error:
            raise EtcdError(f"etcd lease grant failed: {response.error}", details=response.error)
        return response.ID, response.TTL

    def lease_revoke(self, lease_id: int, **kw: Any) -> None:
        try:
            self.call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id), "lease revoke",
                      **kw)
        except EtcdError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise

    def keepalive(self, lease_id: int) -> KeepAliveStream:
        return KeepAliveStream(self, lease_id)

    def watch(self, key: bytes, range_end: bytes, start_revision: int,
              on_progress: Callable[[int], None] | None = None) -> WatchStream:
        return WatchStream(self, key, range_end, start_revision, on_progress)


#: What a ``settle`` callback of :meth:`EtcdClient.call` returns to have the request sent again.
RESEND = object()


# -- streams --------------------------------------------------------------------------------------


class _RequestQueue:
    """The request side of a bidirectional stream: gRPC's own thread drains it, so it must be
    closed when the stream ends, or that thread waits on it forever."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item


#: ``WatchCreateRequest.fragment = true`` (field 8, etcd >= 3.4; the ``etcd3`` package's protos
#: predate it): etcd then splits a response larger than its request limit into fragments instead
#: of sending one message no receive limit may fit (a replay of many large events).
_FRAGMENT_REQUEST = b"\x40\x01"
#: ``WatchResponse.fragment`` (field 7), likewise unknown to those protos.
_FRAGMENT_FIELD = 7


def _is_fragment(response: rpc.WatchResponse) -> bool:
    """Whether more of the same response follows in the next message."""
    return any(field.field_number == _FRAGMENT_FIELD and field.data
               # the stub lacks __iter__: iteration goes through __getitem__ and __len__
               for field in unknown_fields.UnknownFieldSet(response))  # type: ignore[attr-defined]


def _stream_ended(exc: grpc.RpcError) -> bool:
    """Whether a stream was ended under us (cancelled, or reset by a server shutting down) rather
    than refused: resuming it is safe."""
    code = exc.code()
    return code == grpc.StatusCode.CANCELLED or (
        code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (exc.details() or ""))


class WatchStream:
    """One ``Watch`` RPC on ``[key, range_end)`` from ``start_revision``, resumed on failure.

    Iterating yields lists of events (``mvccpb.Event``), each list from one watch response
    (a response etcd splits into fragments is put together again first), and reconnects by itself
    (with backoff, on the next endpoint if the member failed) after the stream breaks, from the
    revision after the last one it delivered. It raises :class:`Compacted` when the revision to
    resume from is gone, and ends once :meth:`cancel` was called.

    :param on_progress: called on the reading thread with the revision of each progress
        notification (every event up to it was delivered, and consumed by the reader, since
        the iteration resumes only once the reader is done with the last batch); see
        :meth:`request_progress`.
    :ivar next_revision: the revision the stream would resume from.
    """

    def __init__(self, client: EtcdClient, key: bytes, range_end: bytes, start_revision: int,
                 on_progress: Callable[[int], None] | None = None):
        self._client = client
        self._key, self._range_end = key, range_end
        self.next_revision = start_revision
        self._on_progress = on_progress
        # Guards _call and _requests: cancel() may run on another thread than the reader.
        self._lock = threading.Lock()
        self._call: Any = None  # the grpc stream call
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

    def request_progress(self) -> None:
        """Ask etcd for a progress notification (any thread): once this stream has delivered
        everything up to etcd's current revision, ``on_progress`` hears that revision. A
        stream that is not open (reconnecting) asks nothing; ask again later."""
        with self._lock:
            requests = self._requests
        if requests is not None:
            requests.put(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    def _open(self, link: Link,
              metadata: Sequence[tuple[str, str]]) -> tuple[object, _RequestQueue] | None:
        requests = _RequestQueue()
        create = rpc.WatchCreateRequest(key=self._key, range_end=self._range_end,
                                        start_revision=self.next_revision, progress_notify=True)
        create.MergeFromString(_FRAGMENT_REQUEST)
        requests.put(rpc.WatchRequest(create_request=create))
        call = link.stubs["Watch"].Watch(iter(requests), metadata=metadata)
        with self._lock:
            if self._cancelled.is_set():
                requests.close()
                call.cancel()
                return None
            self._call, self._requests = call, requests
        return call, requests

    def __iter__(self) -> Iterator[list[Any]]:
        backoff = Backoff()
        client = self._client
        while not self._cancelled.is_set():
            link = requests = token = None
            try:
                retry = _Retry(None, self._cancelled, client.request_timeout, False)
                token = client._token_for(retry)
                link = client._conn.link()
                opened = self._open(link, client._metadata(token))
                if opened is None:
                    return
                call, requests = opened
                yield from self._read(call, token)
            except Stopped:
                return
            except grpc.RpcError as exc:
                _scrub(exc)
                if self._cancelled.is_set():
                    return
                if link is not None:
                    client._conn.failed(link, exc, None)
                if is_token_error(exc):
                    client._token_refused(token)
                elif not is_transient(exc) and not _stream_ended(exc):
                    client.metrics.etcd_error(_code_name(exc))
                    raise wrap_rpc_error(exc, "watch") from exc
                client.metrics.etcd_retry(_code_name(exc))
                log.debug("watch on %r broke (%s); resuming from revision %d",
                          self._key, exc.code(), self.next_revision)
            finally:
                if requests is not None:
                    requests.close()  # or gRPC's thread feeding this stream waits forever
            if self._cancelled.wait(backoff.next_delay()):
                return

    def _read(self, call: Any, token: str | None) -> Iterator[list[Any]]:
        fragments: list[Any] = []
        for response in call:
            if response.compact_revision:
                raise Compacted(response.compact_revision)
            if response.canceled:
                if "permission denied" in response.cancel_reason:
                    # also what etcd says to a token older than the last change of users or
                    # roles: the next attempt (or listing) authenticates again
                    self._client._token_refused(token)
                raise EtcdError(f"etcd cancelled the watch: {response.cancel_reason}",
                                details=response.cancel_reason)
            if _is_fragment(response):
                fragments.extend(response.events)
                continue
            events = fragments + list(response.events) if fragments else list(response.events)
            fragments = []
            if events:
                self.next_revision = events[-1].kv.mod_revision + 1
                yield events
            elif not response.created:
                # A progress notification: everything up to header.revision was sent.
                self.next_revision = max(self.next_revision, response.header.revision + 1)
                if self._on_progress is not None:
                    self._on_progress(response.header.revision)


class KeepAliveStream:
    """A ``LeaseKeepAlive`` stream for one lease.

    :meth:`send` asks for one renewal (any thread); iterating yields ``(sent_at, ttl)`` per
    answer, where ``sent_at`` is the ``time.monotonic()`` of the request it answers and ``ttl``
    the lease's remaining seconds (0: the lease is gone). The iteration raises the
    ``grpc.RpcError`` that broke the stream, and ends after :meth:`cancel`.

    A renewal not answered within :data:`KEEPALIVE_ANSWER_TIMEOUT` seconds (a frozen member: its
    TCP connection stays open) counts as a failure of its member: the connection moves on to
    the next endpoint and the stream breaks, so that the caller opens it again there before the
    lease runs out.
    """

    def __init__(self, client: EtcdClient, lease_id: int):
        self._client = client
        self._requests = _RequestQueue()
        self._lease_id = lease_id
        # Monotonic send times of unanswered requests, oldest first; etcd answers in order.
        self._sent: queue.SimpleQueue[float] = queue.SimpleQueue()
        # Guards _answered and _timer: the count of answers, and the watchdog of the last send.
        self._lock = threading.Lock()
        self._answered = 0
        self._requested = 0
        self._timer: threading.Timer | None = None
        self._link = client._conn.link()
        self._call = self._link.stubs["Lease"].LeaseKeepAlive(iter(self._requests),
                                                              metadata=client.metadata())

    def send(self) -> None:
        self._sent.put(time.monotonic())
        if self._client._conn.size > 1:  # with one member, a late answer is still the best hope
            self._watch_answer()
        self._requests.put(rpc.LeaseKeepAliveRequest(ID=self._lease_id))

    def _watch_answer(self) -> None:
        timer = threading.Timer(KEEPALIVE_ANSWER_TIMEOUT, self._overdue)
        timer.daemon = True
        timer.name = "etcdcron-keepalive-watchdog"
        with self._lock:
            self._requested += 1
            timer.args = (self._requested,)
            previous, self._timer = self._timer, timer
        if previous is not None:
            previous.cancel()
        timer.start()

    def _overdue(self, request: int) -> None:
        with self._lock:
            if self._answered >= request:
                return
        error = _Overdue(f"no answer to a lease keepalive within {KEEPALIVE_ANSWER_TIMEOUT}s")
        self._client._conn.failed(self._link, error, KEEPALIVE_ANSWER_TIMEOUT)
        self._call.cancel()

    def cancel(self) -> None:
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._requests.close()
        self._call.cancel()

    def __iter__(self) -> Iterator[tuple[float, int]]:
        try:
            for response in self._call:
                with self._lock:
                    self._answered += 1
                try:
                    sent_at = self._sent.get_nowait()
                except queue.Empty:
                    sent_at = time.monotonic()
                yield sent_at, response.TTL
        except grpc.RpcError as exc:
            _scrub(exc)
            self._client._conn.failed(self._link, exc, None)
            raise
        finally:
            self._requests.close()


class _Overdue(grpc.RpcError):
    """A keepalive answer that did not come in time (reported to the connection's failover)."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._details
