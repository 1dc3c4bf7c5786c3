"""One chaos run, start to end (runs on the orchestrator's main thread).

1. A 3-member etcd cluster on loopback; the history watches (:mod:`tests.chaos.history`).
2. The initial jobs, written in bulk, due from ``P`` (the fault phase's start) on.
3. ``replicas`` replica processes (:mod:`tests.chaos.replica`), each behind its own
   :class:`~etcdcron.testing.ProxyGroup` (one proxy per member), plus one spare slot for the
   replica that joins and leaves; the run waits until all are elected together (that start,
   a rebalance per replica, is logged as a ``startup`` window like a fault's).
4. The fault phase (``seconds`` long): the injector's faults and the driver's changes.
5. The settle phase: every fault is undone; the replicas catch up undisturbed until the cut.
6. The replicas stop (SIGTERM: ``stop()`` records what is in flight), the history catches up
   with a marker write, and the audit runs on what was recorded.

Everything lands in the run directory: ``run.json`` (the parameters), ``faults.jsonl``,
``driver.jsonl``, ``history.jsonl``, each replica's ``<id>.<n>.log`` (its events) and
``<id>.<n>.err`` (its etcdcron log), and ``report.txt``. ``python -m tests.chaos --audit DIR``
audits a kept directory again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc

from etcdcron import Cron
from etcdcron.testing import EtcdCluster, bulk_add, wait_until
from tests.chaos import faults as faults_mod
from tests.chaos import workload as workload_mod
from tests.chaos.audit import Audit, Call, Delivery, Finding, Report, Window
from tests.chaos.history import Change, History
from tests.chaos.report import render

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    seconds: float = 120.0
    seed: int = 0
    replicas: int = 4
    lease_ttl: int = 4
    settle: float | None = None  # default: 2 leases + 10 s
    grace: float = 5.0
    lead: float = 8.0            # seconds from writing the jobs to P
    workers: int | None = None
    request_timeout: float = 5.0
    mean_gap: float = 4.0
    max_replica_faults: int = 2

    def __post_init__(self):
        if self.settle is None:
            self.settle = 2 * self.lease_ttl + 10.0

    @property
    def head(self) -> float:
        return 2.0

    @property
    def tail(self) -> float:
        return self.lease_ttl + 4.0


def read_lines(path: Path) -> list[list[str]]:
    """The whole lines of an event log, split; a partial last line (a SIGKILL) is skipped."""
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [line.split(" ") for line in complete if line]


class Slot:
    """One replica position: its proxies, its current process, and every log it wrote."""

    def __init__(self, index: int, run: ChaosRun):
        self.index = index
        self._run = run
        self.proxies = run.cluster.proxies()
        self.replica_id = f"r{index}"
        self.incarnation = 0
        self.process: subprocess.Popen | None = None
        self._ended_by_us = True
        self.logs: list[tuple[str, Path]] = []  # (label, event log)
        self.crashes: list[str] = []
        # Guards process, _ended_by_us and crashes: fault threads and the main thread act here.
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"{self.replica_id}.{self.incarnation}"

    def _check_locked(self) -> None:
        if self.process is not None and self.process.poll() is not None and not self._ended_by_us:
            self.crashes.append(f"{self.label} exited by itself with {self.process.returncode}")
            self._ended_by_us = True

    def start(self, new_id: bool = False) -> None:
        with self._lock:
            self._check_locked()
            self.incarnation += 1
            if new_id:
                self.replica_id = f"r{self.index}n{self.incarnation}"
            label = self.label
            log, err = (self._run.out / f"{label}.log", self._run.out / f"{label}.err")
            self.logs.append((label, log))
            s = self._run.settings
            args = [sys.executable, "-m", "tests.chaos.replica",
                    "--endpoints", ",".join(self.proxies.endpoints),
                    "--namespace", self._run.namespace, "--replica-id", self.replica_id,
                    "--log", str(log), "--lease-ttl", str(s.lease_ttl)]
            if s.workers:
                args += ["--workers", str(s.workers)]
            with open(err, "ab") as stderr:
                self.process = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL,
                                                stdout=stderr, stderr=subprocess.STDOUT,
                                                start_new_session=True)
            self._ended_by_us = False

    def signal(self, signum: int) -> None:
        with self._lock:
            self._check_locked()
            if self.process is not None and self.process.poll() is None:
                os.kill(self.process.pid, signum)

    def kill(self) -> None:
        with self._lock:
            self._check_locked()
            if self.process is not None and self.process.poll() is None:
                self._ended_by_us = True
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def terminate(self, timeout: float = 45.0) -> None:
        """SIGTERM (after SIGCONT) and wait; a replica that does not stop in time is a defect."""
        with self._lock:
            self._check_locked()
            process = self.process
            if process is None or process.poll() is not None:
                return
            self._ended_by_us = True
            os.kill(process.pid, signal.SIGCONT)
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.crashes.append(f"{self.label} did not stop within {timeout}s of SIGTERM")
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return
            if process.returncode != 0:
                self.crashes.append(f"{self.label} exited with {process.returncode} on SIGTERM")

    def running(self) -> bool:
        with self._lock:
            self._check_locked()
            return self.process is not None and self.process.poll() is None

    def last_elected(self) -> int | None:
        if not self.logs:
            return None
        counts = [int(f[2]) for f in read_lines(self.logs[-1][1]) if f[1:2] == ["elected"]]
        return counts[-1] if counts else None


class ChaosRun:
    def __init__(self, settings: Settings, out: Path):
        self.settings = settings
        self.out = out
        self.namespace = f"chaos{settings.seed % 100000}"
        self.cluster: EtcdCluster | None = None
        self.history: History | None = None
        self.slots: list[Slot] = []
        self._stop = threading.Event()

    # -- used by the injector ------------------------------------------------------------------

    def compact(self) -> str:
        """Compact etcd to the revision the history has seen in full (physical=False)."""
        target = self.history.complete
        for member in self.cluster.members:
            if not member.running():
                continue
            with grpc.insecure_channel(member.endpoint) as channel:
                stub = rpc_grpc.KVStub(channel)
                try:
                    stub.Compact(rpc.CompactionRequest(revision=target), timeout=3)
                    return f"to revision {target} via {member.name}"
                except grpc.RpcError as exc:
                    if "required revision has been compacted" in (exc.details() or ""):
                        return f"revision {target} was compacted already"
                    continue
        return f"to revision {target}: no member answered"

    # -- the run ---------------------------------------------------------------------------------

    def execute(self) -> Report:
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "run.json").write_text(json.dumps(s.__dict__ | {"namespace": self.namespace}))
        rng_work = random.Random(f"{s.seed}-workload")
        rng_faults = random.Random(f"{s.seed}-faults")
        self.cluster = EtcdCluster(3).start()
        try:
            return self._execute(rng_work, rng_faults)
        finally:
            self._stop.set()
            for slot in self.slots:
                slot.kill()
            self.cluster.close()

    def _execute(self, rng_work: random.Random, rng_faults: random.Random) -> Report:
        s = self.settings
        prefix = f"{self.namespace}/".encode()
        start_revision = self._current_revision() + 1
        self.history = History(self.cluster.endpoints, prefix, start_revision).start()
        producer = Cron(endpoints=self.cluster.endpoints, namespace=self.namespace,
                        trigger=lambda req: None, request_timeout=s.request_timeout)
        p = time.time() + s.lead
        work = workload_mod.plan(rng_work, p, s.seconds, s.settle, s.grace)
        versions = workload_mod.Versions()
        initial = [versions.new(spec) for spec in work.initial]
        bulk_add(producer, {spec.name: spec.job() for spec in initial})
        plan = faults_mod.plan(rng_faults, s.seconds, s.replicas, s.lease_ttl,
                               mean_gap=s.mean_gap, max_replica_faults=s.max_replica_faults)
        self.slots = [Slot(i, self) for i in range(s.replicas + 1)]  # the last one joins later
        began = time.time()
        for slot in self.slots[:s.replicas]:
            slot.start()
        wait_until(lambda: all(slot.last_elected() == s.replicas
                               for slot in self.slots[:s.replicas]), timeout=90,
                   interval=0.2, message="every replica elected")
        # Replicas joining one by one rebalance like any join: a window of its own.
        with open(self.out / "faults.jsonl", "a") as log:
            log.write(json.dumps({"event": "ended", "kind": "startup", "target": None,
                                  "params": {}, "start": None, "duration": None,
                                  "began": began, "ended": time.time(),
                                  "detail": f"{s.replicas} replicas"}) + "\n")
        print(f"[chaos] seed {s.seed}: {len(initial)} jobs, {len(work.changes)} changes, "
              f"{len(plan)} faults; replicas elected; run directory {self.out}", flush=True)
        if p > time.time():
            self._stop.wait(p - time.time())
        else:
            p = time.time()  # replicas took longer than the lead: the phase starts now
        driver = workload_mod.Driver(producer, work.changes, versions, p,
                                     str(self.out / "driver.jsonl"), self._stop,
                                     s.request_timeout)
        injector = faults_mod.Injector(self, plan, p, str(self.out / "faults.jsonl"), self._stop)
        driver.start()
        injector.start()
        self._stop.wait(max(0.0, p + s.seconds - time.time()))
        stuck = injector.join(timeout=90)
        driver.thread.join(60)
        injector.close()
        self._heal_everything()
        settle_end = p + s.seconds + s.settle
        print(f"[chaos] fault phase over{' (stuck: ' + str(stuck) + ')' if stuck else ''}; "
              f"settling {max(0.0, settle_end - time.time()):.0f}s", flush=True)
        self._stop.wait(max(0.0, settle_end - time.time()))
        cut = time.time()
        for slot in self.slots:
            slot.terminate()
        marker = f"{self.namespace}/chaos-end".encode()
        revision = self._put(marker)
        if not self.history.wait_complete(revision, 60):
            raise RuntimeError(f"the history did not reach revision {revision}")
        self.history.stop()
        producer.stop()
        changes = self.history.changes()
        with open(self.out / "history.jsonl", "w") as handle:
            for change in changes:
                handle.write(change.to_json() + "\n")
        (self.out / "cut.json").write_text(json.dumps({"cut": cut, "p": p}))
        report = audit_directory(self.out, changes=changes)
        for slot in self.slots:
            for crash in slot.crashes:
                report.add("replica crashes", None, crash)
        for error in injector.errors:
            report.counts["fault injection errors"] += 1
            report.findings.append(Finding("fault injection error", "-", "-", error))
        text = render(report, self.out)
        (self.out / "report.txt").write_text(text)
        print(text, flush=True)
        return report

    def _heal_everything(self) -> None:
        """Whatever a fault left behind (it should have undone it): undo it now."""
        for member in self.cluster.members:
            member.resume()
            if not member.running():
                member.start(timeout=60)
        for slot in self.slots:
            slot.proxies.heal()
            slot.signal(signal.SIGCONT)
        for slot in self.slots[:self.settings.replicas]:
            if not slot.running():
                slot.start()

    def _current_revision(self) -> int:
        with grpc.insecure_channel(self.cluster.members[0].endpoint) as channel:
            response = rpc_grpc.KVStub(channel).Range(
                rpc.RangeRequest(key=b"\0", count_only=True), timeout=10)
            return response.header.revision

    def _put(self, key: bytes) -> int:
        for member in self.cluster.members:
            with grpc.insecure_channel(member.endpoint) as channel:
                try:
                    return rpc_grpc.KVStub(channel).Put(
                        rpc.PutRequest(key=key, value=b"end"), timeout=10).header.revision
                except grpc.RpcError:
                    continue
        raise RuntimeError("no etcd member took the end marker")


def load_deliveries(out: Path) -> tuple[list[Delivery], dict[str, list[list[str]]]]:
    deliveries, events = [], {}
    for log in sorted(out.glob("*.log")):
        label = log.name[:-len(".log")]
        lines = read_lines(log)
        events[label] = lines
        for fields in lines:
            if fields[1] == "fire":
                fresh = float(fields[5]) if len(fields) > 5 else None
                deliveries.append(Delivery(float(fields[0]), fields[2], fields[3], fields[4],
                                           label, fresh))
    return deliveries, events


def load_calls(out: Path) -> list[Call]:
    calls = []
    path = out / "driver.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            calls.append(Call(d["op"], d["name"], d.get("version"), d["call"], d["done"],
                              d["ok"], d.get("error"), d.get("code"), d.get("raw", False),
                              d.get("took", 0.0), d.get("message", "")))
    return calls


def load_windows(out: Path) -> list[Window]:
    windows = []
    path = out / "faults.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if d["event"] != "ended" or d["began"] is None:
                continue
            target = d["detail"] or ("" if d["target"] is None else f"#{d['target']}")
            extra = " ".join(f"{k}={v}" for k, v in (d["params"] or {}).items())
            windows.append(Window(d["kind"], f"{target} {extra}".strip(), d["began"], d["ended"]))
    return sorted(windows, key=lambda w: w.began)


def audit_directory(out: Path, changes: list[Change] | None = None) -> Report:
    """Audit a run directory (the one just written, or a kept one)."""
    settings = json.loads((out / "run.json").read_text())
    cut = json.loads((out / "cut.json").read_text())["cut"]
    if changes is None:
        changes = [Change.from_json(line)
                   for line in (out / "history.jsonl").read_text().splitlines()]
    deliveries, _ = load_deliveries(out)
    s = Settings(**{k: v for k, v in settings.items() if k in Settings.__dataclass_fields__})
    audit = Audit(changes=changes, deliveries=deliveries, calls=load_calls(out),
                  windows=load_windows(out), namespace=settings["namespace"], cut=cut,
                  grace=s.grace, head=s.head, tail=s.tail, request_timeout=s.request_timeout)
    report = audit.run()
    report.settings = settings
    return report
