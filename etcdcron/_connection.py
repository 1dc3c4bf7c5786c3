"""Connections to etcd: the validated connection options, TLS files, and one gRPC channel per
endpoint with failover between them, shared by every client of the process.

Runs on the callers' threads (any thread); holds no thread of its own. Used by
:mod:`etcdcron._etcd` only.

One channel per endpoint, and calls go to one endpoint at a time (the first, at first). An
attempt that fails as if that member were gone, frozen or cut off from its peers
(``UNAVAILABLE``, a ``DEADLINE_EXCEEDED`` of a whole attempt) moves every call and stream on to
the next endpoint, and retires the failed endpoint's channel: the next use of that endpoint
opens a new one, which resolves its host name again and reads the TLS files again (renewed
certificates are picked up on reconnect). Each channel checks its member's certificate against
that member's own host name or address.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import ssl
import threading
import time
from typing import Any, cast

import grpc
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from etcdcron import options
from etcdcron.errors import EtcdError, ValidationError

__all__ = [
    "Endpoint",
    "ConnectionSpec",
    "Connection",
    "Link",
    "Method",
    "Service",
    "Secret",
    "Token",
    "parse_endpoint",
    "check_credentials",
    "check_timeout",
    "connections",
    "open_channel",
    "read_tls",
]

log = logging.getLogger(__name__)

#: The largest message a channel accepts. A watch replay after a long outage, or a big page of a
#: listing, can exceed gRPC's 4 MiB default; listings also shrink their pages to fit it.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
#: How often a channel with calls or streams in flight pings etcd to notice a dead or frozen
#: member. etcd refuses pings more often than its ``--grpc-keepalive-min-time`` (default 5 s)
#: and any ping on a connection without streams (it answers both with ``GOAWAY
#: too_many_pings``), so pings are sent only while something is in flight, and not more often
#: than every 10 s.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
#: A channel is retired after a failure only if it is at least this old (seconds), so that many
#: threads failing together retire it once, not in a storm.
_MIN_LINK_AGE = 1.0
#: Codes that say the member itself is unusable now (gone, frozen, without a leader).
_MEMBER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}



# -- options ---------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str
    port: int

    @property
    def target(self) -> str:
        """The gRPC target: the host name itself, so gRPC resolves it (again on reconnect) and
        checks the certificate against it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.target


def parse_endpoint(text: object) -> tuple[Endpoint, str | None]:
    """``(endpoint, scheme)`` of ``host:port``, ``http://host:port`` or ``https://host:port``
    (``scheme`` is ``None`` without one).

    :raises ValidationError: naming the endpoint and what is wrong with it.
    """
    if not isinstance(text, str):
        raise ValidationError(f"etcd endpoint must be a str, got {text!r}")
    rest = text.strip()
    scheme = None
    match = _SCHEME.match(rest)
    if match:
        scheme = match.group(1).lower()
        rest = rest[match.end():]
        if scheme not in ("http", "https"):
            raise ValidationError(f"etcd endpoint {text!r} has scheme {scheme + '://'!r}; "
                                  "use http://, https:// or none")
        if "://" in rest:
            raise ValidationError(f"etcd endpoint {text!r} has more than one scheme")
    rest = rest[:-1] if rest.endswith("/") else rest
    if rest.startswith("["):
        host, bracket, port = rest[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValidationError(f"etcd endpoint {text!r} is not host:port ([v6 address]:port)")
        port = port[1:]
        valid_host = bool(host) and all(c in "0123456789abcdefABCDEF:." for c in host)
    else:
        host, _, port = rest.rpartition(":")
        valid_host = bool(_HOST.match(host))
    if not valid_host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"etcd endpoint {text!r} is not host:port (or http://host:port, "
                              "https://host:port)")
    return Endpoint(host, int(port)), scheme


def _path_option(name: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{name} must be the path of a PEM file, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ConnectionSpec:
    """What a connection is made of; clients with equal specs share one in a process.

    Build it with :meth:`parse`, which checks everything that can be checked without etcd.
    """

    endpoints: tuple[Endpoint, ...]
    tls: bool
    ca_cert: str | None = None
    cert_key: str | None = None
    cert_cert: str | None = None
    # Channel settings: the module's when the spec is parsed.
    max_receive_bytes: int = 4 << 20
    keepalive_time_ms: int = 10_000

    @classmethod
    def parse(cls, endpoints: object, ca_cert: object = None, cert_key: object = None,
              cert_cert: object = None) -> ConnectionSpec:
        """:raises ValidationError: if an option is invalid or contradicts another."""
        if isinstance(endpoints, str):
            items = [e for e in endpoints.split(",") if e.strip()]
        elif isinstance(endpoints, (list, tuple)):
            items = list(endpoints)
        else:
            raise ValidationError(f"endpoints must be a str or a list of str, got {endpoints!r}")
        if not items:
            raise ValidationError(f"endpoints names no etcd endpoint: {endpoints!r}")
        parsed = [parse_endpoint(item) for item in items]
        schemes = {scheme for _, scheme in parsed if scheme is not None}
        if len(schemes) > 1:
            raise ValidationError(f"endpoints mix http:// and https://: {endpoints!r}")
        ca_cert = _path_option("ca_cert", ca_cert)
        cert_key = _path_option("cert_key", cert_key)
        cert_cert = _path_option("cert_cert", cert_cert)
        if (cert_key is None) != (cert_cert is None):
            given, missing = ("cert_key", "cert_cert") if cert_cert is None else ("cert_cert",
                                                                                   "cert_key")
            raise ValidationError(f"{given} needs {missing}: a client certificate takes both "
                                  "the key and the certificate")
        files = [n for n, v in (("ca_cert", ca_cert), ("cert_key", cert_key),
                                ("cert_cert", cert_cert)) if v is not None]
        if schemes == {"http"} and files:
            raise ValidationError(f"endpoints use http:// (no TLS) but {', '.join(files)} "
                                  f"asks for TLS: use https:// endpoints, or drop the TLS files")
        tls = schemes == {"https"} or bool(files)
        unique = tuple(dict.fromkeys(endpoint for endpoint, _ in parsed))
        spec = cls(unique, tls, ca_cert, cert_key, cert_cert, MAX_RECEIVE_BYTES, KEEPALIVE_TIME_MS)
        if tls:
            read_tls(spec)  # fail now, not on the first call
        return spec


def read_tls(spec: ConnectionSpec) -> tuple[bytes | None, bytes | None, bytes | None]:
    """``(CA, key, certificate)`` PEM bytes of ``spec``, read now and checked.

    :raises ValidationError: naming the option whose file is missing, unreadable, not PEM, or a
        key that does not belong to its certificate.
    """
    def read(name: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise ValidationError(f"{name} {path!r} cannot be read: {exc.strerror}") from None

    ca, key, cert = (read("ca_cert", spec.ca_cert), read("cert_key", spec.cert_key),
                     read("cert_cert", spec.cert_cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValidationError(f"ca_cert {spec.ca_cert!r} holds no PEM certificate "
                                  f"({exc})") from None
    if cert is not None:
        try:  # the key must be unencrypted (gRPC cannot ask for a passphrase)
            # cert was read from spec.cert_cert, so that path is set
            context.load_cert_chain(cast(str, spec.cert_cert), spec.cert_key, password=lambda: b"")
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise ValidationError(
                f"cert_cert {spec.cert_cert!r} and cert_key {spec.cert_key!r} are not a PEM "
                f"certificate and its unencrypted private key ({exc})") from None
    return ca, key, cert


class Secret:
    """A user name and password; ``repr()`` shows the user only."""

    __slots__ = ("user", "_password")

    def __init__(self, user: str, password: str):
        self.user = user
        self._password = password

    def request(self) -> rpc.AuthenticateRequest:
        return rpc.AuthenticateRequest(name=self.user, password=self._password)

    def __repr__(self) -> str:
        return f"<credentials of {self.user!r}>"


class Token(str):
    """An auth token; ``repr()`` (of it, or of metadata holding it) does not show it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<etcd auth token>"


def check_credentials(user: object, password: object) -> Secret | None:
    """The credentials, or ``None`` without ``user``. A user without a password authenticates
    with an empty one (which etcd refuses, loudly, unless that user has one)."""
    if user is None:
        if password is not None:
            raise ValidationError("password needs user: give the etcd user name too")
        return None
    if not isinstance(user, str) or not user:
        raise ValidationError(f"user must be a non-empty str, got {user!r}")
    if password is not None and not isinstance(password, str):
        raise ValidationError("password must be a str")
    return Secret(user, password or "")


def check_timeout(value: object) -> float:
    return options.seconds("request_timeout", value, 0.001)


# -- channels and failover ------------------------------------------------------------------------


def open_channel(endpoint: Endpoint, spec: ConnectionSpec,
                  material: tuple[bytes | None, bytes | None, bytes | None] | None) -> grpc.Channel:
    """A new channel to one member, with TLS ``material`` ``(CA, key, certificate)``."""
    options = [
        # Reconnect quickly after etcd comes back (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # gRPC takes this as the time a connection attempt (TCP, TLS, HTTP/2) may take: it must
        # fit a slow link, as every new channel starts with it (100 ms never connected through
        # 0.3 s of latency).
        ("grpc.min_reconnect_backoff_ms", 5000),
        # Within etcd's keepalive enforcement: no pings without streams, none too often.
        ("grpc.keepalive_time_ms", spec.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),  # keep probing a quiet watch
        ("grpc.max_receive_message_length", spec.max_receive_bytes),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ]
    if not spec.tls:
        return grpc.insecure_channel(endpoint.target, options=options)
    assert material is not None  # Connection._tls_material reads it for every TLS spec
    credentials = grpc.ssl_channel_credentials(*material)
    return grpc.secure_channel(endpoint.target, credentials, options=options)


class Link:
    """One channel to one endpoint, with its stubs. ``retired`` once a newer one replaced it."""

    def __init__(self, index: int, endpoint: Endpoint | None, channel: grpc.Channel, owned: bool):
        self.index = index
        self.endpoint = endpoint
        self.channel = channel
        self.owned = owned
        self.opened = time.monotonic()
        self.retired = False
        self.stubs = {
            "KV": rpc_grpc.KVStub(channel),
            "Watch": rpc_grpc.WatchStub(channel),
            "Lease": rpc_grpc.LeaseStub(channel),
            "Auth": rpc_grpc.AuthStub(channel),
            "Maintenance": rpc_grpc.MaintenanceStub(channel),
            "Cluster": rpc_grpc.ClusterStub(channel),
        }

    def retire(self) -> None:
        self.retired = True
        if self.owned:
            self.channel.close()

    def __repr__(self) -> str:
        return f"<link to {self.endpoint or 'a caller channel'}{' (retired)' if self.retired else ''}>"


class Connection:
    """The channels of one endpoint list, used one endpoint at a time, with failover.

    :param channel: wrap this channel (of a caller's client) instead: one endpoint, never
        retired or closed here.
    """

    def __init__(self, spec: ConnectionSpec | None, channel: grpc.Channel | None = None):
        self.spec = spec
        # Guards _links, _current and _closed. A link is opened outside it (it reads files).
        self._lock = threading.Lock()
        self._closed = False
        self._current = 0
        # The TLS files as last read and found good (read again for every new link).
        self._material: tuple[bytes | None, bytes | None, bytes | None] | None = None
        if channel is not None:
            self._links: list[Link | None] = [Link(0, None, channel, owned=False)]
        else:
            # a spec is given when no channel is
            self._links = [None] * len(cast(ConnectionSpec, spec).endpoints)

    @property
    def size(self) -> int:
        return len(self._links)

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint calls go to now (``None`` for a caller's channel)."""
        return self.spec.endpoints[self._current] if self.spec else None

    def link(self) -> Link:
        """The link to use now, opened if need be.

        :raises EtcdError: if the connection is closed, or its TLS files became unusable.
        """
        with self._lock:
            if self._closed:
                raise EtcdError("this etcd client is closed")
            index = self._current
            link = self._links[index]
            if link is not None:
                return link
        # a caller's channel is never dropped from _links: only a spec's endpoints are opened
        assert self.spec is not None
        endpoint = self.spec.endpoints[index]
        fresh: Link | None = Link(index, endpoint,
                                  open_channel(endpoint, self.spec, self._tls_material()),
                                  owned=True)
        with self._lock:
            link = self._links[index]
            if link is None and not self._closed:
                self._links[index] = link = fresh
                fresh = None
        if fresh is not None:
            fresh.retire()
        if link is None:
            raise EtcdError("this etcd client is closed")
        return link

    def _tls_material(self) -> tuple[bytes | None, bytes | None, bytes | None] | None:
        """The TLS files read now (renewed certificates are taken up on reconnect); if they cannot
        be used (half rewritten, say), the ones read before, with a warning."""
        assert self.spec is not None  # only link() calls it, to open a link of the spec
        if not self.spec.tls:
            return None
        try:
            self._material = read_tls(self.spec)
        except ValidationError as exc:
            if self._material is None:
                raise EtcdError(f"cannot connect to etcd: {exc}") from exc
            log.warning("etcd TLS files cannot be used now (%s); keeping the ones read before",
                        exc)
        return self._material

    def failed(self, link: Link, exc: grpc.RpcError, attempt_timeout: float | None) -> None:
        """``link`` failed with ``exc``: if that says its member is unusable, move on to the next
        endpoint and retire the link (its streams and calls end and start again elsewhere)."""
        code = exc.code()
        if code not in _MEMBER_CODES or not link.owned:
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # Only a whole attempt running out says something about the member, and a single
            # member is not left for a slow answer.
            if self.size == 1 or attempt_timeout is None or attempt_timeout < 1.0:
                return
        with self._lock:
            if self._closed or self._links[link.index] is not link:
                return  # already handled
            if time.monotonic() - link.opened < _MIN_LINK_AGE and self.size == 1:
                return
            self._links[link.index] = None
            if self._current == link.index:
                self._current = (link.index + 1) % self.size
            assert self.spec is not None  # an owned link is one of the spec's endpoints
            following = self.spec.endpoints[self._current]
        if self.size > 1:
            log.info("etcd %s failed (%s: %s); using %s from now on", link.endpoint, code.name,
                     exc.details(), following)
        link.retire()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = [link for link in self._links if link is not None]
        for link in links:
            link.retire()

    @property
    def channel(self) -> grpc.Channel:
        """The current channel (for tests and callers that want it as is)."""
        with self._lock:
            link = self._links[self._current] or next(
                (x for x in self._links if x is not None), None)
        return link.channel if link is not None else self.link().channel


class ConnectionPool:
    """One :class:`Connection` per (process, spec), shared by every client of the process.

    A process that runs several :class:`~etcdcron.Cron` (threads of a web worker, tests) then
    holds one set of connections and one gRPC polling thread instead of one per Cron.
    Connections are reference counted, and keyed by process id too, so a forked child never
    uses its parent's.
    """

    def __init__(self) -> None:
        # Guards _entries: key -> [connection, users].
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, ConnectionSpec], list[Any]] = {}

    def acquire(self, spec: ConnectionSpec) -> Connection:
        key = (os.getpid(), spec)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [Connection(spec), 0]
            entry[1] += 1
            return cast(Connection, entry[0])

    def release(self, connection: Connection) -> None:
        with self._lock:
            for key, entry in self._entries.items():
                if entry[0] is connection:
                    entry[1] -= 1
                    if entry[1] == 0:
                        del self._entries[key]
                        break
                    return
            else:
                return
        connection.close()


connections = ConnectionPool()


class Method:
    """A unary or streaming RPC by name, called on whatever link is current."""

    __slots__ = ("_conn", "service", "name")

    def __init__(self, conn: Connection, service: str, name: str):
        self._conn = conn
        self.service = service
        self.name = name

    def on(self, link: Link) -> Any:
        return getattr(link.stubs[self.service], self.name)

    def __call__(self, request: Any, **kw: Any) -> Any:
        return self.on(self._conn.link())(request, **kw)


class Service:
    """``client._kv.Range`` and the like: the RPCs of one etcd service."""

    def __init__(self, conn: Connection, service: str):
        self._conn = conn
        self._service = service

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return Method(self._conn, self._service, name)
