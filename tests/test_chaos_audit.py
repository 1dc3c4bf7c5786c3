"""The chaos audit's own logic, on hand-made histories: each "must be 0" can fail, and what must
not count (retries, catch-up, an in-flight delivery at the end) does not."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from etcdcron._pb import api_pb2, stored_pb2
from etcdcron.schedule import parse_schedule
from tests.chaos.audit import Audit, Call, Delivery, Oracle, Window, seconds_field
from tests.chaos.history import Change
from tests.chaos.workload import CRON_SECONDS

pytestmark = pytest.mark.unit

NS = "t"
T0 = 1_800_000_000.0  # a whole second


class Story:
    """A history, deliveries, driver calls and fault windows, built step by step."""

    def __init__(self):
        self.changes: list[Change] = []
        self.deliveries: list[Delivery] = []
        self.calls: list[Call] = []
        self.windows: list[Window] = []
        self.revision = 1
        self.pids: dict[str, int] = {}

    def _change(self, at: float, kind: str, key: str, value: bytes = b"") -> None:
        self.revision += 1
        self.changes.append(Change(self.revision, at, kind, key.encode(), value))

    def put_job(self, at: float, name: str, version: str, *, schedule=None, due=None,
                start=None, repeats=None, policy=None, expiration=None) -> None:
        job = api_pb2.Job()
        if schedule:
            job.schedule = schedule
        if repeats:
            job.repeats = repeats
        if policy is not None:
            job.failure_policy.CopyFrom(policy)
        payload = any_pb2.Any()
        payload.Pack(wrappers_pb2.StringValue(value=f"{version}|S"))
        job.payload.CopyFrom(payload)
        record = stored_pb2.Job(partition_id=len(self.pids) + 7, job=job)
        if due is not None:
            record.due_time.FromNanoseconds(int(due * 1e9))
        else:
            record.start.FromNanoseconds(int((start if start is not None else at) * 1e9))
        if expiration is not None:
            record.expiration.FromNanoseconds(int(expiration * 1e9))
        self.pids[name] = record.partition_id
        self._change(at, "put", f"{NS}/jobs/{name}", record.SerializeToString())

    def counter(self, at: float, name: str, count: int, attempts: int = 0,
                last: float | None = None) -> None:
        counter = stored_pb2.Counter(job_partition_id=self.pids[name], count=count,
                                     attempts=attempts)
        if last is not None:
            counter.last_trigger.FromNanoseconds(int(last * 1e9))
        self._change(at, "put", f"{NS}/counters/{name}", counter.SerializeToString())

    def delete_job(self, at: float, name: str) -> None:
        self._change(at, "delete", f"{NS}/jobs/{name}")

    def fire(self, at: float, name: str, version: str, result: str = "S",
             replica: str = "r0.1", fresh: float | None = None) -> None:
        self.deliveries.append(Delivery(at, name, version, result, replica, fresh))

    def every(self, name: str, version: str, ticks: int, *, late: float = 0.01,
              finish: bool = True) -> None:
        """A healthy ``@every 1s`` job with ``ticks`` repeats, due from T0."""
        self.put_job(T0 - 5, name, version, schedule="@every 1s", due=T0, repeats=ticks)
        for k in range(ticks):
            tick = T0 + k
            self.fire(tick + late, name, version)
            if k < ticks - 1 or not finish:
                self.counter(tick + late + 0.005, name, k + 1, last=tick)
        if finish:
            self.delete_job(T0 + ticks - 1 + late + 0.005, name)

    def audit(self, cut: float = T0 + 100, grace: float = 5.0):
        return Audit(changes=self.changes, deliveries=self.deliveries, calls=self.calls,
                     windows=self.windows, namespace=NS, cut=cut, grace=grace, head=2.0,
                     tail=8.0, request_timeout=5.0).run()


def test_a_healthy_history_has_nothing_to_report():
    story = Story()
    story.every("a", "v1", 5)
    report = story.audit()
    assert report.ok, report.findings
    assert report.counts["recorded steps"] == 5
    assert report.counts.get("duplicates (in fault windows)", 0) == 0
    assert len(report.lateness_out) == 5 and max(report.lateness_out) == pytest.approx(0.01)


def test_a_counter_write_that_skips_a_tick_is_a_missed_tick():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0, repeats=5)
    story.fire(T0 + 0.01, "a", "v1")
    story.counter(T0 + 0.02, "a", 1, last=T0)
    story.fire(T0 + 2.01, "a", "v1")
    story.counter(T0 + 2.02, "a", 2, last=T0 + 2)  # T0 + 1 was never delivered
    report = story.audit(cut=T0 + 4)
    assert report.counts["missed ticks"] >= 1
    assert report.counts["history anomalies"] == 1
    assert not report.ok


def test_a_job_that_stops_firing_misses_its_ticks_and_never_finishes():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0, repeats=10)
    story.fire(T0 + 0.01, "a", "v1")
    story.counter(T0 + 0.02, "a", 1, last=T0)
    report = story.audit(cut=T0 + 30)
    assert report.counts["missed ticks"] == 9
    assert report.counts["jobs never finished"] == 1


def test_ticks_due_within_the_grace_before_the_cut_are_not_yet_owed():
    story = Story()
    story.every("a", "v1", 10, finish=False)
    story.changes = [c for c in story.changes
                     if not (c.kind == "put" and b"counters" in c.key and c.at > T0 + 6)]
    story.deliveries = [d for d in story.deliveries if d.at < T0 + 7]
    report = story.audit(cut=T0 + 11, grace=5.0)  # ticks up to T0 + 6 are owed
    assert report.counts.get("missed ticks", 0) == 0, report.findings
    report = story.audit(cut=T0 + 13, grace=5.0)  # now T0 + 7 and T0 + 8 are owed too
    assert report.counts["missed ticks"] == 2


def test_a_recorded_step_nobody_delivered_is_missed():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0, repeats=3)
    story.fire(T0 + 0.01, "a", "v1")
    story.counter(T0 + 0.02, "a", 1, last=T0)
    story.counter(T0 + 1.02, "a", 2, last=T0 + 1)  # no delivery of T0 + 1
    story.fire(T0 + 2.01, "a", "v1")
    story.delete_job(T0 + 2.02, "a")
    report = story.audit()
    assert report.counts["missed ticks"] == 1


def test_a_delivery_before_its_tick_is_early():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0, repeats=2)
    story.fire(T0 + 0.01, "a", "v1")
    story.counter(T0 + 0.02, "a", 1, last=T0)
    story.fire(T0 + 0.5, "a", "v1")  # tick T0 + 1, half a second early
    story.delete_job(T0 + 0.51, "a")
    report = story.audit()
    assert report.counts["early triggers"] == 1


def test_a_first_delivery_before_the_due_time_is_early_even_unrecorded():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", due=T0 + 50)
    story.fire(T0, "a", "v1")
    report = story.audit(cut=T0 + 20)
    assert report.counts["early triggers"] == 1


def test_a_duplicate_counts_only_inside_a_fault_window():
    story = Story()
    story.every("a", "v1", 3)
    story.fire(T0 + 1.5, "a", "v1", replica="r1.1")  # tick T0 + 1 again, on another replica
    report = story.audit()
    assert report.counts["duplicates outside fault windows"] == 1
    assert not report.ok
    story.windows.append(Window("replica-kill", "r0", T0 - 3, T0 - 2))  # tail reaches T0 + 6
    report = story.audit()
    assert report.ok, report.findings
    assert report.counts["duplicates (in fault windows)"] == 1
    assert report.duplicates[0][1][0].kind == "replica-kill"


def test_the_duplicate_is_the_delivery_whose_result_was_lost():
    # r0 delivers T0 + 2 and is struck before recording it; r1 takes over 8 s later and
    # catches up from T0 + 2. The duplicate is r0's delivery, at the fault, not one of r1's.
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0, repeats=6)
    for k in range(2):
        story.fire(T0 + k + 0.001, "a", "v1")
        story.counter(T0 + k + 0.006, "a", k + 1, last=T0 + k)
    story.fire(T0 + 2.001, "a", "v1")
    for k in range(2, 6):
        story.fire(T0 + 10 + k * 0.01, "a", "v1", replica="r1.1")
        if k < 5:
            story.counter(T0 + 10 + k * 0.01 + 0.005, "a", k + 1, last=T0 + k)
    story.delete_job(T0 + 10.06, "a")
    story.windows.append(Window("replica-freeze", "r0", T0 + 2.1, T0 + 9))
    report = story.audit()
    assert report.ok, report.findings
    [(duplicate, windows)] = report.duplicates
    assert (duplicate.replica, duplicate.at) == ("r0.1", T0 + 2.001)
    assert sorted(round(x, 2) for x in report.lateness_in)[-1] == pytest.approx(8.02)


def test_retries_are_steps_not_duplicates():
    policy = api_pb2.FailurePolicy(constant=api_pb2.FailurePolicyConstant(
        interval={"nanos": 500_000_000}, max_retries=2))
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 2s", due=T0, repeats=2, policy=policy)
    story.fire(T0 + 0.01, "a", "v1", "F")
    story.counter(T0 + 0.02, "a", 0, attempts=1)
    story.fire(T0 + 0.51, "a", "v1", "F")
    story.counter(T0 + 0.52, "a", 0, attempts=2)
    story.fire(T0 + 1.01, "a", "v1", "F")  # the last retry fails too: the tick is done
    story.counter(T0 + 1.02, "a", 1, last=T0)
    story.fire(T0 + 2.01, "a", "v1", "S")
    story.delete_job(T0 + 2.02, "a")
    report = story.audit()
    assert report.ok, report.findings
    assert report.counts["recorded steps"] == 4
    assert report.counts["retries delivered"] == 2
    assert report.counts.get("duplicates (in fault windows)", 0) == 0


def test_a_retry_delivered_before_its_interval_is_early():
    policy = api_pb2.FailurePolicy(constant=api_pb2.FailurePolicyConstant(
        interval={"seconds": 1}, max_retries=1))
    story = Story()
    story.put_job(T0 - 5, "a", "v1", due=T0, policy=policy)
    story.fire(T0 + 0.01, "a", "v1", "F")
    story.counter(T0 + 0.02, "a", 0, attempts=1)
    story.fire(T0 + 0.3, "a", "v1", "S")  # the retry is due at T0 + 1
    story.delete_job(T0 + 0.31, "a")
    assert story.audit().counts["early triggers"] == 1


def test_catching_up_late_in_order_is_late_not_missed():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0, repeats=10)
    for k in range(10):  # down for 12 s, then every tick, one after another
        story.fire(T0 + 12 + k * 0.01, "a", "v1")
        if k < 9:
            story.counter(T0 + 12 + k * 0.01 + 0.005, "a", k + 1, last=T0 + k)
    story.delete_job(T0 + 12.1, "a")
    report = story.audit()
    assert report.ok, report.findings
    assert max(report.lateness_out) == pytest.approx(12.0, abs=0.01)


def test_a_delivery_after_the_replace_was_acknowledged_is_reported():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0)
    story.fire(T0 + 0.01, "a", "v1")
    story.counter(T0 + 0.02, "a", 1, last=T0)
    story.calls.append(Call("add", "a", "v2", T0 + 0.5, T0 + 0.6, True))
    story.put_job(T0 + 0.55, "a", "v2", due=T0 + 30)
    story.fire(T0 + 1.01, "a", "v1")  # the old version, after the ack
    report = story.audit(cut=T0 + 20)
    assert report.counts["fired after delete/replace ack"] == 1
    assert report.counts.get("missed ticks", 0) == 0


def test_a_delivery_proven_current_before_the_ack_raced_it_and_one_proven_after_is_stale():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", due=T0 + 1)
    story.calls.append(Call("delete", "a", None, T0 + 0.9, T0 + 1.0, True))
    story.delete_job(T0 + 0.95, "a")
    story.fire(T0 + 1.01, "a", "v1", fresh=T0 + 0.99)  # its barrier began before the ack
    report = story.audit(cut=T0 + 20)
    assert report.counts.get("fired after delete/replace ack", 0) == 0, report.findings
    assert report.counts["raced a delete/replace ack"] == 1
    story.fire(T0 + 1.5, "a", "v1", fresh=T0 + 1.2)  # proven current after the ack: stale
    assert story.audit(cut=T0 + 20).counts["fired after delete/replace ack"] == 1


def test_a_version_is_acknowledged_as_replaced_by_the_calls_after_the_one_that_wrote_it():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", due=T0 + 60)
    for at, version in ((T0 + 10, "v2"), (T0 + 10.3, "v3"), (T0 + 10.6, "v4")):
        story.calls.append(Call("add", "a", version, at, at + 0.01, True))
        story.put_job(at + 0.005, "a", version, due=T0 + 10.4 if version == "v3" else T0 + 60)
    story.fire(T0 + 10.4, "a", "v3")  # before v4's call returned: not after an ack
    report = story.audit(cut=T0 + 20)
    assert report.counts.get("fired after delete/replace ack", 0) == 0, report.findings
    story.fire(T0 + 10.7, "a", "v3")
    assert story.audit(cut=T0 + 20).counts["fired after delete/replace ack"] == 1


def test_ticks_owed_long_before_a_delete_are_missed_unless_a_fault_explains_them():
    story = Story()
    story.put_job(T0 - 5, "a", "v1", schedule="@every 1s", due=T0)
    story.fire(T0 + 0.01, "a", "v1")
    story.counter(T0 + 0.02, "a", 1, last=T0)
    story.calls.append(Call("delete", "a", None, T0 + 20, T0 + 20.1, True))
    story.delete_job(T0 + 20.05, "a")
    report = story.audit()
    assert report.counts["missed ticks"] == 15  # T0+1 .. T0+15 were owed 5 s before the call
    story.windows.append(Window("blackhole", "r0", T0 + 0.5, T0 + 19))
    assert story.audit().counts.get("missed ticks", 0) == 0


def test_one_delivery_in_flight_at_the_end_is_not_a_duplicate():
    story = Story()
    story.put_job(T0 - 5, "b", "v2", schedule="@every 1s", due=T0)
    story.fire(T0 + 0.01, "b", "v2")  # stopped before its result was recorded
    report = story.audit(cut=T0 + 5.5)
    assert report.ok, report.findings
    assert report.counts["in flight at the end"] == 1
    story.fire(T0 + 0.02, "b", "v2", replica="r1.1")  # a second one is a duplicate
    assert story.audit(cut=T0 + 5.5).counts["duplicates outside fault windows"] == 1


def test_a_raw_exception_or_an_overlong_call_breaks_the_contract():
    story = Story()
    story.calls += [Call("add", "a", "v1", T0, T0 + 1, False, "KeyError", raw=True),
                    Call("delete", "b", None, T0, T0 + 9, False, "EtcdUnavailableError",
                         "UNAVAILABLE", took=9.0),
                    Call("delete", "c", None, T0, T0 + 5, False, "EtcdUnavailableError",
                         "UNAVAILABLE", took=5.0)]
    report = story.audit()
    assert report.counts["API calls outside the contract"] == 2


@pytest.mark.parametrize("spec", CRON_SECONDS)
def test_the_oracle_agrees_with_etcdcron_on_the_workloads_crons(spec):
    schedule = parse_schedule(f"{spec} * * * * *")
    record = stored_pb2.Job(job=api_pb2.Job(schedule=f"{spec} * * * * *"))
    oracle = Oracle(record)
    rng = random.Random(spec)
    for _ in range(200):
        t = T0 + rng.uniform(0, 3600) * rng.choice([1, 0]) + rng.randrange(0, 120)
        ns = int(t * 1e9)
        ours = oracle.next_after(ns)
        theirs = schedule.next_after(datetime.fromtimestamp(ns / 1e9, timezone.utc))
        assert ours / 1e9 == pytest.approx(theirs.timestamp(), abs=1e-6), (spec, t)
    assert seconds_field("7-9") == {7, 8, 9}
    assert seconds_field("1/4") == set(range(1, 60, 4))
