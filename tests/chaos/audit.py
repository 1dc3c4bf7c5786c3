"""The audit of a chaos run: every trigger checked against the schedules and the job history.

Inputs, all taken independently of the replicas' own view:

- the **history** (:mod:`tests.chaos.history`): every job and counter write etcd committed, in
  revision order, each stamped with its first arrival at the orchestrator (later than the
  commit, so an upper bound of it);
- the **deliveries**: every trigger call each replica logged (wall time at entry, job, version,
  the result it returned);
- the **driver's calls** (when each change was called and acknowledged) and the **fault
  windows**.

How it is exact. A job *version* is one put of its key (its payload names the version). Its
**steps** are the deliveries the scheduler owes it: ``(tick, attempt)``, due at ``tick +
attempt * retry interval``. The audit computes every tick itself (its own small oracle for the
schedules the workload uses, from the stored record's due time, start, repeats and expiration)
and walks the version's counter writes in revision order: each write must be the oracle's
successor of the previous counter for the step's result (a retry: ``attempts + 1``; done:
``count + 1``, ``last_trigger`` = the tick, ``attempts = 0``). The engine's delete of a finished
job is the last step's record. A step is recorded only after its delivery, and the next step is
delivered only after that record; so the recorded steps are matched in order to the deliveries:
for each recorded step, the earliest unmatched delivery, after the previous match, no later than
the record's arrival, with a result the record allows and not before the step's due time. That
greedy match finds an assignment whenever one exists (a delivery it skips is not needed by any
later step), so:

- **missed** ticks: a tick whose counter write skipped it, a recorded step no delivery can
  account for, or a tick left undone at the end: due more than ``grace`` seconds before the cut
  (the end of the settle phase) and neither recorded nor ended by a change (for a version the
  driver replaced or deleted, a tick due more than ``grace`` before that call started, with no
  fault between, counts);
- **early**: a recorded step whose only possible deliveries came before its due time, or a
  delivery before the version's first step was due;
- **never finished**: a version with a last tick (repeats, one-shot, expiration) due more than
  ``grace`` before the cut that the scheduler did not delete;
- **after ack**: a delivery of a version after the driver's replace or delete of it returned;
- **duplicates**: every delivery the match leaves over, except one delivery of the step that was
  open when the version ended (its result was discarded with the version, or at stop). Retries
  are steps of their own, so they are never duplicates. Each duplicate must lie in a fault's
  effect window ``[start - head, end + tail]`` (a fault shows up as a duplicate only once the
  lease of the replica it hit has run out, hence the tail);
- **lateness** of every matched delivery (``at - due``), inside or outside fault windows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from google.protobuf import wrappers_pb2

from etcdcron._pb import stored_pb2

NS = 1_000_000_000
EPS = 0.002  # seconds: float rounding between the record's nanoseconds and a logged time


@dataclass(frozen=True)
class Delivery:
    at: float
    name: str
    version: str
    result: str  # "S" or "F"
    replica: str
    #: when the replica's view was last proven current before this delivery (its read
    #: barrier began); ``at`` if the log does not say
    fresh: float | None = None


@dataclass(frozen=True)
class Window:
    kind: str
    target: str
    began: float
    ended: float


@dataclass(frozen=True)
class Call:
    op: str
    name: str
    version: str | None
    call: float
    done: float
    ok: bool
    error: str | None = None
    code: str | None = None
    raw: bool = False
    took: float = 0.0
    message: str = ""


# -- the oracle ---------------------------------------------------------------------------------


def seconds_field(spec: str) -> frozenset:
    """The seconds matched by a cron seconds field (lists, ranges, steps, ``*``)."""
    matched = set()
    for item in spec.split(","):
        base, _, step = item.partition("/")
        if base == "*":
            lo, hi = 0, 59
        elif "-" in base:
            lo, hi = (int(x) for x in base.split("-"))
        else:
            lo = int(base)
            hi = 59 if step else lo
        matched.update(range(lo, hi + 1, int(step) if step else 1))
    return frozenset(matched)


def go_duration_ns(text: str) -> int:
    units = {"ms": NS // 1000, "s": NS, "m": 60 * NS, "h": 3600 * NS}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[:-len(unit)].replace(".", "").isdigit():
            return int(float(text[:-len(unit)]) * units[unit])
    raise ValueError(f"the audit's oracle does not know the duration {text!r}")


class Oracle:
    """The ticks and steps of one stored job version (DESIGN.md section 3), in nanoseconds,
    for the schedules the workload writes: ``@every <d>`` and ``<seconds> * * * * *``."""

    def __init__(self, record: stored_pb2.Job):
        job = record.job
        self.every = None
        self.seconds = None
        if job.HasField("schedule"):
            words = job.schedule.split()
            if words[0] == "@every":
                self.every = go_duration_ns(words[1])
            elif len(words) == 6 and words[1:] == ["*"] * 5:
                self.seconds = seconds_field(words[0])
            else:
                raise ValueError(f"the audit's oracle does not know the schedule {job.schedule!r}")
        self.scheduled = job.HasField("schedule")
        self.due_time = _ns(record.due_time) if record.HasField("due_time") else None
        self.start = _ns(record.start) if record.HasField("start") else None
        self.expiration = _ns(record.expiration) if record.HasField("expiration") else None
        self.repeats = job.repeats if job.HasField("repeats") else None
        policy = job.failure_policy if job.HasField("failure_policy") else None
        if policy is None:  # the default: Constant, 1 s, at most 3 retries
            self.constant, self.interval, self.max_retries = True, NS, 3
        elif policy.WhichOneof("policy") == "constant":
            self.constant = True
            self.interval = policy.constant.interval.ToNanoseconds()
            self.max_retries = (policy.constant.max_retries
                                if policy.constant.HasField("max_retries") else None)
        else:
            self.constant, self.interval, self.max_retries = False, 0, None

    def next_after(self, t: int) -> int:
        if self.every is not None:
            return t + self.every
        second = t // NS + 1
        while second % 60 not in self.seconds:
            second += 1
        return second * NS

    def next_tick(self, count: int, last: int | None) -> int | None:
        if not self.scheduled:
            if count > 0:
                return None
            tick = self.due_time
        else:
            if self.repeats is not None and count >= self.repeats:
                return None
            if last is not None:
                tick = self.next_after(last)
            elif self.due_time is not None:
                tick = self.due_time
            else:
                tick = self.next_after(self.start)
        if self.expiration is not None and tick > self.expiration:
            return None
        return tick

    def step(self, state: tuple) -> tuple[int, int, int] | None:
        """``(tick, attempt, due)`` owed after counter ``state = (count, attempts, last)``."""
        count, attempts, last = state
        tick = self.next_tick(count, last)
        if tick is None:
            return None
        return tick, attempts, tick + attempts * self.interval

    def after(self, state: tuple, result: str) -> tuple:
        count, attempts, last = state
        tick = self.next_tick(count, last)
        if result == "F":
            attempts += 1
            if self.constant and (self.max_retries is None or attempts <= self.max_retries):
                return count, attempts, last
        return count + 1, 0, tick

    def ticks(self, state: tuple, until: int) -> list[int]:
        """The ticks still owed from ``state`` on (as if each succeeded) up to ``until``."""
        out = []
        count, _, last = state
        while True:
            tick = self.next_tick(count, last)
            if tick is None or tick > until:
                return out
            out.append(tick)
            count, last = count + 1, tick

    def last_tick(self) -> int | None:
        """The final tick when the schedule is finite (repeats, one-shot, expiration)."""
        if self.scheduled and self.repeats is None and self.expiration is None:
            return None
        ticks = self.ticks((0, 0, None), 2**62)
        return ticks[-1] if ticks else None


def _ns(ts) -> int:
    return ts.seconds * NS + ts.nanos


def _s(ns: int) -> float:
    return ns / NS


# -- the versions in the history ----------------------------------------------------------------


@dataclass
class Version:
    name: str
    version: str
    revision: int
    at: float
    record: stored_pb2.Job
    counters: list = field(default_factory=list)  # (revision, at, (count, attempts, last))
    end: str = "alive"         # alive | finished | changed
    end_revision: int | None = None
    end_at: float | None = None
    writes_after_end: int = 0


def payload_version(record: stored_pb2.Job) -> str:
    value = wrappers_pb2.StringValue()
    record.job.payload.Unpack(value)
    return value.value.partition("|")[0]


def calls_after(calls: list[Call], name: str, version: str) -> list[Call]:
    """The driver's calls on ``name`` made after the one that wrote ``version`` (all of them
    for a version written before the run). The driver makes one call at a time, in order."""
    mine = [c for c in calls if c.name == name]
    made = [i for i, c in enumerate(mine) if c.version == version]
    return mine[made[0] + 1:] if made else mine


def versions_from(changes, namespace: str, calls: list[Call]) -> dict[str, Version]:
    """Every job version in ``changes`` (revision order), with its counter writes and its end.

    A job key deleted while a driver ``delete`` of that name was under way is a change; any
    other delete is the scheduler finishing the job.
    """
    jobs_prefix = f"{namespace}/jobs/".encode()
    counters_prefix = f"{namespace}/counters/".encode()
    current: dict[str, Version] = {}
    by_pid: dict[tuple[str, int], Version] = {}
    ended: dict[str, list[Version]] = defaultdict(list)
    versions: dict[str, Version] = {}
    for change in changes:
        if change.key.startswith(jobs_prefix):
            name = change.key[len(jobs_prefix):].decode()
            old = current.pop(name, None)
            if old is not None:
                old.end_revision, old.end_at = change.revision, change.at
                if change.kind == "put":
                    old.end = "changed"
                else:
                    by_driver = any(c.op == "delete" and c.call <= change.at
                                    for c in calls_after(calls, name, old.version))
                    old.end = "changed" if by_driver else "finished"
                ended[name].append(old)
            if change.kind == "put":
                record = stored_pb2.Job()
                record.ParseFromString(change.value)
                v = Version(name, payload_version(record), change.revision, change.at, record)
                versions[v.version] = v
                current[name] = v
                by_pid[(name, record.partition_id)] = v
        elif change.key.startswith(counters_prefix) and change.kind == "put":
            name = change.key[len(counters_prefix):].decode()
            counter = stored_pb2.Counter()
            counter.ParseFromString(change.value)
            v = by_pid.get((name, counter.job_partition_id))
            if v is None:
                continue
            if v.end_revision is not None and change.revision >= v.end_revision:
                v.writes_after_end += 1
                continue
            last = _ns(counter.last_trigger) if counter.HasField("last_trigger") else None
            v.counters.append((change.revision, change.at,
                               (counter.count, counter.attempts, last)))
    return versions


# -- the audit ----------------------------------------------------------------------------------


@dataclass
class Finding:
    metric: str
    name: str
    version: str
    text: str
    at: float | None = None


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    duplicates: list[tuple[Delivery, list[Window]]] = field(default_factory=list)
    lateness_in: list[float] = field(default_factory=list)
    lateness_out: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    settings: dict = field(default_factory=dict)    # the run's parameters, for the table
    windows: list[Window] = field(default_factory=list)

    MUST_BE_ZERO = ("missed ticks", "early triggers", "jobs never finished",
                    "fired after delete/replace ack", "duplicates outside fault windows",
                    "history anomalies", "API calls outside the contract",
                    "replica crashes")

    def add(self, metric: str, v: Version | None, text: str, at: float | None = None,
            n: int = 1) -> None:
        """Count ``n`` of ``metric`` and keep the finding behind them."""
        self.counts[metric] += n
        self.findings.append(Finding(metric, v.name if v else "-", v.version if v else "-",
                                     text, at))

    @property
    def ok(self) -> bool:
        return all(self.counts.get(m, 0) == 0 for m in self.MUST_BE_ZERO)


class Audit:
    """:param cut: the end of the settle phase (epoch seconds); ticks due more than ``grace``
        before it must be done.
    :param head: seconds before a fault's start its effect window opens (a delivery in flight
        as it struck).
    :param tail: seconds after a fault's end its effect window closes.
    """

    def __init__(self, *, changes, deliveries: list[Delivery], calls: list[Call],
                 windows: list[Window], namespace: str, cut: float, grace: float,
                 head: float, tail: float, request_timeout: float):
        self.changes = changes
        self.deliveries = deliveries
        self.calls = calls
        self.windows = windows
        self.namespace = namespace
        self.cut = cut
        self.grace = grace
        self.head = head
        self.tail = tail
        self.request_timeout = request_timeout

    def windows_at(self, start: float, end: float | None = None) -> list[Window]:
        end = start if end is None else end
        return [w for w in self.windows
                if w.began - self.head <= end and start <= w.ended + self.tail]

    def run(self) -> Report:
        report = Report(windows=list(self.windows))
        versions = versions_from(self.changes, self.namespace, self.calls)
        by_version = defaultdict(list)
        for d in self.deliveries:
            by_version[d.version].append(d)
        unknown = [d for d in self.deliveries if d.version not in versions]
        for d in unknown:
            report.add("history anomalies", None,
                       f"delivery of {d.name} version {d.version} that etcd never held", d.at)
        acks = self._acks(versions)
        for v in versions.values():
            deliveries = sorted(by_version.get(v.version, []), key=lambda d: d.at)
            self._audit_version(v, deliveries, acks.get(v.version), report)
        self._audit_calls(report)
        report.counts["versions"] = len(versions)
        report.counts["deliveries"] = len(self.deliveries)
        return report

    def _acks(self, versions: dict[str, Version]) -> dict[str, tuple[float, float]]:
        """For each version a driver call ended: (when the first call after the one that wrote
        it started, when the first of those that succeeded returned: the acknowledgement)."""
        result = {}
        for v in versions.values():
            if v.end != "changed":
                continue
            later = calls_after(self.calls, v.name, v.version)
            started = min((c.call for c in later), default=v.end_at)
            acked = min((c.done for c in later if c.ok), default=math.inf)
            result[v.version] = (started, acked)
        return result

    def _audit_version(self, v: Version, deliveries: list[Delivery],
                       ack: tuple[float, float] | None, report: Report) -> None:
        try:
            oracle = Oracle(v.record)
        except ValueError as exc:
            report.add("history anomalies", v, str(exc))
            return
        if v.writes_after_end:
            report.add("history anomalies", v,
                       f"{v.writes_after_end} counter write(s) after the version ended")
        if ack is not None:
            for d in deliveries:
                if d.at <= ack[1]:
                    continue
                fresh = d.at if d.fresh is None else d.fresh
                if fresh > ack[1]:
                    report.add("fired after delete/replace ack", v,
                               f"delivered on {d.replica} {d.at - ack[1]:.3f}s after the "
                               f"change was acknowledged, its view proven current "
                               f"{fresh - ack[1]:.3f}s after it", d.at)
                else:  # acknowledged between the replica's freshness proof and the call
                    report.counts["raced a delete/replace ack"] += 1
            deliveries = [d for d in deliveries if d.at <= ack[1]]
        steps, state = self._steps(v, oracle, report)
        open_step = None if v.end == "finished" else oracle.step(state)
        matches, early = self._match_backward(deliveries, steps, len(deliveries))
        reserved = None
        last = len(deliveries) - 1
        if (open_step is not None and deliveries and last not in matches
                and deliveries[last].at >= _s(open_step[2]) - EPS):
            reserved = last  # the last delivery is after every match: the open step's
        elif open_step is not None and deliveries and deliveries[last].at >= _s(open_step[2]) - EPS:
            # The last delivery may be the open step's, delivered before the last record
            # arrived here; take that reading if the recorded steps can do without it.
            other, other_early = self._match_backward(deliveries, steps, last)
            if (sum(m is not None for m in other) >= sum(m is not None for m in matches)
                    and sum(other_early) <= sum(early)):
                matches, early, reserved = other, other_early, last
        used = {m for m in matches if m is not None}
        for (tick, attempt, due, at, revision, _), index, was_early in zip(steps, matches, early):
            if index is None:
                report.add("missed ticks", v, f"tick {_s(tick):.3f} attempt {attempt} was "
                           f"recorded at revision {revision} but never delivered", at)
                continue
            d = deliveries[index]
            report.counts["recorded steps"] += 1
            if attempt:
                report.counts["retries delivered"] += 1
            if was_early:
                report.add("early triggers", v, f"tick {_s(tick):.3f} attempt {attempt} "
                           f"delivered {_s(due) - d.at:.3f}s before it was due, on "
                           f"{d.replica}", d.at)
            else:
                self._lateness(report, _s(due), d.at)
        if reserved is not None:
            report.counts["in flight at the end"] += 1
            used.add(reserved)
        extras = [d for i, d in enumerate(deliveries) if i not in used]
        first_due = _s(steps[0][2]) if steps else (_s(open_step[2]) if open_step else None)
        for d in extras:
            if first_due is not None and d.at < first_due - EPS:
                report.add("early triggers", v, f"delivered {first_due - d.at:.3f}s before "
                           f"its first step was due, on {d.replica}", d.at)
            else:
                self._duplicate(v, d, report)
        if v.end != "finished":
            self._owed_at_end(v, oracle, state, ack, reserved is not None, report)
        final = oracle.last_tick()
        if v.end == "alive" and final is not None and _s(final) <= self.cut - self.grace:
            report.add("jobs never finished", v, f"last tick {_s(final):.3f} was due "
                       f"{self.cut - _s(final):.1f}s before the cut; still in etcd at the end")

    def _steps(self, v: Version, oracle: Oracle, report: Report) -> tuple[list, tuple]:
        """Walk the version's counter writes (and the scheduler's delete) with the oracle.

        :returns: the recorded steps ``(tick, attempt, due, arrival, revision, allowed
            results)`` and the counter state after the last one.
        """
        state = (0, 0, None)
        steps = []
        records = list(v.counters)
        if v.end == "finished":
            records.append((v.end_revision, v.end_at, None))  # the scheduler's delete
        for revision, at, new in records:
            step = oracle.step(state)
            if step is None:
                if new is not None:
                    report.add("history anomalies", v, f"counter {self._fmt(new)} written at "
                               f"revision {revision} after the last tick", at)
                    state = new
                continue
            tick, attempt, due = step
            allowed = self._results_for(oracle, state, new)
            if allowed:
                steps.append((tick, attempt, due, at, revision, allowed))
                if new is None:
                    break
                state = new
                continue
            report.add("history anomalies", v, f"counter went from {self._fmt(state)} to "
                       f"{self._fmt(new)} at revision {revision}; the owed step was tick "
                       f"{_s(tick):.3f} attempt {attempt}", at)
            if new is None:
                rest = oracle.ticks(state, self._until_ns())
                if rest:
                    report.add("missed ticks", v, f"deleted by the scheduler with {len(rest)} "
                               f"tick(s) still owed from {_s(rest[0]):.3f}", at, n=len(rest))
                break
            if new[2] is not None and new[2] > tick:
                skipped = len(oracle.ticks(state, new[2] - 1))
                if skipped:
                    report.add("missed ticks", v, f"{skipped} tick(s) from {_s(tick):.3f} "
                               f"skipped by the counter write at revision {revision}", at,
                               n=skipped)
            state = new
        return steps, state

    @staticmethod
    def _match_backward(deliveries: list[Delivery], steps: list, upto: int
                        ) -> tuple[list[int | None], list[bool]]:
        """Match recorded steps to deliveries ``[:upto]``, from the last step back: each gets
        the latest delivery before the next step's match that arrived no later than its record,
        with a result the record allows, not before its due time (if none, an early one).

        Like its mirror image it finds a full match whenever there is one; preferring the
        latest delivery leaves over the earlier one of two, which is the one whose result was
        lost (a replica that was struck, then another that delivered the step again).
        """
        matches: list[int | None] = [None] * len(steps)
        early = [False] * len(steps)
        bound = upto
        for i in range(len(steps) - 1, -1, -1):
            tick, attempt, due, at, revision, allowed = steps[i]
            found = fallback = None
            for j in range(bound - 1, -1, -1):
                d = deliveries[j]
                if d.at > at or d.result not in allowed:
                    continue
                if d.at >= _s(due) - EPS:
                    found = j
                    break
                if fallback is None:
                    fallback = j
            if found is None and fallback is not None:
                found, early[i] = fallback, True
            if found is not None:
                matches[i] = found
                bound = found
        return matches, early

    def _until_ns(self) -> int:
        return int((self.cut - self.grace) * NS)

    def _owed_at_end(self, v: Version, oracle: Oracle, state: tuple,
                     ack: tuple[float, float] | None, delivered_open: bool,
                     report: Report) -> None:
        """Ticks still owed when the version ended (alive at the end, or changed), from counter
        ``state``; ``delivered_open``: the open step was delivered (its result not recorded)."""
        step = oracle.step(state)
        if v.end == "alive":
            owed = oracle.ticks(state, self._until_ns())
            if owed and (delivered_open or (step[1] and _s(step[2]) > self.cut - self.grace)):
                owed = owed[1:]  # delivered, or the open tick's retry is not due yet
            if owed:
                report.add("missed ticks", v, f"{len(owed)} tick(s) owed from "
                           f"{_s(owed[0]):.3f} never done by the end", n=len(owed))
        elif v.end == "changed" and ack is not None:
            started = ack[0]
            owed = oracle.ticks(state, int((started - self.grace) * NS))
            if owed and delivered_open:
                owed = owed[1:]
            owed = [t for t in owed if not self.windows_at(_s(t), started)]
            if owed:
                report.add("missed ticks", v, f"{len(owed)} tick(s) owed from "
                           f"{_s(owed[0]):.3f} not done before the change at {started:.3f}",
                           n=len(owed))

    @staticmethod
    def _results_for(oracle: Oracle, state: tuple, new: tuple | None) -> set[str]:
        """The delivery results that turn counter ``state`` into ``new`` (``None``: deleted)."""
        allowed = set()
        for result in ("S", "F"):
            after = oracle.after(state, result)
            if new is None:
                if oracle.next_tick(after[0], after[2]) is None:
                    allowed.add(result)
            elif after == new:
                allowed.add(result)
        return allowed

    def _duplicate(self, v: Version, d: Delivery, report: Report) -> None:
        windows = self.windows_at(d.at)
        if windows:
            report.counts["duplicates (in fault windows)"] += 1
            report.duplicates.append((d, windows))
        else:
            report.add("duplicates outside fault windows", v,
                       f"extra delivery on {d.replica} ({d.result}) with no fault near", d.at)

    def _lateness(self, report: Report, due: float, at: float) -> None:
        (report.lateness_in if self.windows_at(due, at) else report.lateness_out).append(at - due)

    def _audit_calls(self, report: Report) -> None:
        for call in self.calls:
            report.counts["API calls"] += 1
            if not call.ok:
                report.counts["API calls that raised EtcdCronError"] += 1
            if call.raw:
                report.add("API calls outside the contract", None,
                           f"{call.op}({call.name!r}) raised {call.error}, not an "
                           f"EtcdCronError: {call.message}", call.call)
            elif call.took > self.request_timeout + 2.0:
                report.add("API calls outside the contract", None,
                           f"{call.op}({call.name!r}) took {call.took:.1f}s "
                           f"(request_timeout {self.request_timeout}s)", call.call)
            elif not call.ok and call.code is None:
                report.add("API calls outside the contract", None,
                           f"{call.op}({call.name!r}) raised {call.error} without a gRPC "
                           f"code: {call.message}", call.call)

    @staticmethod
    def _fmt(state: tuple | None) -> str:
        if state is None:
            return "deleted"
        count, attempts, last = state
        return f"(count {count}, attempts {attempts}, last {_s(last) if last else None})"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]
