"""The jobs of a chaos run, and the driver thread that changes them while faults go on.

Everything is drawn from the run's seed. Times are seconds from the start of the fault phase
(``P``); due times are absolute RFC 3339 instants, so every tick of a job with a due time is
known in advance. Six-field crons have no due time: their ticks follow the ``start`` etcd holds
for them (the audit reads it from the history).

Kinds: ``every`` (``@every`` with repeats), ``cron`` (six fields, with or without repeats),
``oneshot``, ``flaky`` (a failure policy, and a trigger that fails some deliveries), ``ttl``
(an expiration), ``doomed`` (runs until the driver deletes it), ``replaced`` (upserted once or
twice with another spec), ``late`` (added by the driver mid-run).

The driver (thread ``chaos-driver``) performs the planned changes in time order through a Cron
that is never started, on the members' endpoints, and logs every call as a JSON line: when it
was called, when it returned (the acknowledgement), and the error if it raised. A failed call
is tried again (an add under a new version, since the failed one may have been applied).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from google.protobuf import any_pb2, wrappers_pb2

from etcdcron import EtcdCronError, FailurePolicy, FailurePolicyConstant, FailurePolicyDrop, Job

#: Six-field crons of the workload: only the seconds field varies (the audit's oracle knows it).
CRON_SECONDS = ["*/2", "*/3", "1/4", "0,10,20,30,40,50", "*/5", "7-9", "3,33", "*/7"]

#: Failure policies: (kind, interval seconds, max retries or None) or None (the default one).
POLICIES = [("constant", 0.5, 2), ("constant", 1.0, 1), ("constant", 0.3, None),
            ("drop", 0, None), None]
#: Trigger patterns for flaky jobs (see tests.chaos.replica); every one has an S, so a policy
#: without max_retries still ends every tick.
PATTERNS = ["SF", "FFS", "FFFS", "SFFF", "FS", "SSF"]


@dataclass
class Spec:
    """One version of a job, as the driver writes it."""

    name: str
    kind: str
    schedule: str | None = None
    due: float | None = None        # absolute epoch seconds
    repeats: int | None = None
    ttl: str | None = None          # a Go duration, counted from the due time
    policy: tuple | None = None
    pattern: str = "S"
    version: str = ""

    def job(self) -> Job:
        job = Job()
        if self.schedule is not None:
            job.schedule = self.schedule
        if self.due is not None:
            job.due_time = rfc3339(self.due)
        if self.repeats is not None:
            job.repeats = self.repeats
        if self.ttl is not None:
            job.ttl = self.ttl
        if self.policy is not None:
            kind, interval, retries = self.policy
            if kind == "drop":
                job.failure_policy.CopyFrom(FailurePolicy(drop=FailurePolicyDrop()))
            else:
                constant = FailurePolicyConstant()
                constant.interval.FromNanoseconds(int(interval * 1e9))
                if retries is not None:
                    constant.max_retries = retries
                job.failure_policy.CopyFrom(FailurePolicy(constant=constant))
        payload = any_pb2.Any()
        payload.Pack(wrappers_pb2.StringValue(value=f"{self.version}|{self.pattern}"))
        job.payload.CopyFrom(payload)
        return job


@dataclass
class Change:
    """A planned driver call: ``op`` is ``add`` or ``delete``; ``at`` seconds from P."""

    at: float
    op: str
    name: str
    spec: Spec | None = None


@dataclass
class Workload:
    initial: list[Spec] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)


def rfc3339(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def plan(rng: random.Random, p: float, seconds: float, settle: float, grace: float) -> Workload:
    """The jobs and changes of a run whose fault phase starts at epoch ``p`` and lasts
    ``seconds``; everything planned to be due ends by ``p + seconds + settle - grace``."""
    scale = max(1.0, seconds / 120)
    horizon = seconds + settle - grace - 3  # the last planned due time, from P
    names = iter(range(1_000_000))
    work = Workload()

    def n(count: int) -> int:
        return round(count * scale)

    def name(kind: str) -> str:
        return f"{kind}-{next(names):05d}"

    def whole(offset: float) -> float:
        return float(int(p + offset))

    def every_spec(nm: str, kind: str, start: float) -> Spec:
        period = rng.choice([1, 1, 1, 2, 1.5])
        room = max(3, int((horizon - start) / period))
        schedule = f"@every {int(period * 1000)}ms" if period % 1 else f"@every {int(period)}s"
        return Spec(nm, kind, schedule=schedule, due=whole(start),
                    repeats=rng.randint(3, min(30, room)))

    def cron_spec(nm: str, kind: str, start: float, forever: bool) -> Spec:
        spec = Spec(nm, kind, schedule=f"{rng.choice(CRON_SECONDS)} * * * * *")
        if not forever:
            spec.repeats = rng.randint(2, max(2, min(12, int((horizon - start) / 8))))
        return spec

    def oneshot_spec(nm: str, kind: str, lo: float, hi: float) -> Spec:
        return Spec(nm, kind, due=p + rng.uniform(lo, hi))

    for _ in range(n(60)):
        work.initial.append(every_spec(name("every"), "every", rng.uniform(-3, 0.6 * seconds)))
    for _ in range(n(30)):
        work.initial.append(cron_spec(name("cron"), "cron", 0, forever=False))
    for _ in range(20):
        work.initial.append(cron_spec(name("cronf"), "cron", 0, forever=True))
    for _ in range(n(100)):
        work.initial.append(oneshot_spec(name("once"), "oneshot", -2, horizon))
    for _ in range(n(30)):
        spec = every_spec(name("flaky"), "flaky", rng.uniform(-2, 0.6 * seconds))
        spec.repeats = min(spec.repeats, 12)
        spec.policy = rng.choice(POLICIES)
        spec.pattern = rng.choice(PATTERNS)
        work.initial.append(spec)
    for _ in range(n(10)):
        start = rng.uniform(-2, 0.6 * seconds)
        spec = Spec(name("ttl"), "ttl", schedule="@every 1s", due=whole(start),
                    ttl=f"{rng.randint(4, 20)}s")
        work.initial.append(spec)
    for _ in range(n(20)):
        nm = name("doomed")
        work.initial.append(Spec(nm, "doomed", schedule="@every 1s",
                                 due=whole(rng.uniform(-2, 0.3 * seconds))))
        work.changes.append(Change(rng.uniform(0.3, 0.9) * seconds, "delete", nm))
    for _ in range(n(30)):
        nm = name("repl")
        first = (Spec(nm, "replaced", schedule="@every 1s", due=whole(rng.uniform(-2, 0)))
                 if rng.random() < 0.6 else cron_spec(nm, "replaced", 0, forever=True))
        work.initial.append(first)
        times = sorted(rng.uniform(0.1, 0.9) * seconds for _ in range(rng.choice([1, 1, 2])))
        for at in times:
            choice = rng.random()
            if choice < 0.4:
                spec = every_spec(nm, "replaced", at + rng.uniform(-1, 4))
            elif choice < 0.7:
                spec = oneshot_spec(nm, "replaced", at - 1, min(horizon, at + 10))
            else:
                spec = cron_spec(nm, "replaced", at, forever=rng.random() < 0.5)
            work.changes.append(Change(at, "add", nm, spec))
    for _ in range(n(40)):
        nm = name("late")
        at = rng.uniform(0, 0.9 * seconds)
        choice = rng.random()
        if choice < 0.4:
            spec = oneshot_spec(nm, "late", at - 1, min(horizon, at + 8))
        elif choice < 0.8:
            spec = every_spec(nm, "late", at + rng.uniform(0, 3))
        else:
            spec = cron_spec(nm, "late", at, forever=False)
        work.changes.append(Change(at, "add", nm, spec))
    work.changes.sort(key=lambda c: c.at)
    return work


class Versions:
    """Hands out version ids, unique in the run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = 0

    def new(self, spec: Spec) -> Spec:
        with self._lock:
            self._next += 1
            return replace(spec, version=f"v{self._next}")


class Driver:
    """Performs the planned changes at their times and logs every call (thread ``chaos-driver``).

    :param cron: a Cron of the namespace that is never started.
    :param p: the epoch seconds of the fault phase's start.
    """

    def __init__(self, cron, changes: list[Change], versions: Versions, p: float, log_path: str,
                 stop: threading.Event, request_timeout: float):
        self._cron = cron
        self._changes = changes
        self._versions = versions
        self._p = p
        self._log = open(log_path, "a", buffering=1)
        self._stop = stop
        self.request_timeout = request_timeout
        self.thread = threading.Thread(target=self._run, name="chaos-driver", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            for change in self._changes:
                delay = self._p + change.at - time.time()
                if delay > 0 and self._stop.wait(delay):
                    return
                self._perform(change)
        finally:
            self._log.close()

    def _perform(self, change: Change) -> None:
        for attempt in range(20):
            if self._stop.is_set():
                return
            record = {"op": change.op, "name": change.name, "attempt": attempt}
            spec = None
            if change.op == "add":
                spec = self._versions.new(change.spec)
                record["version"] = spec.version
                record["kind"] = spec.kind
            record["call"] = time.time()
            began = time.monotonic()
            try:
                if change.op == "add":
                    self._cron.add(change.name, spec.job())
                else:
                    self._cron.delete(change.name)
                record["ok"] = True
            except EtcdCronError as exc:
                record["ok"] = False
                record["error"] = type(exc).__name__
                record["code"] = getattr(getattr(exc, "code", None), "name", None)
                record["message"] = str(exc)[:300]
            except Exception as exc:  # noqa: BLE001 - recorded: the audit counts it as a defect
                record["ok"] = False
                record["error"] = type(exc).__name__
                record["raw"] = True
                record["message"] = str(exc)[:300]
            record["done"] = time.time()
            record["took"] = time.monotonic() - began
            self._log.write(json.dumps(record) + "\n")
            if record["ok"]:
                return
            if self._stop.wait(0.3):
                return
