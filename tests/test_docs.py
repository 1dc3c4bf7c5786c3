"""The docs cannot rot: they build with warnings as errors, and the troubleshooting page
explains every line etcdcron logs at INFO or above."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_LEVELS = {"info", "warning", "error", "exception", "critical"}
_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrxfgi]")


def logged_messages() -> list[tuple[str, str]]:
    """``(file:line, message with '…' for each value)`` of every log call at INFO or above."""
    found = []
    for path in sorted((ROOT / "etcdcron").glob("*.py")):
        if path.name == "testing.py":  # logs of the test helpers (the fault proxy) are not ours
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, args = node.func.attr, node.args
            if name == "_log_once" and len(args) >= 2:  # (level, message, *args)
                level = args[0]
                if isinstance(level, ast.Attribute) and level.attr == "DEBUG":
                    continue
                message = args[1]
            elif name == "skip_once" and len(args) >= 2:  # (what, message, *args)
                message = args[1]
            elif name in _LEVELS and args:
                message = args[0]
            else:
                continue
            if isinstance(message, ast.Constant) and isinstance(message.value, str):
                found.append((f"{path.name}:{node.lineno}",
                              _PLACEHOLDER.sub("…", message.value)))
    return found


@pytest.mark.unit
def test_every_log_line_is_explained_in_troubleshooting():
    text = " ".join((DOCS / "troubleshooting.rst").read_text().split())
    messages = logged_messages()
    assert len(messages) > 30  # the scan finds the package's log calls
    missing = [f"{where}: {message!r}" for where, message in messages if message not in text]
    assert not missing, "log lines not in docs/troubleshooting.rst:\n" + "\n".join(missing)


@pytest.mark.slow
def test_the_docs_build_without_warnings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                             "-b", "html", str(DOCS), str(tmp_path / "html")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    index = (tmp_path / "html" / "index.html").read_text()
    for page in ("semantics", "time-grammar", "clustering", "status-and-cli", "frameworks",
                 "operations", "troubleshooting", "security", "api"):
        assert f'href="{page}.html"' in index
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("Cron.status", "Cron.statuses", "JobStatus", "ValidationError", "EtcdServer"):
        assert name in api  # autodoc found the docstrings
