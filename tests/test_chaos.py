"""A two-minute chaos run (``tests/chaos``) as part of the suite: real replica processes, seeded
overlapping faults, and the audit of every trigger. A random seed each time (printed; set
``CHAOS_SEED`` to replay one, ``CHAOS_SUITE_SECONDS`` for another length of the fault phase)."""

from __future__ import annotations

import os
import random

import pytest

from tests.chaos.audit import Report
from tests.chaos.report import render
from tests.chaos.run import ChaosRun, Settings

pytestmark = [pytest.mark.etcd, pytest.mark.cluster, pytest.mark.slow]



@pytest.mark.timeout(900)
def test_a_chaos_run_misses_nothing_and_fires_nothing_early_or_stale(tmp_path):
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    seconds = float(os.environ.get("CHAOS_SUITE_SECONDS", "90"))
    out = tmp_path / f"chaos-{seed}"
    print(f"chaos seed {seed} ({seconds:g} s of faults), run directory {out}")
    report = ChaosRun(Settings(seconds=seconds, seed=seed), out).execute()
    failing = {m: report.counts[m] for m in Report.MUST_BE_ZERO if report.counts.get(m)}
    assert not failing, f"seed {seed} (replay: CHAOS_SEED={seed}):\n{render(report, out)}"
