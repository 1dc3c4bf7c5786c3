"""Packaging: ``python -m build`` makes a wheel and an sdist that pass ``twine check`` and
install in fresh virtual environments, where the demo runs; and the declared grpcio bounds
(``grpcio>=1.60,<2``) both work against real etcd."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run(*args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 300)
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin"


def env_without_venv() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("ETCDCRON_")}
    env["PATH"] = "/usr/bin:/bin"
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=ROOT)
    run(sys.executable, "-m", "twine", "check", "--strict", *sorted(out.iterdir()))
    return out


def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_demo(dist, tmp_path):
    wheel = next(dist.glob("etcdcron-*-py3-none-any.whl"))
    bin_dir = fresh_venv(tmp_path / "venv")
    env = env_without_venv()
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", f"{wheel}[server]", env=env)
    demo = run(bin_dir / "etcdcron", "demo", env=env, cwd=tmp_path, timeout=180)
    lines = demo.stdout.splitlines()
    summary = lines[lines.index(next(l for l in lines if l.startswith("job "))):]
    assert len(summary) == 5 and all(" OK: " in line for line in summary[1:]), demo.stdout
    # The installed package has no access to the checkout.
    where = run(bin_dir / "python", "-c", "import etcdcron; print(etcdcron.__file__)", env=env,
                cwd=tmp_path).stdout
    assert where.startswith(str(tmp_path / "venv"))


def test_the_sdist_installs_and_its_command_talks_to_etcd(dist, tmp_path, etcd):
    sdist = next(dist.glob("etcdcron-*.tar.gz"))
    bin_dir = fresh_venv(tmp_path / "venv")
    env = env_without_venv()
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", sdist, env=env)
    flags = ["--endpoints", etcd.endpoint, "--namespace", "sdist-check"]
    run(bin_dir / "etcdcron", *flags, "add", "hello", "--due-time", "1h", env=env)
    listed = run(bin_dir / "python", "-m", "etcdcron", *flags, "list", env=env).stdout
    assert listed.splitlines()[1].split()[0] == "hello"
    run(bin_dir / "etcdcron", *flags, "delete", "hello", env=env)


ROUND_TRIP = """
import sys, grpc
from etcdcron import Cron, Job
from etcdcron.testing import wait_until
fired = []
with Cron(endpoints=sys.argv[1], namespace="grpc-" + grpc.__version__, trigger=fired.append,
          lease_ttl=3) as cron:
    assert cron.wait_elected(15)
    cron.add("j", Job(due_time="0s"))
    wait_until(lambda: fired and not cron.list(), 15)
print(grpc.__version__)
"""


@pytest.mark.etcd
@pytest.mark.parametrize("requirement", ["grpcio==1.60.0", "grpcio>=1.60,<2"])
def test_the_supported_grpcio_versions_work_with_etcd(tmp_path, etcd, requirement):
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
        "--disable-pip-version-check", "--target", target, requirement)
    result = run(sys.executable, "-c", ROUND_TRIP, etcd.endpoint, cwd=ROOT,
                 env={"PYTHONPATH": f"{target}:{ROOT}", "PATH": "/usr/bin:/bin"})
    version = result.stdout.strip()
    if "==" in requirement:
        assert version == "1.60.0"
    else:
        assert version.split(".")[0] == "1" and int(version.split(".")[1]) >= 60
