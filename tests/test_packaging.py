"""The generated protobuf code works with the oldest and the newest protobuf runtime the package
declares (``protobuf>=5.29,<8``), each installed on its own into a temporary directory; the
package is typed, and ``mypy --strict`` finds no error in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROUND_TRIP = """
import google.protobuf, etcdcron
from etcdcron import Job, FailurePolicy, FailurePolicyDrop, NamedJob, TriggerRequest
from etcdcron._pb import stored_pb2
from etcd3.etcdrpc import rpc_pb2
from datetime import datetime, timezone
from etcdcron.validation import prepare_job
record = prepare_job("x", Job(schedule="@every 1s", repeats=2,
                              failure_policy=FailurePolicy(drop=FailurePolicyDrop())),
                     datetime.now(timezone.utc))
again = stored_pb2.Job.FromString(record.SerializeToString())
assert again == record and again.job.repeats == 2
assert rpc_pb2.RangeRequest(key=b"k").key == b"k"
print(google.protobuf.__version__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("requirement", ["protobuf==5.29.0", "protobuf>=5.29,<8"])
def test_generated_code_works_with_the_supported_protobuf_runtimes(tmp_path, requirement):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), requirement],
                   check=True)
    result = subprocess.run([sys.executable, "-c", ROUND_TRIP], capture_output=True, text=True,
                            cwd=ROOT, env={"PYTHONPATH": f"{target}:{ROOT}", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    version = result.stdout.strip()
    if requirement.startswith("protobuf=="):
        assert version == "5.29.0"
    else:
        assert version.split(".")[0] in {"5", "6", "7"}


@pytest.mark.slow
def test_the_package_is_typed_and_its_stubs_are_shipped():
    """PEP 561: ``py.typed`` and the ``.pyi`` stubs of the generated messages are package data
    (setup.cfg), so editors and mypy see ``Job(...)``'s fields in an installed etcdcron."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    data = config["options.package_data"]
    assert data["etcdcron"].split() == ["py.typed"]
    assert data["etcdcron._pb"].split() == ["*.pyi"]
    assert (ROOT / "etcdcron" / "py.typed").is_file()
    for module in ("api_pb2", "stored_pb2"):
        stub = (ROOT / "etcdcron" / "_pb" / f"{module}.pyi").read_text()
        assert "class " in stub and "def __init__" in stub


@pytest.mark.unit  # a few seconds: in the normal suite, so that a type error fails make test
def test_mypy_strict_finds_no_error():
    """``mypy --strict etcdcron`` (configured in setup.cfg: generated code excluded) is clean."""
    pytest.importorskip("mypy", reason="mypy is in the test extra")
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--config-file",
                             str(ROOT / "setup.cfg"), "etcdcron"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr
