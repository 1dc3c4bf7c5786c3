"""etcdcron benchmarks against a throwaway etcd on 127.0.0.1 (see bench/README.md).

1. past-due one-shots: N jobs already due, one replica; time from ``start()`` until every trigger
   was called, and until every job is gone from etcd;
2. ``add()``: sequential calls, adds/s and latency percentiles;
3. steady recurring load: jobs ``@every 1s`` from a known instant; triggers/s and lateness;
4. memory: RSS growth of one replica (a fresh process) per loaded future job.

Run ``python bench/run.py`` (about 2 minutes) or ``python bench/run.py --quick`` (a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

try:
    import etcdcron  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etcdcron import Cron, Job
from etcdcron._etcd import EtcdClient
from etcdcron.keys import Keys, prefix_end
from etcdcron.testing import EtcdServer, bulk_add, wait_until

FULL = dict(pastdue=10_000, pastdue_runs=3, adds=2_000, steady_jobs=1_000, steady_secs=10,
            memory_jobs=10_000)
QUICK = dict(pastdue=1_000, pastdue_runs=1, adds=200, steady_jobs=100, steady_secs=3,
             memory_jobs=1_000)
WORKER_SETTINGS = [8, None]          # None: the library's default
_namespaces = itertools.count(1)


def fresh_namespace(what: str) -> str:
    return f"bench-{os.getpid()}-{next(_namespaces)}-{what}"


def bulk_write(etcd: EtcdServer, namespace: str, jobs: dict) -> None:
    """Write many jobs fast (``etcdcron.testing.bulk_add``: 100 per transaction)."""
    writer = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=print)
    try:
        bulk_add(writer, jobs)
    finally:
        writer.stop()


def job_count(client: EtcdClient, namespace: str) -> int:
    prefix = Keys(namespace).jobs
    return client.range(prefix, prefix_end(prefix), count_only=True).count


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Calls:
    """Trigger calls as ``(name, wall time)``; ``list.append`` is atomic, so no lock."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []

    def trigger(self, req) -> None:
        self.calls.append((req.name, time.time()))


def say(text: str) -> None:
    print(text, flush=True)


class Warnings(logging.Handler):
    """Collects what a Cron logs at WARNING and above, to report it in the result line."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.getLogger(f"etcdcron.bench.{name}")
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# -- 1. past-due one-shots ------------------------------------------------------------------------

def pastdue_once(etcd: EtcdServer, client: EtcdClient, n: int, workers: int | None) -> tuple:
    namespace = fresh_namespace(f"pastdue-w{workers or 'default'}")
    bulk_write(etcd, namespace, {f"job-{i}": Job(due_time="0s") for i in range(n)})
    calls = Calls()
    cron = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=calls.trigger,
                workers=workers)
    try:
        started = time.perf_counter()
        cron.start()
        wait_until(lambda: len(calls.calls) >= n, timeout=300, interval=0.005,
                   message=lambda: f"{n} triggers (have {len(calls.calls)})")
        triggered = time.perf_counter() - started
        wait_until(lambda: job_count(client, namespace) == 0, timeout=300, interval=0.02,
                   message=lambda: f"0 jobs left (have {job_count(client, namespace)})")
        deleted = time.perf_counter() - started
        left = cron.list()
    finally:
        cron.stop(timeout=30)
    distinct = len({name for name, _ in calls.calls})
    problems = []
    if left:
        problems.append(f"cron.list() still has {len(left)} jobs")
    if distinct != n or len(calls.calls) != n:
        problems.append(f"{len(calls.calls)} calls for {distinct} distinct jobs")
    return triggered, deleted, problems


def bench_pastdue(etcd: EtcdServer, client: EtcdClient, size: dict, summary: list) -> None:
    n, runs = size["pastdue"], size["pastdue_runs"]
    for workers in WORKER_SETTINGS:
        label = f"workers={workers}" if workers else "workers=default"
        triggered, deleted = [], []
        for run in range(1, runs + 1):
            t, d, problems = pastdue_once(etcd, client, n, workers)
            triggered.append(t)
            deleted.append(d)
            say(f"  past-due one-shots  n={n} {label} run {run}: all triggered in {t:.2f} s, "
                f"all deleted in {d:.2f} s ({n / t:,.0f} triggers/s)"
                + (f"  !! {'; '.join(problems)}" if problems else ""))
        t, d = statistics.median(triggered), statistics.median(deleted)
        summary.append(f"past-due one-shots, n={n}, 1 replica, {label}: median of {runs}: "
                       f"triggered {t:.2f} s ({n / t:,.0f}/s), deleted {d:.2f} s "
                       f"[go-etcd-cron target: < 10 s]")


# -- 2. add() -------------------------------------------------------------------------------------

def bench_add(etcd: EtcdServer, client: EtcdClient, size: dict, summary: list) -> None:
    n = size["adds"]
    cron = Cron(endpoints=etcd.endpoint, namespace=fresh_namespace("add"),
                trigger=lambda req: None)
    latencies = []
    try:
        cron.add("warm-up", Job(due_time="1h"))
        began = time.perf_counter()
        for i in range(n):
            before = time.perf_counter()
            cron.add(f"job-{i}", Job(due_time="1h"))
            latencies.append(time.perf_counter() - before)
        total = time.perf_counter() - began
    finally:
        cron.stop()
    line = (f"add(): {n} sequential calls, unstarted Cron: {n / total:,.0f} adds/s, "
            f"p50 {percentile(latencies, 50) * 1000:.2f} ms, "
            f"p99 {percentile(latencies, 99) * 1000:.2f} ms, "
            f"max {max(latencies) * 1000:.2f} ms")
    say("  " + line)
    summary.append(line)


# -- 3. steady recurring load ---------------------------------------------------------------------

def bench_steady(etcd: EtcdServer, client: EtcdClient, size: dict, summary: list) -> None:
    n, seconds = size["steady_jobs"], size["steady_secs"]
    namespace = fresh_namespace("steady")
    first = math.ceil(time.time()) + 4      # tick k of every job is due at first + k
    due = datetime.fromtimestamp(first, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    bulk_write(etcd, namespace,
               {f"job-{i}": Job(schedule="@every 1s", due_time=due) for i in range(n)})
    calls = Calls()
    warnings = Warnings("steady")
    cron = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=calls.trigger,
                logger=warnings.logger)
    end = first + seconds
    try:
        cron.start()
        cron.wait_elected(30)
        if time.time() > first:
            say("  !! the replica was elected after the first tick; lateness includes catch-up")
        # Stop half-way between two ticks, so that no trigger is in flight.
        wait_until(lambda: time.time() >= end + 0.5, timeout=seconds + 60, interval=0.05)
    finally:
        cron.stop(timeout=30)
        client.delete(f"{namespace}/".encode(), prefix_end(f"{namespace}/".encode()))

    index = {}                               # per job: how many calls so far
    lateness, in_window = [], 0
    for name, at in calls.calls:
        k = index.get(name, 0)
        index[name] = k + 1
        if first <= at < end:
            in_window += 1
            lateness.append(at - (first + k))
    due_in_window = n * seconds
    rate = in_window / seconds
    line = (f"steady load: {n} jobs @every 1s for {seconds} s, 1 replica, default workers: "
            f"{rate:,.0f} triggers/s (due: {n}/s; {in_window}/{due_in_window} ticks), lateness "
            f"p50 {percentile(lateness, 50) * 1000:.1f} ms, "
            f"p99 {percentile(lateness, 99) * 1000:.1f} ms, max {max(lateness) * 1000:.1f} ms")
    abandoned = sum(int(m.split()[2]) for m in warnings.messages
                    if m.startswith("not recording") and m.endswith(": stopping"))
    others = [m for m in warnings.messages if not m.startswith("not recording")]
    if abandoned:
        line += f"; stop() dropped {abandoned} results still being recorded"
    if others:
        line += f"  !! {len(others)} warnings, first: {others[0]}"
    if min(lateness) < 0:
        line += f"  !! {sum(1 for x in lateness if x < 0)} triggers EARLY (min " \
                f"{min(lateness) * 1000:.1f} ms)"
    say("  " + line)
    summary.append(line)


# -- 4. memory ------------------------------------------------------------------------------------

def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(endpoint: str, namespace: str, n: int) -> None:
    """Runs in a fresh process: RSS before start() and once all ``n`` jobs are loaded."""
    puts = []
    cron = Cron(endpoints=endpoint, namespace=namespace, trigger=lambda req: None,
                consumer_sink=lambda event: puts.append(1) if event.HasField("put") else None)
    cron.list(prefix="warm-up")            # open the gRPC channel before the baseline
    gc.collect()
    before = rss_kib()
    try:
        cron.start()
        cron.wait_elected(30)
        wait_until(lambda: len(puts) >= n, timeout=120, interval=0.05,
                   message=lambda: f"{n} jobs loaded (have {len(puts)})")
        time.sleep(0.5)                    # let the consumer queue drain and threads settle
        gc.collect()
        after = rss_kib()
    finally:
        cron.stop()
    print(json.dumps({"before_kib": before, "after_kib": after}), flush=True)


def rss_growth(etcd: EtcdServer, client: EtcdClient, n: int) -> dict:
    """RSS of a fresh replica process before start() and with ``n`` future jobs loaded."""
    namespace = fresh_namespace(f"memory-{n}")
    bulk_write(etcd, namespace, {f"job-{i}": Job(due_time="1h") for i in range(n)})
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-child", etcd.endpoint, namespace,
         str(n)], capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_memory(etcd: EtcdServer, client: EtcdClient, size: dict, summary: list) -> None:
    n = size["memory_jobs"]
    empty = rss_growth(etcd, client, 0)      # the threads and sessions alone
    full = rss_growth(etcd, client, n)
    threads = (empty["after_kib"] - empty["before_kib"]) * 1024
    growth = (full["after_kib"] - full["before_kib"]) * 1024
    line = (f"memory: {n} future jobs loaded by 1 replica: RSS {full['before_kib'] / 1024:.1f} -> "
            f"{full['after_kib'] / 1024:.1f} MiB; {(growth - threads) / n:,.0f} bytes/job "
            f"({growth / n:,.0f} counting the {threads / 2**20:.1f} MiB a started replica "
            f"with no jobs adds)")
    say("  " + line)
    summary.append(line)


# -- main -----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description="etcdcron benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--memory-child", nargs=3, metavar=("ENDPOINT", "NAMESPACE", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        endpoint, namespace, n = args.memory_child
        memory_child(endpoint, namespace, int(n))
        return 0

    logging.basicConfig(level=logging.WARNING, format="    [%(name)s %(levelname)s] %(message)s")
    size = QUICK if args.quick else FULL
    summary: list[str] = []
    began = time.perf_counter()
    with EtcdServer() as etcd:
        client = EtcdClient(etcd.endpoint)
        try:
            say(f"etcd {etcd.endpoint} (data in {etcd.data_dir}); python {sys.version.split()[0]}"
                f", {os.cpu_count()} cpus, sizes: {'quick' if args.quick else 'full'}")
            for title, bench in [("1. past-due one-shots", bench_pastdue),
                                 ("2. add() latency", bench_add),
                                 ("3. steady recurring load", bench_steady),
                                 ("4. memory per job", bench_memory)]:
                say(title)
                bench(etcd, client, size, summary)
        finally:
            client.close()
    say(f"\n== summary ({time.perf_counter() - began:.0f} s, "
        f"{'quick' if args.quick else 'full'} sizes) ==")
    for line in summary:
        say("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
