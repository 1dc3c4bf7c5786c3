"""The ``etcdcron`` command, end to end: the real command in a subprocess against real etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from google.protobuf import struct_pb2, wrappers_pb2

from etcdcron import Job
from etcdcron.testing import free_port, wait_until
from tests.test_security import auth_etcd, pki  # noqa: F401 - fixtures

pytestmark = pytest.mark.etcd

CONSOLE_SCRIPT = Path(sys.executable).parent / "etcdcron"


def cli(*args: str, etcd=None, namespace: str | None = None, input: str | None = None,
        env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCRON_")}
    if etcd is not None:
        environ["ETCDCRON_ENDPOINTS"] = etcd.endpoint
    if namespace is not None:
        environ["ETCDCRON_NAMESPACE"] = namespace
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "etcdcron", *args], capture_output=True,
                          text=True, input=input if input is not None else "", env=environ,
                          timeout=timeout)


def one_line_error(result, code: int, *words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def test_add_get_list_status_delete(etcd, namespace):
    run = lambda *a, **kw: cli(*a, etcd=etcd, namespace=namespace, **kw)  # noqa: E731
    added = run("add", "report||daily", "--schedule", "0 0 9 * * mon-fri", "--repeats", "5",
                "--payload-json", '{"to": ["ops@example.com"], "n": 3}',
                "--failure-policy", "constant:500ms:2")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added 'report||daily': next trigger 20")
    assert run("add", "once", "--due-time", "1h").returncode == 0

    got = json.loads(run("get", "report||daily", "--json").stdout)
    assert got["job"]["schedule"] == "0 0 9 * * mon-fri" and got["job"]["repeats"] == 5
    assert got["job"]["payload"]["value"] == {"to": ["ops@example.com"], "n": 3}
    assert got["job"]["failure_policy"] == {"constant": {"interval": "0.500s", "max_retries": 2}}
    human = run("get", "once").stdout
    assert "due_time:" in human and "1h" in human

    table = run("list").stdout.splitlines()
    assert table[0].split() == ["NAME", "SCHEDULE", "DUE", "TIME", "TTL", "REPEATS"]
    assert [line.split()[0] for line in table[1:]] == ["once", "report||daily"]
    assert [j["name"] for j in json.loads(run("list", "rep", "--json").stdout)] == [
        "report||daily"]

    status = json.loads(run("status", "once", "--json").stdout)
    assert status["count"] == 0 and status["last_trigger"] is None
    assert status["next_trigger"].endswith("Z") and status["owner"] is None
    human = run("status", "report||daily").stdout
    assert "next trigger:" in human and "owner:" in human

    assert run("delete", "once").stdout == "deleted 'once'\n"
    one_line_error(run("get", "once"), 1, "no job named 'once'")
    one_line_error(run("status", "once"), 1, "no job named 'once'")
    one_line_error(run("delete", "once"), 1, "no job named 'once'")


def test_the_payload_reaches_the_trigger_and_a_typed_any_is_accepted(etcd, namespace,
                                                                      make_cron, calls):
    cron = make_cron(calls.add)
    cron.start()
    assert cron.wait_elected(10)
    typed = json.dumps({"@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": "hi"})
    result = cli("add", "typed", "--due-time", "0s", "--payload-json", typed,
                 "--metadata-json", "[1, 2]", etcd=etcd, namespace=namespace)
    assert result.returncode == 0, result.stderr
    calls.wait("typed", 1)
    request = calls.calls[0][2]
    payload, metadata = wrappers_pb2.StringValue(), struct_pb2.Value()
    assert request.payload.Unpack(payload) and payload.value == "hi"
    assert request.metadata.Unpack(metadata) and list(metadata.list_value.values) == [
        struct_pb2.Value(number_value=1), struct_pb2.Value(number_value=2)]


def test_status_of_the_replicas_and_of_a_job_they_run(etcd, namespace, make_cron, calls):
    crons = [make_cron(calls.add, replica_id=f"web-{i}",
                       replica_data=wrappers_pb2.StringValue(value=f"host-{i}"))
             for i in range(3)]
    for cron in crons:
        cron.start()
    wait_until(lambda: all(c.is_elected() for c in crons), 30)
    crons[0].add("heartbeat", Job(schedule="@every 1s", repeats=100))
    wait_until(lambda: crons[0].status("heartbeat").count >= 2, 10)

    table = cli("status", etcd=etcd, namespace=namespace)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == (f"namespace {namespace!r}: 3 replica(s) agree on 3 partition(s) "
                        f"(dynamic membership); 1 job(s)")
    assert lines[1].split()[:5] == ["REPLICA", "INDEX", "TOTAL", "LEASE", "TTL"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("web-0", "0", "3"), ("web-1", "1", "3"),
                                                  ("web-2", "2", "3")]
    assert all(r[4].endswith("s") and 0 < int(r[4][:-1]) <= 5 for r in rows)  # lease_ttl=5
    assert '"value": "host-1"' in lines[3]

    listed = json.loads(cli("status", "--json", etcd=etcd, namespace=namespace).stdout)
    assert listed["total"] == 3 and listed["jobs"] == 1 and not listed["static"]
    assert [r["replica_data"]["value"] for r in listed["replicas"]] == ["host-0", "host-1",
                                                                         "host-2"]

    job = json.loads(cli("status", "heartbeat", "--json", etcd=etcd, namespace=namespace).stdout)
    owner = next(c for c in crons if c._elector.ownership.owns(int(job["partition_id"])))
    assert job["owner"] == owner.replica_id
    assert job["count"] >= 2 and job["last_trigger"] < job["next_trigger"]
    assert job["staged"] is None  # the command is not the owning replica


def test_exit_codes_and_one_line_errors(etcd, namespace):
    one_line_error(cli(), 2, "etcdcron: error:")
    one_line_error(cli("list", "--bogus", etcd=etcd, namespace=namespace), 2, "--bogus")
    one_line_error(cli("add", "x", "--repeats", "many", etcd=etcd, namespace=namespace), 2,
                   "--repeats")
    one_line_error(cli("list", etcd=etcd), 2, "no namespace")
    one_line_error(cli("add", "x", etcd=etcd, namespace=namespace), 2, "schedule")
    one_line_error(cli("add", "bad/name", "--due-time", "1s", etcd=etcd, namespace=namespace), 2,
                   "'bad/name'")
    one_line_error(cli("add", "x", "--due-time", "1s", "--payload-json", "{nope",
                       etcd=etcd, namespace=namespace), 2, "--payload-json")
    one_line_error(cli("add", "x", "--due-time", "1s", "--failure-policy", "sometimes",
                       etcd=etcd, namespace=namespace), 2, "--failure-policy")
    assert cli("list", etcd=etcd, namespace=namespace).stdout.splitlines()[1:] == []

    started = time.monotonic()
    unreachable = cli("list", "--endpoints", f"127.0.0.1:{free_port()}", "--timeout", "0.5",
                      namespace=namespace)
    one_line_error(unreachable, 3, "etcd at 127.0.0.1:", "UNAVAILABLE")
    one_line_error(cli("watch", "--timeout", "0.5", namespace=namespace,
                       env={"ETCDCRON_ENDPOINTS": f"127.0.0.1:{free_port()}"}), 3, "UNAVAILABLE")
    assert time.monotonic() - started < 15


def test_options_come_from_the_environment_and_flags_win(etcd, namespace):
    assert cli("add", "from-env", "--due-time", "1h", etcd=etcd, namespace=namespace
               ).returncode == 0
    # A flag after the command overrides the environment, and so does one before it.
    elsewhere = cli("list", "--namespace", namespace + "-other", etcd=etcd, namespace=namespace)
    assert elsewhere.stdout.splitlines()[1:] == []
    before = cli("--namespace", namespace, "list", etcd=etcd, namespace="nothing-here")
    assert before.stdout.splitlines()[1].split()[0] == "from-env"
    flags_only = subprocess.run([str(CONSOLE_SCRIPT), "--endpoints", etcd.endpoint,
                                 "--namespace", namespace, "list", "--json"],
                                capture_output=True, text=True, timeout=30)
    assert [j["name"] for j in json.loads(flags_only.stdout)] == ["from-env"]


def test_delete_prefix_asks_first(etcd, namespace, producer):
    for name in ("a||1", "a||2", "b||1", "c"):
        producer.add(name, Job(due_time="1h"))
    declined = cli("delete-prefix", "a||", "b||", etcd=etcd, namespace=namespace, input="n\n")
    assert declined.returncode == 1
    assert "delete 3 job(s) whose names start with 'a||', 'b||'" in declined.stderr
    assert len(producer.list()) == 4
    confirmed = cli("delete-prefix", "a||", etcd=etcd, namespace=namespace, input="y\n")
    assert confirmed.returncode == 0 and confirmed.stdout == "deleted 2 job(s)\n"
    assert [j.name for j in producer.list()] == ["b||1", "c"]
    forced = cli("delete-prefix", "--yes", "b||", "c", "--json", etcd=etcd, namespace=namespace)
    assert json.loads(forced.stdout) == {"deleted": 2, "prefixes": ["b||", "c"]}
    assert producer.list() == []


def test_watch_prints_live_events_until_interrupted(etcd, namespace, make_cron, calls):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCRON_")}
    environ.update(ETCDCRON_ENDPOINTS=etcd.endpoint, ETCDCRON_NAMESPACE=namespace)
    watch = subprocess.Popen([sys.executable, "-m", "etcdcron", "watch"], env=environ,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")),
                              daemon=True)
    try:
        assert "watching namespace" in watch.stderr.readline()
        reader.start()
        cron = make_cron(calls.add, replica_id="solo")
        cron.start()
        assert cron.wait_elected(10)
        cron.add("ping", Job(schedule="@every 1s", repeats=2))
        wait_until(lambda: sum(" job-deleted " in line for line in lines) == 1, 15,
                   message=lambda: f"the job to finish, in {lines}")
        cron.stop()
        wait_until(lambda: any(" replica-left " in line for line in lines), 10)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    events = [line.split()[1:3] for line in lines]
    assert events[0] == ["replica-joined", "solo"] and events[-1] == ["replica-left", "solo"]
    assert [e for e in events if e[1] == "ping"] == [
        ["job-added", "ping"], ["triggered", "ping"], ["job-deleted", "ping"]], lines
    assert "count=1" in next(line for line in lines if " triggered " in line)


@pytest.mark.slow
def test_user_and_password_from_the_environment_or_stdin(auth_etcd, namespace):  # noqa: F811
    env = {"ETCDCRON_ENDPOINTS": auth_etcd.endpoint, "ETCDCRON_USER": "root"}
    denied = cli("list", namespace=namespace, env=env)
    one_line_error(denied, 3, "etcd at")
    assert cli("add", "secret", "--due-time", "1h", namespace=namespace,
               env={**env, "ETCDCRON_PASSWORD": "s3cret"}).returncode == 0
    piped = cli("list", "--password-stdin", namespace=namespace, env=env, input="s3cret\n")
    assert piped.returncode == 0 and piped.stdout.splitlines()[1].startswith("secret")
    wrong = cli("list", "--password-stdin", namespace=namespace, env=env, input="nope\n")
    one_line_error(wrong, 3, "authentication as 'root' failed")


@pytest.mark.slow
def test_tls_flags(pki, namespace):  # noqa: F811
    from etcdcron.testing import EtcdServer

    with EtcdServer(tls=(str(pki / "server.pem"), str(pki / "server.key"),
                         str(pki / "ca.pem"))) as etcd:
        env = {"ETCDCRON_ENDPOINTS": f"https://{etcd.endpoint}",
               "ETCDCRON_CA_CERT": str(pki / "ca.pem")}
        flags = ["--cert-key", str(pki / "client.key"), "--cert-cert", str(pki / "client.pem")]
        added = cli("add", *flags, "tls-job", "--due-time", "1h", namespace=namespace, env=env)
        assert added.returncode == 0, added.stderr
        assert "tls-job" in cli("list", *flags, namespace=namespace, env=env).stdout
        one_line_error(cli("list", "--timeout", "1", namespace=namespace, env=env), 3)
        one_line_error(cli("list", "--ca-cert", "/nonexistent.pem", namespace=namespace,
                           env=env), 2, "/nonexistent.pem")
