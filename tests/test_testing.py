"""The throwaway-etcd helpers users get in ``etcdcron.testing``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from etcdcron import Cron, Job
from etcdcron.testing import free_port, wait_until

pytestmark = pytest.mark.etcd


def test_python_m_etcdcron_testing_runs_an_etcd_until_sigterm(calls):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "etcdcron.testing", "--port", str(port)],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"etcd listening on 127.0.0.1:{port}" in line
        etcd_pid = int(line.split("(pid ")[1].split(",")[0])
        with Cron(endpoints=f"127.0.0.1:{port}", namespace="dev", trigger=calls.add) as cron:
            cron.add("job", Job(due_time="0s"))
            calls.wait("job", 1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        wait_until(lambda: not _alive(etcd_pid), 10, message="etcd to be stopped")
    finally:
        if process.poll() is None:
            process.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is as good as gone
        return stat.read().split(") ")[1][0] != "Z"


def test_bulk_add_writes_every_job_or_none(make_cron):
    from etcdcron import ValidationError
    from etcdcron.testing import bulk_add

    cron = make_cron(print)
    with pytest.raises(ValidationError, match="'bad/name'"):
        bulk_add(cron, {"ok": Job(due_time="1h"), "bad/name": Job(due_time="1h")})
    assert cron.list() == []

    bulk_add(cron, {f"job-{i:03d}": Job(due_time="1h") for i in range(250)}, batch=100)
    assert [j.name for j in cron.list()] == [f"job-{i:03d}" for i in range(250)]
