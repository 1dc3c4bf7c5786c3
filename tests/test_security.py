"""TLS with client certificates, and user/password auth whose token expires and is renewed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2

from etcdcron import Cron, EtcdError, EtcdUnavailableError, Job
from etcdcron._etcd import EtcdClient
from etcdcron.testing import EtcdServer, wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.slow]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=etcdcron test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, extensions in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ]:
        (d / f"{name}.ext").write_text(extensions)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=d)
    return d


def test_tls_with_client_certificates(pki, namespace, calls):
    with EtcdServer(tls=(str(pki / "server.pem"), str(pki / "server.key"),
                         str(pki / "ca.pem"))) as etcd:
        cron = Cron(endpoints=f"https://{etcd.endpoint}", namespace=namespace, trigger=calls.add,
                    ca_cert=str(pki / "ca.pem"), cert_key=str(pki / "client.key"),
                    cert_cert=str(pki / "client.pem"), lease_ttl=5)
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


@pytest.fixture
def auth_etcd(tmp_path):
    """An etcd with auth on (user root) and JWT tokens that expire after 2 seconds."""
    openssl("genrsa", "-out", "jwt.key", "2048", cwd=tmp_path)
    openssl("rsa", "-in", "jwt.key", "-pubout", "-out", "jwt.pub", cwd=tmp_path)
    token = (f"--auth-token=jwt,pub-key={tmp_path / 'jwt.pub'},priv-key={tmp_path / 'jwt.key'},"
             "sign-method=RS256,ttl=2s")
    with EtcdServer(extra_args=[token]) as etcd:
        admin = EtcdClient(etcd.endpoint)
        auth = admin._auth
        for method, request in [
            (auth.RoleAdd, rpc_pb2.AuthRoleAddRequest(name="root")),
            (auth.UserAdd, rpc_pb2.AuthUserAddRequest(name="root", password="s3cret")),
            (auth.UserGrantRole, rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root")),
            (auth.AuthEnable, rpc_pb2.AuthEnableRequest()),
        ]:
            admin.call(method, request, "auth setup")
        admin.close()
        yield etcd


def test_user_password_auth_renews_an_expired_token(auth_etcd, namespace, calls):
    cron = Cron(endpoints=auth_etcd.endpoint, namespace=namespace, trigger=calls.add,
                user="root", password="s3cret", lease_ttl=5)
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
