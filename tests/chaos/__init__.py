"""The chaos audit (``make chaos``): replicas in real processes, overlapping seeded faults, and an
independent audit of every trigger against the schedules and etcd's history.

Modules: :mod:`~tests.chaos.run` (the orchestrator), :mod:`~tests.chaos.replica` (a replica
process), :mod:`~tests.chaos.workload` (the jobs and the driver that changes them),
:mod:`~tests.chaos.faults` (the fault plan and injector), :mod:`~tests.chaos.history` (etcd's
committed history, watched directly), :mod:`~tests.chaos.audit` (the audit) and
:mod:`~tests.chaos.report` (the summary table).

It lives under ``tests/`` because it is a pass/fail check of correctness, part of ``make test``
(``tests/test_chaos.py``), with unit tests of its own audit; ``bench/`` measures speed.
"""
