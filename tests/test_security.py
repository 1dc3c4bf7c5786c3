"""TLS and user/password auth against real etcd, with certificates and users the tests make:
options honoured or refused, tokens renewed, secrets kept out of tracebacks, members checked
against their own names, renewed certificates read again, the etcd role a namespace needs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import etcd3
import grpc
import pytest
from etcd3.etcdrpc import auth_pb2, rpc_pb2

from etcdcron import Cron, EtcdError, EtcdUnavailableError, Job, ValidationError
from etcdcron._etcd import EtcdClient, Stopped
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys, prefix_end
from etcdcron.testing import EtcdServer, free_port, wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

PASSWORD = "s3cret"  # test_cli.py uses the auth_etcd fixture with it


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Pki:
    """Certificate authorities and the certificates they sign, made with openssl in a folder."""

    def __init__(self, directory: Path):
        self.dir = directory

    def ca(self, name: str) -> Path:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN=etcdcron test CA {name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
                cwd=self.dir)
        return self.dir / f"{name}.pem"

    def cert(self, name: str, ca: str, san: str | None = None) -> tuple[Path, Path]:
        """``(certificate, key)``: a server certificate for ``san`` (e.g. ``IP:127.0.0.1``), or
        a client certificate without one."""
        usage = "serverAuth,clientAuth" if san else "clientAuth"
        (self.dir / f"{name}.ext").write_text(
            (f"subjectAltName={san}\n" if san else "") + f"extendedKeyUsage={usage}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=self.dir)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=self.dir)
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it; and
    server certificates for ``localhost`` only and for ``127.0.0.1`` only."""
    made = Pki(tmp_path_factory.mktemp("pki"))
    made.ca("ca")
    made.cert("server", "ca", "IP:127.0.0.1,DNS:localhost")
    made.cert("client", "ca")
    made.cert("by-name", "ca", "DNS:localhost")
    made.cert("by-ip", "ca", "IP:127.0.0.1")
    made.cert("other-client", "ca")
    return made.dir


def server_tls(pki: Path, name: str = "server") -> tuple[str, str, str]:
    return str(pki / f"{name}.pem"), str(pki / f"{name}.key"), str(pki / "ca.pem")


def client_tls(pki: Path) -> dict:
    return {"ca_cert": str(pki / "ca.pem"), "cert_key": str(pki / "client.key"),
            "cert_cert": str(pki / "client.pem")}


# -- options --------------------------------------------------------------------------------------


def test_tls_with_client_certificates(pki, namespace, calls):
    with EtcdServer(tls=server_tls(pki)) as etcd:
        cron = Cron(endpoints=f"https://{etcd.endpoint}", namespace=namespace, trigger=calls.add,
                    lease_ttl=5, **client_tls(pki))
        try:
            cron.start()
            assert cron.wait_elected(10)
            cron.add("secure", Job(due_time="0s"))
            calls.wait("secure", 1)
        finally:
            cron.stop()

        anonymous = Cron(endpoints=f"https://{etcd.endpoint}", namespace=namespace,
                         trigger=calls.add, ca_cert=str(pki / "ca.pem"), request_timeout=1)
        try:
            with pytest.raises(EtcdUnavailableError):  # the handshake is refused
                anonymous.get("secure")
        finally:
            anonymous.stop()


def _option_cases(pki: Path) -> list:
    ca, key, cert = str(pki / "ca.pem"), str(pki / "client.key"), str(pki / "client.pem")
    other_key = str(pki / "other-client.key")
    caller = etcd3.client(host="127.0.0.1", port=1)
    return [
        ({"cert_key": key, "ca_cert": ca}, "cert_key needs cert_cert"),
        ({"password": PASSWORD}, "password needs user"),
        ({"user": "", "password": PASSWORD}, "user must be a non-empty str"),
        ({"endpoints": ""}, "endpoints names no etcd endpoint: ''"),
        ({"endpoints": []}, r"endpoints names no etcd endpoint: \[\]"),
        ({"endpoints": " , "}, "endpoints names no etcd endpoint"),
        ({"endpoints": 2379}, "endpoints must be a str or a list of str, got 2379"),
        ({"endpoints": "https://http://127.0.0.1:2379"}, "has more than one scheme"),
        ({"endpoints": "http://https://127.0.0.1:2379"}, "has more than one scheme"),
        ({"endpoints": "unix:///run/etcd.sock"}, "has scheme 'unix://'"),
        ({"endpoints": "127.0.0.1"}, "'127.0.0.1' is not host:port"),
        ({"endpoints": "127.0.0.1:0"}, "is not host:port"),
        ({"endpoints": "127.0.0.1:65536"}, "is not host:port"),
        ({"endpoints": ":2379"}, "is not host:port"),
        ({"endpoints": "etcd:2379/v3"}, "is not host:port"),
        ({"endpoints": "user@etcd:2379"}, "is not host:port"),
        ({"endpoints": ["http://127.0.0.1:1", "https://127.0.0.1:2"]},
         "endpoints mix http:// and https://"),
        ({"endpoints": "http://127.0.0.1:2379", "ca_cert": ca},
         r"endpoints use http:// \(no TLS\) but ca_cert asks for TLS"),
        ({"ca_cert": "/no/such/ca.pem"}, "ca_cert '/no/such/ca.pem' cannot be read"),
        ({"ca_cert": key}, "holds no PEM certificate"),
        ({"ca_cert": ca, "cert_cert": cert, "cert_key": other_key},
         "are not a PEM certificate and its unencrypted private key"),
        ({"request_timeout": float("inf")}, "request_timeout must be at most"),
        ({"client": caller, "ca_cert": ca}, "give either client or ca_cert, not both"),
        ({"client": caller, "endpoints": "127.0.0.1:2379"},
         "give either client or endpoints, not both"),
        ({"client": caller, "user": "app", "password": PASSWORD},
         "give either client or user, password, not both"),
        ({"client": object()}, "etcd3 client"),
    ]


@pytest.mark.unit
def test_options_that_would_weaken_tls_or_auth_are_refused(pki):
    for options, message in _option_cases(pki):
        with pytest.raises(ValidationError, match=message) as info:
            Cron(trigger=print, namespace="ns", **options)
        assert PASSWORD not in str(info.value), options


@pytest.mark.unit
def test_a_client_certificate_without_its_key_is_refused_not_a_crash(pki):
    """gRPC aborts the whole process (a C++ check) on a certificate without its key."""
    program = (
        "from etcdcron import Cron, ValidationError\n"
        "try:\n"
        f"    cron = Cron(trigger=print, namespace='ns', endpoints='127.0.0.1:{free_port()}',\n"
        f"                ca_cert={str(pki / 'ca.pem')!r}, cert_cert={str(pki / 'client.pem')!r},\n"
        "                request_timeout=0.5)\n"
        "    cron.get('job')\n"
        "except ValidationError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: cert_cert needs cert_key" in done.stdout


# -- users and tokens -----------------------------------------------------------------------------


def admin_call(admin: EtcdClient, method: str, request) -> None:
    admin.call(getattr(admin._auth, method), request, f"auth {method}")


@contextlib.contextmanager
def auth_server(directory: Path, token_ttl: str = "2s", tls=None):
    """An etcd with auth on (user ``root``, password :data:`PASSWORD`) and JWT tokens that
    expire after ``token_ttl``; yields ``(server, admin client)``."""
    openssl("genrsa", "-out", "jwt.key", "2048", cwd=directory)
    openssl("rsa", "-in", "jwt.key", "-pubout", "-out", "jwt.pub", cwd=directory)
    token = (f"--auth-token=jwt,pub-key={directory / 'jwt.pub'},"
             f"priv-key={directory / 'jwt.key'},sign-method=RS256,ttl={token_ttl}")
    with EtcdServer(extra_args=[token], tls=tls) as etcd:
        setup = EtcdClient(etcd.endpoint)
        for method, request in [
            ("RoleAdd", rpc_pb2.AuthRoleAddRequest(name="root")),
            ("UserAdd", rpc_pb2.AuthUserAddRequest(name="root", password=PASSWORD)),
            ("UserGrantRole", rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root")),
            ("AuthEnable", rpc_pb2.AuthEnableRequest()),
        ]:
            admin_call(setup, method, request)
        setup.close()
        admin = EtcdClient(etcd.endpoint, user="root", password=PASSWORD)
        try:
            yield etcd, admin
        finally:
            admin.close()


@pytest.fixture
def auth_etcd(tmp_path):
    with auth_server(tmp_path) as (etcd, _):
        yield etcd


def add_user(admin: EtcdClient, user: str, prefix: bytes | None, *,
             perm=auth_pb2.Permission.READWRITE) -> None:
    """A user whose one role may ``perm`` the keys under ``prefix`` (none if ``None``)."""
    admin_call(admin, "RoleAdd", rpc_pb2.AuthRoleAddRequest(name=f"{user}-role"))
    if prefix is not None:
        admin_call(admin, "RoleGrantPermission", rpc_pb2.AuthRoleGrantPermissionRequest(
            name=f"{user}-role", perm=auth_pb2.Permission(
                permType=perm, key=prefix, range_end=prefix_end(prefix))))
    admin_call(admin, "UserAdd", rpc_pb2.AuthUserAddRequest(name=user, password=PASSWORD))
    admin_call(admin, "UserGrantRole", rpc_pb2.AuthUserGrantRoleRequest(user=user,
                                                                        role=f"{user}-role"))


def test_user_password_auth_renews_an_expired_token(auth_etcd, namespace, calls):
    cron = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=calls.add,
                user="root", password=PASSWORD, lease_ttl=5)
    try:
        cron.start()
        assert cron.wait_elected(10)
        cron.add("first", Job(due_time="0s"))
        calls.wait("first", 1)
        client = cron._client
        token = dict(client.metadata())["token"]
        generation = client._token_generation

        def expired() -> bool:
            try:
                client._kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=5,
                                 metadata=(("token", token),))
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        wait_until(expired, 15, interval=0.2, message="the first token to expire")
        cron.add("second", Job(due_time="0s"))  # renews the token and goes on
        calls.wait("second", 1)
        assert client._token_generation > generation
    finally:
        cron.stop()


def test_a_wrong_password_is_a_clear_error(auth_etcd, namespace):
    cron = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=print, user="root",
                password="wrong")
    try:
        with pytest.raises(EtcdError, match="authentication as 'root' failed"):
            cron.get("job")
    finally:
        cron.stop()


def test_replicas_keep_firing_through_a_change_of_users_and_roles(tmp_path, namespace, calls):
    """With JWT tokens etcd refuses every token issued before any user or role change (``auth:
    revision in header is old``); that must mean "authenticate again", not a stall."""
    with auth_server(tmp_path, token_ttl="300s") as (etcd, admin):
        add_user(admin, "app", f"{namespace}/".encode())
        replicas = [Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=calls.add,
                         user="app", password=PASSWORD, lease_ttl=5) for _ in range(2)]
        try:
            for replica in replicas:
                replica.start()
            wait_until(lambda: all(r.is_elected() for r in replicas), 20)
            replicas[0].add("tick", Job(schedule="@every 500ms"))
            calls.wait("tick", 3)

            add_user(admin, "someone-else", b"elsewhere/")  # users and roles change
            admin_call(admin, "RoleGrantPermission", rpc_pb2.AuthRoleGrantPermissionRequest(
                name="app-role", perm=auth_pb2.Permission(
                    permType=auth_pb2.Permission.READ, key=b"more/",
                    range_end=prefix_end(b"more/"))))

            replicas[1].add("after", Job(due_time="0s"))
            calls.wait("after", 1, timeout=15)
            fired = calls.count("tick")
            calls.wait("tick", fired + 6, timeout=15)
        finally:
            for replica in replicas:
                replica.stop()


def test_an_authenticated_etcd3_client_is_refused_with_a_clear_message(auth_etcd, namespace):
    host, port = auth_etcd.endpoint.split(":")
    existing = etcd3.client(host=host, port=int(port), user="root", password=PASSWORD)
    try:
        with pytest.raises(ValidationError, match="authenticated as a user.*could not renew"):
            Cron(client=existing, namespace=namespace, trigger=print)
    finally:
        existing.close()


def _exceptions(exc: BaseException):
    seen, stack = set(), [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__]


def _shown(value, depth: int = 1):
    """What an error tracker could show of a local: its repr, and one level inside it."""
    yield repr(value)
    if depth <= 0:
        return
    if isinstance(value, dict):
        inner = list(value.keys()) + list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        inner = list(value)
    else:
        inner = list(getattr(value, "__dict__", {}).values())
    for item in inner:
        yield from _shown(item, depth - 1)


def secrets_in_tracebacks(exc: BaseException, secrets: list[str]) -> list[str]:
    """``frame:local`` of every traceback frame of ``exc`` and of the exceptions chained to it
    (but the test's own) whose local shows one of ``secrets``."""
    found = []
    for error in _exceptions(exc):
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_filename != __file__:
                for name, value in frame.f_locals.items():
                    if any(secret in text for text in _shown(value) for secret in secrets):
                        found.append(f"{frame.f_code.co_name}:{name} ({type(error).__name__})")
            tb = tb.tb_next
    return found


def test_no_credential_reaches_a_traceback_frame(auth_etcd, namespace):
    # a refused password
    wrong = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=print, user="root",
                 password=PASSWORD + "-wrong")
    try:
        with pytest.raises(EtcdError) as info:
            wrong.get("job")
        assert secrets_in_tracebacks(info.value, [PASSWORD]) == []
    finally:
        wrong.stop()

    cron = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=print, user="root",
                password=PASSWORD, request_timeout=1)
    fresh = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=print, user="root",
                 password=PASSWORD, request_timeout=1)
    try:
        cron.get("job")
        token = str(cron._client._token)
        assert len(token) > 20
        auth_etcd.stop()
        # an outage with a token in hand, and one while authenticating
        for crud in (cron, fresh):
            with pytest.raises(EtcdUnavailableError) as info:
                crud.add("job", Job(due_time="1h"))
            assert secrets_in_tracebacks(info.value, [PASSWORD, token]) == []
    finally:
        auth_etcd.start()
        cron.stop()
        fresh.stop()


def _authenticating() -> bool:
    """Whether some thread is inside etcdcron's ``Authenticate`` call."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "_authenticate":
                return True
            frame = frame.f_back
    return False


def test_authentication_honours_each_callers_deadline_and_stop(auth_etcd, namespace):
    client = EtcdClient(auth_etcd.endpoint, user="root", password=PASSWORD, request_timeout=10)
    # connect first (on the shared connection, with no token), so that Authenticate hangs once
    # etcd is frozen
    anonymous = EtcdClient(auth_etcd.endpoint)
    anonymous.call(anonymous._maintenance.Status, rpc_pb2.StatusRequest(), "status")
    auth_etcd.pause()
    first = threading.Thread(target=lambda: client.get(b"k"), daemon=True)  # waits, then works
    try:
        first.start()
        wait_until(_authenticating, 5, message="a thread to be authenticating")

        # a second caller waits for that token only as long as its own deadline allows
        start = time.monotonic()
        with pytest.raises(EtcdUnavailableError):
            client.get(b"k", deadline=time.monotonic() + 1)
        assert time.monotonic() - start < 2.5

        # and a stopped one gives up at once
        stop = threading.Event()
        outcome: list = []

        def stopped_caller():
            try:
                client.get(b"k", stop=stop, forever=True)
            except Stopped:
                outcome.append(time.monotonic())

        caller = threading.Thread(target=stopped_caller, daemon=True)
        caller.start()
        stopped_at = time.monotonic()
        stop.set()
        caller.join(5)
        assert outcome and outcome[0] - stopped_at < 1.0

        # so does a Cron whose threads were authenticating when it is stopped
        cron = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=print,
                    user="root", password=PASSWORD, lease_ttl=5)
        cron.start()
        wait_until(_authenticating, 5)
        start = time.monotonic()
        cron.stop(timeout=5)
        assert time.monotonic() - start < 5
    finally:
        auth_etcd.resume()
        first.join(15)
        client.close()
        anonymous.close()


def test_a_namespace_needs_only_readwrite_on_its_prefix(tmp_path, namespace, calls):
    """The role documented in docs/security.rst: readwrite on ``NS/``, nothing else; leases
    need no key permission."""
    with auth_server(tmp_path, token_ttl="300s") as (etcd, admin):
        add_user(admin, "app", f"{namespace}/".encode())
        add_user(admin, "reader", f"{namespace}/".encode(), perm=auth_pb2.Permission.READ)
        add_user(admin, "nobody", None)

        cron = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=calls.add,
                    user="app", password=PASSWORD, lease_ttl=5, counter_gc_interval=0.5)
        try:
            cron.start()
            assert cron.wait_elected(10)
            cron.add("once", Job(due_time="0s"))
            cron.add("twice", Job(schedule="@every 300ms", repeats=2))
            cron.add_if_not_exists("later", Job(due_time="1h"))
            calls.wait("once", 1)
            calls.wait("twice", 2)
            assert [j.name for j in cron.list()] == ["later"]
            cron.delete_prefixes("la")
            assert cron.list() == []
            orphan = Keys(namespace).counter("orphan")
            admin.put(orphan, stored_pb2.Counter(count=1).SerializeToString())
            wait_until(lambda: admin.get(orphan) is None, 10, message="the GC to delete it")
        finally:
            cron.stop()  # revokes the lease, deleting the leadership key
        assert admin.list_prefix(f"{namespace}/".encode())[1] == []

        reader = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=print,
                      user="reader", password=PASSWORD)
        try:
            assert reader.list() == []
            with pytest.raises(EtcdError, match="PERMISSION_DENIED"):
                reader.add("job", Job(due_time="1h"))
        finally:
            reader.stop()

        nobody = EtcdClient(etcd.endpoint, user="nobody", password=PASSWORD)
        try:
            lease_id, _ = nobody.lease_grant(10)
            stream = nobody.keepalive(lease_id)
            stream.send()
            assert next(iter(stream))[1] > 0
            stream.cancel()
            nobody.lease_revoke(lease_id)
            with pytest.raises(EtcdError, match="PERMISSION_DENIED"):
                nobody.get(f"{namespace}/jobs/x".encode())
        finally:
            nobody.close()


# -- TLS with several members ---------------------------------------------------------------------


@contextlib.contextmanager
def tls_cluster(pki: Path, certificates: list[str]):
    """A cluster of one member per server certificate name, each serving clients over TLS with
    its own certificate (peers in plain text)."""
    peers = [free_port() for _ in certificates]
    initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peers))
    members = [EtcdServer(name=f"m{i}", peer_port=p, initial_cluster=initial,
                          cluster_token=f"tls-{peers[0]}", tls=server_tls(pki, cert))
               for i, (p, cert) in enumerate(zip(peers, certificates))]
    try:
        for member in members:
            member.start(wait=False)
        yield members
    finally:
        for member in members:
            member.close()


def test_tls_checks_each_member_against_its_own_name_or_address(pki, namespace):
    with tls_cluster(pki, ["by-name", "by-ip", "by-ip"]) as (named, first_ip, second_ip):
        tls = client_tls(pki)
        by_name = f"https://localhost:{named.client_port}"
        cron = Cron(endpoints=[by_name, f"https://127.0.0.1:{first_ip.client_port}"],
                    namespace=namespace, trigger=print, request_timeout=20, **tls)
        by_ip = EtcdClient([f"https://127.0.0.1:{first_ip.client_port}",
                            f"https://127.0.0.1:{second_ip.client_port}"], **tls)
        wrong = EtcdClient(f"https://127.0.0.1:{named.client_port}", request_timeout=2, **tls)
        try:
            wait_until(lambda: _answers(cron), 60, interval=0.5, message="the cluster to serve")
            assert by_ip.put(b"several-ip-endpoints", b"work").header.revision > 0
            # the first member's certificate names localhost only: not good for its address
            with pytest.raises(EtcdUnavailableError):
                wrong.get(b"x")

            # one client, each member checked against its own endpoint's name
            for stop, expected in [(named, "127.0.0.1"), (first_ip, "localhost")]:
                for member in (named, first_ip):
                    if member is not stop and not member.running():
                        member.start(wait=False)
                stop.kill()
                cron.add(f"via-{expected}", Job(due_time="1h"))
                assert cron._client.endpoint.host == expected
        finally:
            cron.stop()
            by_ip.close()
            wrong.close()


def _answers(cron: Cron) -> bool:
    try:
        cron.get("probe")
    except EtcdError:
        return False
    return True


def test_renewed_certificates_are_read_again_on_reconnect(tmp_path, namespace, calls, caplog):
    """Every certificate is replaced (a new CA too) while a Cron runs: the client files are
    rewritten in place, and etcd restarts with its new ones. The running Cron goes on."""
    pki = Pki(tmp_path)
    for generation in ("old", "new"):
        pki.ca(f"ca-{generation}")
        pki.cert(f"server-{generation}", f"ca-{generation}", "IP:127.0.0.1")
        pki.cert(f"client-{generation}", f"ca-{generation}")
    live = tmp_path / "live"
    live.mkdir()

    def install(generation: str) -> None:  # as a certificate manager would: write, rename
        for source, target in [(f"ca-{generation}.pem", "ca.pem"),
                               (f"client-{generation}.pem", "client.pem"),
                               (f"client-{generation}.key", "client.key")]:
            (live / (target + ".tmp")).write_bytes((tmp_path / source).read_bytes())
            os.replace(live / (target + ".tmp"), live / target)

    def served_by(generation: str) -> tuple[str, str, str]:
        return (str(tmp_path / f"server-{generation}.pem"),
                str(tmp_path / f"server-{generation}.key"), str(tmp_path / f"ca-{generation}.pem"))

    install("old")
    with EtcdServer(tls=served_by("old")) as etcd:
        cron = Cron(endpoints=f"https://{etcd.endpoint}", namespace=namespace, trigger=calls.add,
                    lease_ttl=5, ca_cert=str(live / "ca.pem"), cert_key=str(live / "client.key"),
                    cert_cert=str(live / "client.pem"))
        try:
            cron.start()
            assert cron.wait_elected(10)
            cron.add("tick", Job(schedule="@every 300ms"))
            calls.wait("tick", 2)

            # half way through a renewal: a key that is not the certificate's is not taken
            (live / "client.key").write_bytes((tmp_path / "client-new.key").read_bytes())
            etcd.stop()
            with pytest.raises(EtcdUnavailableError):  # the connection fails: it will reconnect
                cron._client.get(b"probe", deadline=time.monotonic() + 1.5)
            etcd.start()
            wait_until(lambda: _answers(cron), 30, interval=0.2,
                       message="the Cron to reconnect with the files it read before")
            assert "keeping the ones read before" in caplog.text

            install("new")
            etcd.tls = served_by("new")
            etcd.restart()  # the old certificates are worthless now

            wait_until(lambda: _answers(cron), 30, interval=0.2,
                       message="the Cron to connect with the new certificates")
            fired = calls.count("tick")
            calls.wait("tick", fired + 3, timeout=30)
        finally:
            cron.stop()
