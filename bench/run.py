"""The benchmark suite of issue 9 ("Scale and speed"): ``make bench`` (see bench/README.md).

It starts its own etcd on 127.0.0.1 with its data on disk (``--shm``: in ``/dev/shm``), runs
the rows below, prints one table and writes it to ``bench/RESULTS.md`` with the machine, the
versions and the date, each row with its parameters and, where issue 9 gives one, its target;
plus the lateness histogram ``bench/lateness.png``.

1. ``burst``: past-due one-shots end to end (all fired, recorded, deleted) on 1, 2 and 4 replica
   processes;
2. ``steady``: jobs ``@every 1s``, aligned on one second and spread over it: lateness, rate, CPU;
3. ``scale``: many stored jobs: ``list()``, a fresh replica until ready, RSS per job, ``add()``;
4. ``failover``: SIGKILL of one of 2 replicas (``lease_ttl=3``) until its jobs fire on the other;
5. ``ceilings``: the raw compare-and-put rate of etcd from Python, and APScheduler 3.11 firing
   the same one-shots, each as a ratio to etcdcron's burst.

Every replica is a process of its own (``bench/replica.py``), every process is stopped by its
PID. ``--quick`` runs every row at small sizes (a smoke run, about 2 minutes) and writes
``bench/RESULTS-quick.md``; ``--only ROW`` runs some rows (``bench/RESULTS-partial.md``);
``--profile`` records py-spy profiles of one replica during the biggest one-replica burst, the
10,000-job aligned steady run and the replica loading the most stored jobs (scale) into
``bench/profiles/``.
"""

from __future__ import annotations

import argparse
import array
import collections
import dataclasses
import gc
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

try:
    import etcdcron  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etcdcron import Cron, Job
from etcdcron import __version__ as etcdcron_version
from etcdcron import recorder as recorder_module
from etcdcron._etcd import EtcdClient, cmp_mod, op_put
from etcdcron.keys import Keys, prefix_end
from etcdcron.options import check_workers
from etcdcron.testing import EtcdServer, bulk_add, wait_until

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
REPLICA = os.path.join(BENCH, "replica.py")
PEERS = os.path.join(BENCH, "peers.py")
PROFILES = os.path.join(BENCH, "profiles")
ROWS = ("burst", "steady", "scale", "failover", "ceilings")
#: etcd's default --max-txn-ops: jobs written per transaction when loading a row.
WRITE_BATCH = 128
#: etcd's backend quota: a million jobs and the rows' history fit (the default is 2 GiB).
QUOTA_BYTES = 8 << 30


@dataclass(frozen=True)
class Sizes:
    burst: tuple[int, ...]
    burst_replicas: tuple[int, ...]
    steady: tuple[int, ...]
    steady_secs: int
    scale: tuple[int, ...]
    adds: int                     # add() calls from one thread; 16 threads make twice as many
    failover_jobs: int
    peers: int                    # one-shots APScheduler fires (and the raw compare-and-puts)
    profiled_burst: int
    profiled_steady: int


FULL = Sizes(burst=(10_000, 100_000), burst_replicas=(1, 2, 4), steady=(1_000, 10_000, 50_000),
             steady_secs=30, scale=(100_000, 1_000_000), adds=2_000, failover_jobs=200,
             peers=10_000, profiled_burst=100_000, profiled_steady=10_000)
QUICK = Sizes(burst=(1_000, 5_000), burst_replicas=(1, 2, 4), steady=(500, 2_000), steady_secs=5,
              scale=(10_000, 50_000), adds=300, failover_jobs=50, peers=2_000,
              profiled_burst=5_000, profiled_steady=2_000)
#: Seconds of ticks before the steady window opens (the replica settles after its load).
STEADY_WARMUP = 2
ADD_THREADS = (1, 16)
#: py-spy's samples per second (--profile).
PROFILE_RATE = 200


def say(text: str) -> None:
    print(text, flush=True)


def percentile(values, q: float) -> float:
    """The nearest-rank percentile ``q`` (0..100) of sorted ``values``."""
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


# -- the results table ----------------------------------------------------------------------------

@dataclass
class Result:
    row: str                       # burst, steady, ...
    what: str                      # the measure
    params: str
    value: str
    target: str = ""
    met: bool | None = None        # None: no target, or not measurable

    def cells(self) -> list[str]:
        verdict = {True: "yes", False: "**no**", None: ""}[self.met]
        return [self.row, self.what, self.params, self.value, self.target, verdict]


HEADER = ["row", "measure", "parameters", "result", "target (issue 9)", "met"]


def markdown_table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |"
              for r in results]
    return "\n".join(lines)


# -- the run: etcd, namespaces, processes ---------------------------------------------------------

def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fs_type(path: str) -> str:
    """The file system type of the mount that holds ``path`` (from ``/proc/mounts``)."""
    path, best, kind = os.path.realpath(path), "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                _, mount, fstype, *_ = line.split()
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) \
                        and len(mount) >= len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


class Run:
    """One benchmark run: the etcd server, a client, the work directory and the processes."""

    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.work = tempfile.mkdtemp(prefix="etcdcron-bench-", dir=self._work_base())
        self.etcd = EtcdServer(extra_args=[f"--quota-backend-bytes={QUOTA_BYTES}"])
        if not args.shm:
            # EtcdServer keeps its data in /dev/shm; a benchmark wants fsync to cost what it
            # costs in production, so its data moves to the work directory, on disk.
            shutil.rmtree(self.etcd.data_dir, ignore_errors=True)
            self.etcd.data_dir = os.path.join(self.work, "etcd")
            os.makedirs(self.etcd.data_dir)
            self.etcd.log_path = os.path.join(self.etcd.data_dir, "etcd.log")
        self.client: EtcdClient | None = None
        self.replicas: list[Replica] = []
        self.results: list[Result] = []
        self.lateness: dict[str, array.array] = {}    # steady label -> lateness samples (s)
        self.burst_rates: dict[tuple[int, int], float] = {}   # (n, replicas) -> jobs/s
        self.profiles: list[str] = []
        self._namespaces = itertools.count(1)
        self.commit = git_commit()           # before the run rewrites its own files

    def _work_base(self) -> str:
        if self.args.shm:
            return "/dev/shm"
        base = os.path.join(ROOT, "build")        # ignored by git; on the checkout's disk
        os.makedirs(base, exist_ok=True)
        return base

    def __enter__(self) -> Run:
        self.etcd.start()
        # Long attempts: compacting after a million deletes takes etcd more than 10 s.
        self.client = EtcdClient(self.etcd.endpoint, request_timeout=600)
        return self

    def __exit__(self, *exc_info) -> None:
        for replica in self.replicas:
            replica.close()
        if self.client is not None:
            self.client.close()
        self.etcd.close()           # stops etcd by its PID and removes its data
        shutil.rmtree(self.work, ignore_errors=True)

    def namespace(self, what: str) -> str:
        return f"bench-{next(self._namespaces)}-{what}"

    def replica(self, mode: str, namespace: str, *args: str, profile: str | None = None,
                lease_ttl: float = 20) -> Replica:
        replica = Replica(self, mode, namespace, list(args), profile, lease_ttl)
        self.replicas.append(replica)
        return replica

    def write_jobs(self, namespace: str, n: int, job_for, threads: int = 4) -> float:
        """Write jobs ``job_for(i) -> (name, Job)`` for ``i < n``, ``WRITE_BATCH`` per
        transaction from ``threads`` threads; returns the seconds it took."""
        began = time.perf_counter()
        writer = Cron(endpoints=self.etcd.endpoint, namespace=namespace, trigger=print)
        chunk = 20 * WRITE_BATCH

        def write(start: int) -> None:
            bulk_add(writer, dict(job_for(i) for i in range(start, min(n, start + chunk))),
                     batch=WRITE_BATCH)

        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="bench-writer") as pool:
                for done in pool.map(write, range(0, n, chunk)):
                    pass
        finally:
            writer.stop()
        return time.perf_counter() - began

    def job_count(self, namespace: str) -> int:
        prefix = Keys(namespace).jobs
        return self.client.range(prefix, prefix_end(prefix), count_only=True).count

    def drop(self, namespace: str) -> None:
        """Delete a namespace's keys and compact etcd's history (as auto-compaction would)."""
        prefix = f"{namespace}/".encode()
        response = self.client.delete(prefix, prefix_end(prefix))
        self.client.compact(response.header.revision)

    def add(self, result: Result) -> None:
        self.results.append(result)
        verdict = {True: "  [target met]", False: "  [target MISSED]", None: ""}[result.met]
        say(f"  {result.what} ({result.params}): {result.value}"
            + (f"  target {result.target}" if result.target else "") + verdict)


class Replica:
    """A ``bench/replica.py`` process (see its docstring for the protocol)."""

    def __init__(self, run: Run, mode: str, namespace: str, args: list[str],
                 profile: str | None, lease_ttl: float):
        self.name = f"{mode}-{namespace}-{len(run.replicas)}"
        self.namespace = namespace
        command = [sys.executable, REPLICA, mode, "--endpoint", run.etcd.endpoint,
                   "--namespace", namespace, "--lease-ttl", str(lease_ttl), *args]
        self.profile = profile
        if profile:
            py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) \
                or shutil.which("py-spy")
            if py_spy is None:
                raise RuntimeError("--profile needs py-spy (pip install 'etcdcron[bench]')")
            command = [py_spy, "record", "--format", "raw", "--rate", str(PROFILE_RATE),
                       "--gil", "--function", "--nonblocking", "--output", profile, "--",
                       *command]
        self.stderr_path = os.path.join(run.work, f"{self.name}.log")
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr, text=True, bufsize=1,
                                        start_new_session=True, cwd=ROOT)
        self.pid: int | None = None            # the replica's own (py-spy's child when profiled)
        # Guards count, last and events; notified on every line read.
        self._cond = threading.Condition()
        self.count, self.last = 0, 0.0
        self.events: dict[str, dict] = {}
        self._reader = threading.Thread(target=self._read, name=f"bench-read-{self.name}",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue                         # py-spy's own lines
            with self._cond:
                if "count" in message and "event" not in message:
                    self.count, self.last = message["count"], message["last"]
                else:
                    self.events[message["event"]] = message
                    if message["event"] == "ready":
                        self.pid = message["pid"]
                self._cond.notify_all()
        with self._cond:
            self.events.setdefault("exited", {})
            self._cond.notify_all()

    def wait(self, event: str, timeout: float) -> dict:
        with self._cond:
            if not self._cond.wait_for(lambda: event in self.events or "exited" in self.events,
                                       timeout):
                raise TimeoutError(f"replica {self.name}: no {event!r} within {timeout} s"
                                   f"{self.log_tail()}")
            if event not in self.events:
                raise RuntimeError(f"replica {self.name} exited before {event!r}"
                                   f"{self.log_tail()}")
            return self.events[event]

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.stderr_path, errors="replace") as log:
                tail = log.readlines()[-lines:]
        except OSError:
            return ""
        return ("\n    " + "    ".join(tail)) if tail else ""

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 60) -> dict:
        """Stop the Cron cleanly; its final report."""
        self.send("stop")
        report = self.wait("stopped", timeout)
        self.process.wait(timeout)
        return report

    def kill(self) -> None:
        """SIGKILL the replica itself, by its PID."""
        os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Make sure the process is gone, by its PID (and, when profiled, the replica's own)."""
        try:
            self.process.stdin.close()           # the replica stops at the end of its stdin
        except OSError:
            pass
        if self.process.poll() is None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
        if self.pid is not None and self.pid != self.process.pid and self._still_ours(self.pid):
            os.kill(self.pid, signal.SIGKILL)    # a replica that outlived its py-spy
        self._stderr.close()

    def _still_ours(self, pid: int) -> bool:
        """Whether ``pid`` is still this replica (and not a PID reused since it exited)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except OSError:
            return False
        return REPLICA.encode() in words and self.namespace.encode() in words


def stop_all(replicas: list[Replica]) -> list[dict]:
    for replica in replicas:
        replica.send("stop")
    reports = [replica.wait("stopped", 60) for replica in replicas]
    for replica in replicas:
        replica.process.wait(60)
    return reports


# -- profiles -------------------------------------------------------------------------------------

def summarize_profile(raw_path: str, top: int = 25) -> str:
    """A top-style text of a py-spy ``raw`` (collapsed stacks) profile: functions by self
    samples and by total samples."""
    own, total, samples = collections.Counter(), collections.Counter(), 0
    with open(raw_path) as raw:
        for line in raw:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            samples += n
            frames = stack.split(";")
            if frames and frames[0].startswith("process "):
                frames = frames[1:]
            if frames and frames[0].startswith("thread "):
                frames = frames[1:]
            if not frames:
                continue
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    lines = [f"py-spy profile {os.path.basename(raw_path)}: {samples} samples at "
             f"{PROFILE_RATE} Hz of the thread holding the GIL, so {samples / PROFILE_RATE:.1f} s "
             f"of Python running in the replica's life", "",
             f"top {top} by self samples:", "   self%  total%  function"]
    for frame, n in own.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}")
    lines += ["", f"top {top} by total samples (the frame anywhere on the stack):",
              "  total%   self%  function"]
    for frame, n in total.most_common(top):
        lines.append(f"  {100 * n / samples:5.1f}  {100 * own[frame] / samples:6.1f}  {frame}")
    return "\n".join(lines) + "\n"


def profile_path(run: Run, label: str) -> str | None:
    if not run.args.profile:
        return None
    os.makedirs(PROFILES, exist_ok=True)
    return os.path.join(PROFILES, f"{label}.txt")


def finish_profile(run: Run, path: str | None) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        say(f"  !! py-spy wrote no profile to {path}")
        return
    top = path[:-len(".txt")] + "-top.txt"
    with open(top, "w") as out:
        out.write(summarize_profile(path))
    run.profiles.append(os.path.relpath(top, BENCH))
    say(f"  profile: {os.path.relpath(path, ROOT)} (collapsed stacks; speedscope opens it), "
        f"summary {os.path.relpath(top, ROOT)}")


# -- 1. burst -------------------------------------------------------------------------------------

def burst_once(run: Run, n: int, replicas: int, profile: str | None = None) -> dict:
    """Seconds from start() until all ``n`` past-due one-shots fired and none is left
    (``seconds``), and the CPU seconds the replicas and etcd used meanwhile."""
    namespace = run.namespace(f"burst-{n}-r{replicas}")
    run.write_jobs(namespace, n, lambda i: (f"job-{i}", Job(due_time="0s")))
    procs = [run.replica("count", namespace, profile=profile if i == 0 else None)
             for i in range(replicas)]
    try:
        for proc in procs:
            proc.wait("ready", 60)
        etcd_cpu = process_cpu(run.etcd.pid)
        began = time.time()
        for proc in procs:
            proc.send("go")
        wait_until(lambda: sum(p.count for p in procs) >= n, timeout=600, interval=0.005,
                   message=lambda: f"{n} triggers (have {sum(p.count for p in procs)})")
        fired = max(p.last for p in procs)
        wait_until(lambda: run.job_count(namespace) == 0, timeout=600, interval=0.005,
                   message=lambda: f"no job left (have {run.job_count(namespace)})")
        emptied = time.time()
        etcd_cpu = process_cpu(run.etcd.pid) - etcd_cpu
        reports = stop_all(procs)
    finally:
        for proc in procs:
            proc.close()
    calls = sum(r["count"] for r in reports)
    if calls != n:
        say(f"  !! {calls} trigger calls for {n} jobs")
    run.drop(namespace)
    return dict(seconds=max(fired, emptied) - began, etcd_cpu=etcd_cpu,
                replica_cpu=sum(r["cpu"] for r in reports))


def bench_burst(run: Run) -> None:
    sizes = run.sizes
    for n in sizes.burst:
        for replicas in sizes.burst_replicas:
            profiled = run.args.profile and n == sizes.profiled_burst and replicas == 1
            path = profile_path(run, f"burst-{n}") if profiled else None
            measured = burst_once(run, n, replicas, path)
            seconds = measured["seconds"]
            finish_profile(run, path)
            per_second = n / seconds
            run.burst_rates[(n, replicas)] = per_second
            target, met = "", None
            if n == 100_000:
                target, met = "≥ 25,000/s", per_second >= 25_000
            elif n == 10_000:
                target = "≥ 4x raw compare-and-put (see ceilings)"
            run.add(Result("burst", f"{n:,} past-due one-shots, end to end",
                           f"{replicas} replica process{'es' if replicas > 1 else ''}"
                           + (", profiled" if profiled else ""),
                           f"{seconds:.2f} s, {per_second:,.0f}/s (CPU: replicas "
                           f"{measured['replica_cpu']:.1f} s, etcd {measured['etcd_cpu']:.1f} s)",
                           target, met))


# -- 2. steady ------------------------------------------------------------------------------------

def steady_once(run: Run, n: int, spread: bool, profile: str | None = None) -> dict:
    seconds = run.sizes.steady_secs
    namespace = run.namespace(f"steady-{n}-{'spread' if spread else 'aligned'}")
    # The first tick leaves time to write the jobs (about 15,000/s) and for the replica to
    # load them (about 8,000/s), on a busy machine.
    first = math.ceil(time.time() + 3 + n / 15_000 + n / 8_000)
    micros = [first * 1_000_000 + (i * 1_000_000 // n if spread else 0) for i in range(n)]

    def job_for(i: int):
        due = datetime.fromtimestamp(micros[i] // 1_000_000, timezone.utc)
        stamp = due.strftime("%Y-%m-%dT%H:%M:%S") + f".{micros[i] % 1_000_000:06d}Z"
        return f"j{i}", Job(schedule="@every 1s", due_time=stamp)

    run.write_jobs(namespace, n, job_for)
    window = (first + STEADY_WARMUP, first + STEADY_WARMUP + seconds)
    out = os.path.join(run.work, f"{namespace}.lateness")
    args = ["--n", str(n), "--first", str(first), "--window-start", str(window[0]),
            "--window-end", str(window[1]), "--out", out] + (["--spread"] if spread else [])
    proc = run.replica("steady", namespace, *args, profile=profile)
    try:
        proc.wait("ready", 60)
        proc.send("go")
        elected = proc.wait("elected", 120)
        late_start = time.time() > first
        wait_until(lambda: time.time() >= window[1] + 1.5, timeout=seconds + 600,
                   interval=0.05)
        report = proc.stop()
    finally:
        proc.close()
    run.drop(namespace)
    lateness = array.array("d")
    with open(out, "rb") as samples:
        lateness.frombytes(samples.read())
    report.update(lateness=lateness, late_start=late_start, elected_after=elected["after"])
    return report


def bench_steady(run: Run) -> None:
    sizes = run.sizes
    seconds = sizes.steady_secs
    for n in sizes.steady:
        for spread in (False, True):
            profiled = run.args.profile and n == sizes.profiled_steady and not spread
            path = profile_path(run, f"steady-{n}") if profiled else None
            report = steady_once(run, n, spread, path)
            finish_profile(run, path)
            label = f"{n:,} {'spread' if spread else 'aligned'}"
            lateness = report["lateness"]
            run.lateness[label] = lateness
            ordered = sorted(lateness)
            due = n * seconds
            all_fired = report["short"] == 0 and report["over"] == 0 and len(lateness) == due
            p50, p99, worst = (percentile(ordered, 50), percentile(ordered, 99), ordered[-1]) \
                if ordered else (math.nan,) * 3
            cpu = report["window_cpu"] / seconds
            value = (f"lateness p50 {ms(p50)}, p99 {ms(p99)}, max {ms(worst)}; "
                     f"{report['calls_in_window'] / seconds:,.0f} triggers/s of {n:,}/s due; "
                     f"all ticks fired: {'yes' if all_fired else 'NO'} "
                     f"({len(lateness):,}/{due:,}"
                     + (f", {report['short']} jobs short" if report["short"] else "")
                     + (f", {report['over']} jobs over" if report["over"] else "")
                     + f"); CPU {100 * cpu:.0f}% of a core")
            if report["late_start"]:
                value += "; !! the replica was elected after the first tick"
            if ordered and ordered[0] < 0:
                value += f"; !! {sum(1 for x in ordered if x < 0)} triggers EARLY"
            target, met = "", None
            if n == 1_000 and not spread:
                target, met = "p99 ≤ 5 ms", p99 <= 0.005
            elif n == 10_000:
                target, met = "p99 ≤ 20 ms, all ticks fired", p99 <= 0.020 and all_fired
            run.add(Result("steady", f"{n:,} jobs @every 1s, {'spread over' if spread else 'aligned on'}"
                           f" the second", f"{seconds} s window after {STEADY_WARMUP} s warm-up,"
                           f" 1 replica" + (", profiled" if profiled else ""),
                           value, target, met))


def write_histogram(run: Run, path: str) -> bool:
    """The lateness histogram of the steady runs (aligned and spread side by side)."""
    if not run.lateness:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("aligned", "spread")):
        series = {label: values for label, values in run.lateness.items() if label.endswith(kind)}
        top = max((percentile(sorted(v), 99.9) for v in series.values() if len(v)), default=0.01)
        bins = [top * 1000 * i / 100 for i in range(101)]
        for label, values in series.items():
            if len(values):
                clipped = [min(v * 1000, bins[-1]) for v in values]
                ax.hist(clipped, bins=bins, histtype="step", label=f"{label} jobs", linewidth=1.4)
        ax.set_yscale("log")
        ax.set_xlabel("lateness: trigger call minus tick (ms; the last bin holds the rest)")
        ax.set_title(f"@every 1s, ticks {kind} {'on' if kind == 'aligned' else 'over'} the second")
        ax.legend()
    axes[0].set_ylabel("trigger calls")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# -- 3. scale -------------------------------------------------------------------------------------

LAST = "zz-last"       # sorts after every j<i>: the last job a replica loads


def bench_scale(run: Run) -> None:
    for n in run.sizes.scale:
        namespace = run.namespace(f"scale-{n}")
        # n future jobs (due in an hour) and, last in key order, one past due.
        wrote = run.write_jobs(namespace, n, lambda i: (f"j{i:07d}", Job(due_time="1h")),
                               threads=8)
        writer = Cron(endpoints=run.etcd.endpoint, namespace=namespace, trigger=print)
        try:
            writer.add(LAST, Job(due_time="0s"))
        finally:
            writer.stop()
        say(f"  (wrote {n:,} jobs in {wrote:.1f} s, {n / wrote:,.0f}/s)")

        lister = Cron(endpoints=run.etcd.endpoint, namespace=namespace, trigger=print)
        try:
            began = time.perf_counter()
            listed = len(lister.list())
            took = time.perf_counter() - began
        finally:
            lister.stop()
        gc.collect()
        target, met = ("≤ 10 s", took <= 10) if n == 1_000_000 else ("", None)
        run.add(Result("scale", f"list() of {n:,} stored jobs", "fresh Cron, not started",
                       f"{took:.2f} s ({listed:,} jobs, {rate(listed, took)})", target, met))

        path = profile_path(run, f"ready-{n}") if n == max(run.sizes.scale) else None
        proc = run.replica("ready", namespace, "--last", LAST, profile=path)
        try:
            proc.wait("ready", 60)
            proc.send("go")
            ready = proc.wait("fired_last", 900)["after"]
            rss = proc.wait("rss", 60)
            proc.stop(120)
        finally:
            proc.close()
        finish_profile(run, path)
        target, met = ("≤ 20 s", ready <= 20) if n == 1_000_000 else ("", None)
        run.add(Result("scale", f"replica over {n:,} stored jobs: start() until ready",
                       "fresh process; ready = the last job in key order (past due) fired"
                       + (", profiled" if path else ""),
                       f"{ready:.2f} s", target, met))
        growth = (rss["after_kib"] - rss["before_kib"]) * 1024
        per_job = growth / n
        run.add(Result("scale", f"RSS growth per loaded job ({n:,} jobs)",
                       "fresh process, VmRSS before start() and once ready (+1 s, gc)",
                       f"{per_job:,.0f} bytes/job ({rss['before_kib'] / 1024:.0f} -> "
                       f"{rss['after_kib'] / 1024:.0f} MiB)", "≤ 1 KB (1,024 bytes)",
                       per_job <= 1024))
        for threads in ADD_THREADS:
            calls = run.sizes.adds * (1 if threads == 1 else 2)
            took = add_throughput(run, namespace, threads, calls)
            run.add(Result("scale", f"add() throughput, {threads} thread{'s' if threads > 1 else ''}",
                           f"{calls:,} calls, one unstarted Cron, {n:,} jobs stored",
                           f"{rate(calls, took)} ({took:.2f} s)"))
        run.drop(namespace)


def add_throughput(run: Run, namespace: str, threads: int, calls: int) -> float:
    cron = Cron(endpoints=run.etcd.endpoint, namespace=namespace, trigger=print)
    try:
        cron.add("add-warm-up", Job(due_time="1h"))
        per_thread = calls // threads

        def adds(t: int) -> None:
            for i in range(per_thread):
                cron.add(f"add-{threads}-{t}-{i}", Job(due_time="1h"))

        began = time.perf_counter()
        with ThreadPoolExecutor(threads, thread_name_prefix="bench-add") as pool:
            list(pool.map(adds, range(threads)))
        return time.perf_counter() - began
    finally:
        cron.stop()


# -- 4. failover ----------------------------------------------------------------------------------

def read_log(path: str) -> list[tuple[float, str]]:
    fires = []
    try:
        with open(path) as log:
            for line in log:
                stamp, _, name = line.strip().partition(" ")
                if name:
                    fires.append((float(stamp), name))
    except OSError:
        pass
    return fires


def bench_failover(run: Run) -> None:
    n, ttl = run.sizes.failover_jobs, 3
    namespace = run.namespace("failover")
    run.write_jobs(namespace, n, lambda i: (f"job-{i}", Job(schedule="@every 1s")))
    logs = [os.path.join(run.work, f"{namespace}-{i}.log") for i in range(2)]
    procs = [run.replica("log", namespace, "--out", log, lease_ttl=ttl) for log in logs]
    try:
        for proc in procs:
            proc.wait("ready", 60)
            proc.send("go")
        for proc in procs:
            proc.wait("elected", 60)
        # Both own some jobs: each fired within the last second.
        wait_until(lambda: all({name for at, name in read_log(log) if at > time.time() - 1}
                               for log in logs) and len(
            {name for log in logs for at, name in read_log(log) if at > time.time() - 1.5}) == n,
            timeout=60, interval=0.1, message="both replicas firing, every job")
        time.sleep(2)
        now = time.time()
        victim_jobs = {name for at, name in read_log(logs[0]) if at > now - 1.5}
        killed = time.time()
        procs[0].kill()
        procs[0].process.wait(30)

        def taken_over() -> bool:
            fired = {name for at, name in read_log(logs[1]) if at > killed}
            return victim_jobs <= fired

        wait_until(taken_over, timeout=10 * ttl + 30, interval=0.05,
                   message=lambda: f"the survivor firing the {len(victim_jobs)} jobs")
        stop_all(procs[1:])
    finally:
        for proc in procs:
            proc.close()
    first_after = {}
    for at, name in read_log(logs[1]):
        if at > killed and name in victim_jobs and name not in first_after:
            first_after[name] = at - killed
    run.drop(namespace)
    run.add(Result("failover", "SIGKILL of a replica until its jobs fire on the other",
                   f"2 replica processes, lease_ttl={ttl}, {n} jobs @every 1s, "
                   f"{len(victim_jobs)} on the killed one",
                   f"first after {min(first_after.values()):.2f} s, all after "
                   f"{max(first_after.values()):.2f} s"))


# -- 5. ceilings and peers ------------------------------------------------------------------------

def raw_cas(run: Run, n: int, threads: int) -> float:
    """Compare-and-put transactions per second: one per key (``mod == its revision``, then a
    put), from ``threads`` threads through etcdcron's own client."""
    namespace = run.namespace(f"cas-{threads}")
    prefix = f"{namespace}/k/".encode()
    keys = [prefix + f"{i:07d}".encode() for i in range(n)]
    value = b"\x08\x01\x12\x0c\x08\xd2\x85\xd8\xcc\x04\x10\x80\xb5\x18\x18\x01" * 2  # ~ a counter
    for start in range(0, n, WRITE_BATCH):
        run.client.txn([], [op_put(key, value) for key in keys[start:start + WRITE_BATCH]])
    _, kvs = run.client.list_prefix(prefix)
    revisions = {kv.key: kv.mod_revision for kv in kvs}
    failed = []

    def cas(part: int) -> None:
        for key in keys[part::threads]:
            if not run.client.txn([cmp_mod(key, revisions[key])], [op_put(key, value)]).succeeded:
                failed.append(key)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-cas") as pool:
        list(pool.map(cas, range(threads)))
    took = time.perf_counter() - began
    if failed:
        say(f"  !! {len(failed)} compare-and-puts failed")
    run.drop(namespace)
    return n / took


def apscheduler(run: Run, store: str, n: int) -> dict:
    args = [sys.executable, PEERS, store, str(n)]
    if store == "sqlite":
        args.append(os.path.join(run.work, "apscheduler.sqlite"))
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, start_new_session=True)
    try:
        out, err = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
    if process.returncode != 0:
        raise RuntimeError(f"APScheduler ({store}) failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def bench_ceilings(run: Run) -> None:
    n = run.sizes.peers
    etcdcron_rate = run.burst_rates.get((n, 1))
    if etcdcron_rate is None:          # --only ceilings: the burst it is compared to
        measured = burst_once(run, n, 1)
        etcdcron_rate = n / measured["seconds"]
        run.burst_rates[(n, 1)] = etcdcron_rate
        run.add(Result("burst", f"{n:,} past-due one-shots, end to end",
                       "1 replica process (run for the ceilings)",
                       f"{measured['seconds']:.2f} s, {etcdcron_rate:,.0f}/s"))
    ours = f"etcdcron {etcdcron_rate:,.0f}/s ({n:,} one-shots, 1 replica)"
    workers = check_workers(None)
    cas_rates = {}
    for threads, why in ((recorder_module.THREADS, "etcdcron's recorder threads"),
                         (workers, "etcdcron's default workers")):
        if threads in cas_rates:
            continue
        cas_rates[threads] = raw_cas(run, n, threads)
        run.add(Result("ceilings", "raw etcd compare-and-put from Python",
                       f"{n:,} txns (one compare, one put), EtcdClient.txn, {threads} threads "
                       f"({why})", f"{cas_rates[threads]:,.0f}/s"))
    ceiling = max(cas_rates.values())
    ratio = etcdcron_rate / ceiling
    for result in run.results:         # the burst row this target belongs to
        if result.row == "burst" and result.what.startswith(f"{n:,} ") \
                and result.params.startswith("1 replica"):
            result.target = f"≥ 4x raw compare-and-put: ≥ {4 * ceiling:,.0f}/s"
            result.met = ratio >= 4
    run.add(Result("ceilings", "etcdcron burst / raw compare-and-put",
                   f"{ours} over the faster raw rate", f"{ratio:.2f}x", "≥ 4x", ratio >= 4))
    for store, title in (("memory", "MemoryJobStore"), ("sqlite", "SQLAlchemyJobStore, SQLite")):
        peer = apscheduler(run, store, n)
        peer_rate = n / peer["emptied"]
        run.add(Result("ceilings", f"APScheduler 3.11 BackgroundScheduler, {title}",
                       f"the same {n:,} past-due one-shots, from resume() until all ran and "
                       f"the store is empty", f"{peer['emptied']:.2f} s, {peer_rate:,.0f}/s; "
                       f"etcdcron / APScheduler = {etcdcron_rate / peer_rate:.2f}x"))


# -- RESULTS.md -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def etcd_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return out.strip().splitlines()[0] if out.strip() else "?"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT, timeout=10).stdout.strip()
        # What a run writes itself does not count as a local change.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!bench/RESULTS*", ":!bench/lateness*",
                                ":!bench/profiles"],
                               capture_output=True, text=True, cwd=ROOT, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (head + (" with local changes" if dirty.strip() else "")) if head else "?"


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_results(run: Run, path: str, histogram: str | None, mode: str, took: float) -> None:
    etcd = run.etcd
    lines = [f"# etcdcron benchmark results ({mode})", ""]
    if mode != "full run":
        lines += [f"> **{mode.upper()}**: not the benchmark of record. "
                  + ("Small sizes, to check that every row runs; the numbers mean little."
                     if "quick" in mode else "Only some rows ran.") + "", ""]
    lines += [
        f"Written by `make bench` (`python bench/run.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`)"
        f" on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {took / 60:.1f} minutes.", "",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} "
        f"{platform.release()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), etcd "
        f"{etcd_version(etcd.binary)}, etcdcron {etcdcron_version} (commit {run.commit}), "
        f"grpcio {version_of('grpcio')}, protobuf {version_of('protobuf')}, APScheduler "
        f"{version_of('apscheduler')}, SQLAlchemy {version_of('sqlalchemy')}",
        f"- etcd: one member on 127.0.0.1, data on {fs_type(etcd.data_dir)} "
        f"({'in /dev/shm: fsync is nearly free (--shm)' if run.args.shm else 'on disk: fsync counts'}), "
        f"--quota-backend-bytes={QUOTA_BYTES}, otherwise etcd's defaults; the benchmark, its "
        f"replica processes and etcd share the machine's cores",
        "", markdown_table(run.results), ""]
    if histogram:
        lines += ["## Lateness of the steady rows", "",
                  f"![lateness histogram]({os.path.basename(histogram)})", ""]
    if run.profiles:
        lines += ["## Profiles", ""] + [f"- [{p}]({p})" for p in run.profiles] + [""]
    lines += ["How each row is measured: [README.md](README.md).", ""]
    with open(path, "w") as out:
        out.write("\n".join(lines))


# -- main -----------------------------------------------------------------------------------------

BENCHES = {"ceilings": bench_ceilings, "burst": bench_burst, "steady": bench_steady,
           "failover": bench_failover, "scale": bench_scale}
#: The order of a run: the burst first, so that the ceilings compare to it (same etcd state);
#: the scale rows last (their million jobs make etcd's database big).
ORDER = ("burst", "ceilings", "steady", "failover", "scale")


def main() -> int:
    parser = argparse.ArgumentParser(description="etcdcron's benchmark suite (issue 9)")
    parser.add_argument("--quick", action="store_true",
                        help="every row at small sizes: a smoke run of about 2 minutes")
    parser.add_argument("--only", action="append", metavar="ROW", default=[],
                        help=f"run only these rows (repeat, or comma-separate): {', '.join(ROWS)}")
    parser.add_argument("--shm", action="store_true",
                        help="keep etcd's data in /dev/shm (fsync nearly free) instead of on disk")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy profiles of one replica during the biggest one-replica "
                             "burst and the 10,000-job aligned steady run, into bench/profiles/")
    parser.add_argument("--output", help="where to write the results (default: bench/RESULTS.md; "
                                         "RESULTS-quick.md with --quick, RESULTS-partial.md with "
                                         "--only)")
    parser.add_argument("--size", action="append", type=int, metavar="N", default=[],
                        help="run the burst, steady and scale rows only at these job counts "
                             "(repeat for more), e.g. --only steady --size 10000")
    args = parser.parse_args()
    only = [row for value in args.only for row in value.split(",") if row]
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    rows = [row for row in ORDER if not only or row in only]
    sizes = QUICK if args.quick else FULL
    if args.size:
        keep = lambda counts: tuple(n for n in counts if n in args.size)  # noqa: E731
        sizes = dataclasses.replace(sizes, burst=keep(sizes.burst), steady=keep(sizes.steady),
                                    scale=keep(sizes.scale))
    mode = ("quick smoke run" if args.quick else "full run") + (
        f", rows {', '.join(rows)} only" if only else "") + (
        f", sizes {', '.join(f'{n:,}' for n in args.size)} only" if args.size else "")
    suffix = "-quick" if args.quick else ("-partial" if only or args.size else "")
    output = args.output or os.path.join(BENCH, f"RESULTS{suffix}.md")
    histogram = os.path.join(os.path.dirname(os.path.abspath(output)), f"lateness{suffix}.png")

    logging.basicConfig(level=logging.WARNING, format="    [%(name)s %(levelname)s] %(message)s")
    began = time.perf_counter()
    failed: list[str] = []
    with Run(args, sizes) as run:
        say(f"etcd {run.etcd.endpoint}, data in {run.etcd.data_dir} "
            f"({fs_type(run.etcd.data_dir)}); {os.cpu_count()} cores; {mode}")
        try:
            for row in rows:
                say(f"== {row}")
                try:
                    BENCHES[row](run)
                except Exception as exc:  # noqa: BLE001 - the other rows still run
                    failed.append(row)
                    traceback.print_exc()
                    run.add(Result(row, "**the row failed**", "see the run's output",
                                   f"{type(exc).__name__}: {exc}"[:300].replace("\n", " ")))
        finally:
            took = time.perf_counter() - began
            drawn = write_histogram(run, histogram)
            write_results(run, output, histogram if drawn else None, mode, took)
    say(f"\n== results ({took / 60:.1f} min, {mode}) ==\n")
    say(markdown_table(run.results))
    say(f"\nwritten to {os.path.relpath(output, ROOT)}"
        + (f" and {os.path.relpath(histogram, ROOT)}" if drawn else ""))
    if failed:
        say(f"!! rows that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
