"""The framework examples, for real: gunicorn with 4 workers serving the Flask example, and the
Django example through its test client and its ``manage.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from etcdcron._etcd import EtcdClient
from etcdcron.status import membership
from etcdcron.testing import free_port, wait_until

pytestmark = pytest.mark.etcd

ROOT = Path(__file__).resolve().parent.parent
FLASK = ROOT / "examples" / "flask"
DJANGO = ROOT / "examples" / "django"
BIN = Path(sys.executable).parent


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ETCDCRON_", "DJANGO_", "FIRED_LOG"))}
    env.update(extra)
    return env


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def fired_names(log_dir: Path) -> tuple[Counter, dict[str, int]]:
    names: Counter = Counter()
    per_worker = {}
    for path in log_dir.glob("worker-*.log"):
        lines = [line for line in path.read_text().split("\n")[:-1]]  # whole lines only
        per_worker[path.name] = len(lines)
        names.update(lines)
    return names, per_worker


@pytest.mark.slow
@pytest.mark.cluster
def test_gunicorn_with_4_preloaded_workers_fires_200_jobs_once_each(etcd, namespace, tmp_path,
                                                                   producer):
    port = free_port()
    log_dir = tmp_path / "fired"
    log_dir.mkdir()
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--preload", "--workers", "4",
         "--bind", f"127.0.0.1:{port}", "app:create_app()"],
        cwd=FLASK, env=clean_env(ETCDCRON_ENDPOINTS=etcd.endpoint, ETCDCRON_NAMESPACE=namespace,
                                 ETCDCRON_LEASE_TTL="5", FIRED_LOG_DIR=str(log_dir)),
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gunicorn.log", "wb"))
    client, keys = producer._client, producer._keys
    try:
        # Four workers, four replicas: none in the master, although it built the app.
        wait_until(lambda: membership(client, keys).total == 4, 60,
                   message=lambda: f"4 replicas agreeing: {membership(client, keys)}")
        base = f"http://127.0.0.1:{port}"
        for i in range(200):
            assert http("POST", f"{base}/jobs/job-{i:03d}", {"due_time": "1s"}) == (
                201, {"added": f"job-{i:03d}"})
        assert http("POST", f"{base}/jobs/bad", {"due_time": "whenever"})[0] == 400

        wait_until(lambda: sum(fired_names(log_dir)[0].values()) >= 200 and not producer.list(),
                   60, message=lambda: f"200 fired: {fired_names(log_dir)[1]}")
        names, per_worker = fired_names(log_dir)
        assert names == Counter({f"job-{i:03d}": 1 for i in range(200)})
        assert len([n for n in per_worker.values() if n]) >= 3, per_worker  # shared out
        pids = {http("GET", f"{base}/healthz")[1]["pid"] for _ in range(40)}
        assert str(server.pid) not in {str(p) for p in pids}
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
    assert code == 0, (tmp_path / "gunicorn.log").read_text()[-3000:]
    # worker_exit stopped every Cron: the leadership keys are released at once.
    assert membership(client, keys).replicas == ()
    assert "etcdcron started" in (tmp_path / "gunicorn.log").read_text()


# -- Django --------------------------------------------------------------------------------------

@pytest.fixture
def django_app(etcd, namespace, tmp_path, monkeypatch):
    """The example project set up in this process, its scheduler started by AppConfig.ready()."""
    django = pytest.importorskip("django")
    fired = tmp_path / "fired.log"
    for key, value in clean_env(ETCDCRON_ENDPOINTS=etcd.endpoint, ETCDCRON_NAMESPACE=namespace,
                                ETCDCRON_LEASE_TTL="5", ETCDCRON_AUTOSTART="always",
                                FIRED_LOG=str(fired), DJANGO_DB=str(tmp_path / "db.sqlite3"),
                                DJANGO_SETTINGS_MODULE="mysite.settings").items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(DJANGO))
    django.setup()
    from jobs import scheduler

    yield scheduler, fired
    scheduler.stop()


def test_django_test_client_adds_a_job_that_the_app_fires(django_app):
    from django.test import Client

    scheduler, fired = django_app
    cron = scheduler.cron()
    assert cron.wait_elected(10)  # started by JobsConfig.ready()
    client = Client()
    response = client.post("/jobs/hello", data={"schedule": "@every 1s", "repeats": 2},
                           content_type="application/json")
    assert response.status_code == 201 and response.json() == {"added": "hello"}
    wait_until(lambda: fired.exists() and fired.read_text() == "hello\n", 10)
    # the trigger ran; its result is recorded a moment later
    status = wait_until(lambda: (s := client.get("/jobs/hello").json())["count"] == 1 and s, 10,
                        message="the first trigger's result to be recorded")
    assert status["count"] == 1 and status["owner"] == cron.replica_id
    wait_until(lambda: client.get("/jobs/hello").status_code == 404, 10)  # fired twice, done
    assert fired.read_text() == "hello\nhello\n"
    bad = client.post("/jobs/x", data={"schedule": "every day"}, content_type="application/json")
    assert bad.status_code == 400 and "schedule" in bad.json()["error"]


@pytest.mark.parametrize("autostart, starts", [("auto", False), ("always", True)])
def test_manage_py_migrate_does_not_start_a_cron(own_etcd, tmp_path, autostart, starts):
    """With the default (auto) a management command starts nothing: not one etcd write. The
    forced case shows that the check would see a Cron that started."""
    client = EtcdClient(own_etcd.endpoint)
    try:
        before = client.current_revision()
        result = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=DJANGO, timeout=120,
            capture_output=True, text=True,
            env=clean_env(ETCDCRON_ENDPOINTS=own_etcd.endpoint, ETCDCRON_NAMESPACE="mig",
                          ETCDCRON_AUTOSTART=autostart, DJANGO_DB=str(tmp_path / "db.sqlite3")))
        assert result.returncode == 0, result.stderr
        assert "Applying auth" in result.stdout  # it did migrate
        assert ("etcdcron: replica" in result.stderr) is starts
        assert (client.current_revision() > before) is starts
    finally:
        client.close()


@pytest.mark.unit
def test_django_scheduler_starts_only_where_it_serves(monkeypatch):
    monkeypatch.syspath_prepend(str(DJANGO))
    from jobs import scheduler

    monkeypatch.delenv("ETCDCRON_AUTOSTART", raising=False)
    monkeypatch.delenv("RUN_MAIN", raising=False)
    monkeypatch.setattr(scheduler, "serving", False)
    assert not scheduler.should_start(["manage.py", "migrate"])
    assert not scheduler.should_start(["manage.py", "shell"])
    assert not scheduler.should_start(["manage.py", "runserver"])  # the autoreloader parent
    assert scheduler.should_start(["manage.py", "runserver", "--noreload"])
    monkeypatch.setenv("RUN_MAIN", "true")
    assert scheduler.should_start(["manage.py", "runserver"])
    monkeypatch.setattr(scheduler, "serving", True)  # loaded through mysite/wsgi.py
    assert scheduler.should_start(["gunicorn", "mysite.wsgi"])
    monkeypatch.setenv("ETCDCRON_AUTOSTART", "never")
    assert not scheduler.should_start(["gunicorn", "mysite.wsgi"])
