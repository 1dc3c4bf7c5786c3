"""Job status (``Cron.status``/``statuses``) against real etcd, and the membership rules that
say who owns a job."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from etcdcron import EtcdCronError, Job, JobStatus, TriggerResult
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.status import _membership, job_statuses
from etcdcron.testing import bulk_add, wait_until
from etcdcron.ticks import to_timestamp

pytestmark = pytest.mark.etcd


def test_missing_job_has_no_status(producer):
    assert producer.status("nope") is None
    assert list(producer.statuses()) == []


def test_status_of_a_job_nobody_runs_yet(producer):
    producer.add("once", Job(due_time="2030-01-02T03:04:05.5Z"))
    status = producer.status("once")
    due = datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=timezone.utc)
    assert status == JobStatus(name="once", count=0, attempts=0, last_trigger=None,
                               next_trigger=due, next_attempt=due, expiration=None,
                               partition_id=status.partition_id, owner=None, staged=None)
    assert status.next_trigger.tzinfo is not None


def test_status_before_and_after_ticks_matches_what_the_engine_fires(make_cron, calls):
    cron = make_cron(calls.add)
    cron.add("rec", Job(schedule="@every 1s", repeats=3, ttl="1h"))
    before = cron.status("rec")
    assert (before.count, before.last_trigger) == (0, None)
    assert before.expiration is not None and before.next_trigger < before.expiration
    cron.start()
    assert cron.wait_elected(10)
    for tick in range(1, 3):
        # What the engine holds in memory is what status() computes from etcd.
        wait_until(lambda: _armed_tick(cron, "rec") == before.next_trigger, 5,
                   message=lambda: f"armed {_armed_tick(cron, 'rec')} == {before.next_trigger}")
        wait_until(lambda: (s := cron.status("rec")) is not None and s.count == tick, 10)
        after = cron.status("rec")
        assert after.last_trigger == before.next_trigger  # the tick the engine fired
        assert after.next_trigger == before.next_trigger + timedelta(seconds=1)
        assert calls.times("rec")[-1] >= before.next_trigger.timestamp()
        assert after.owner == cron.replica_id and after.staged is False
        before = after
    wait_until(lambda: cron.status("rec") is None, 10)  # finished: deleted
    assert calls.count("rec") == 3


def _armed_tick(cron, name):
    with cron._engine.index.lock:
        state = cron._engine.index.get_locked(name)
        return state.next.tick if state is not None and state.next is not None else None


def test_a_failed_attempt_shows_in_attempts_and_next_attempt(make_cron):
    cron = make_cron(lambda req: TriggerResult.FAILED)
    cron.add("flaky", Job(due_time="0s", failure_policy={"constant": {
        "interval": {"seconds": 3600}, "max_retries": 2}}))
    cron.start()
    wait_until(lambda: cron.status("flaky").attempts == 1, 10)
    status = cron.status("flaky")
    assert status.count == 0 and status.last_trigger is None
    assert status.next_attempt == status.next_trigger + timedelta(hours=1)


def test_owner_across_two_replicas_and_after_one_leaves(make_cron, calls, producer):
    crons = [make_cron(calls.add, replica_id=name) for name in ("r1", "r2")]
    for cron in crons:
        cron.start()
    wait_until(lambda: all(c.is_elected() for c in crons), 30)
    bulk_add(producer, {f"job-{i:02d}": Job(due_time="1h") for i in range(20)})

    statuses = list(producer.statuses())
    assert [s.name for s in statuses] == [f"job-{i:02d}" for i in range(20)]
    for status in statuses:
        owners = [c.replica_id for c in crons if c._elector.ownership.owns(status.partition_id)]
        assert [status.owner] == owners
        assert status.staged is None  # asked on a Cron that is not started
    assert {s.owner for s in statuses} == {"r1", "r2"}  # 20 random partition ids

    crons[1].stop()
    wait_until(lambda: {s.owner for s in producer.statuses()} == {"r1"}, 30)


def test_staged_is_known_on_the_owner_only(make_cron, producer, calls):
    def trigger(req):
        calls.add(req)
        return TriggerResult.UNDELIVERABLE if calls.count() == 1 else TriggerResult.SUCCESS

    cron = make_cron(trigger)
    cron.start()
    assert cron.wait_elected(10)
    cron.add("tenant||job", Job(schedule="@every 1h", due_time="0s"))
    wait_until(lambda: cron.status("tenant||job").staged, 10)
    assert producer.status("tenant||job").staged is None
    assert [s.staged for s in cron.statuses()] == [True]
    with cron.deliverable_prefixes("tenant||"):
        wait_until(lambda: cron.status("tenant||job").count == 1, 10)
    assert cron.status("tenant||job").staged is False


def test_statuses_pages_and_pairs_each_job_with_its_counter(producer, client, namespace):
    keys = Keys(namespace)
    names = [f"p{i:04d}" for i in range(1050)]
    bulk_add(producer, {name: Job(schedule="@every 1h") for name in names})
    # Give every job a counter of its own version, with its index as the count.
    _, kvs = client.list_prefix(keys.jobs)
    last = datetime(2030, 1, 1, tzinfo=timezone.utc)
    for i, kv in enumerate(kvs):
        record = stored_pb2.Job.FromString(kv.value)
        counter = stored_pb2.Counter(job_partition_id=record.partition_id, count=i + 1,
                                     last_trigger=to_timestamp(last))
        client.put(keys.counter(names[i]), counter.SerializeToString())
    # A counter of another version of the name does not count (as in the engine).
    client.put(keys.counter(names[7]), stored_pb2.Counter(job_partition_id=1, count=99)
               .SerializeToString())

    statuses = list(job_statuses(client, keys, page_size=100))
    assert [s.name for s in statuses] == names
    expected = [i + 1 for i in range(len(names))]
    expected[7] = 0
    assert [s.count for s in statuses] == expected
    assert statuses[8].next_trigger == last + timedelta(hours=1)
    assert [s.name for s in job_statuses(client, keys, "p10", page_size=7)] == names[1000:]


def test_a_record_that_cannot_be_read_is_skipped_by_statuses(producer, client, namespace,
                                                              caplog):
    keys = Keys(namespace)
    producer.add("a", Job(due_time="1h"))
    producer.add("c", Job(due_time="1h"))
    client.put(keys.job("b"), b"\xff\xff not a job")
    client.put(keys.jobs + b"\xff\xfe", Job(due_time="1h").SerializeToString())
    with caplog.at_level(logging.WARNING):
        assert [s.name for s in producer.statuses()] == ["a", "c"]
    assert "'b'" in caplog.text
    with pytest.raises(EtcdCronError, match="'b'"):
        producer.status("b")


# -- who owns what, from the leadership keys alone -----------------------------------------------

def _kvs(namespace: str, members: dict) -> list:
    keys = Keys(namespace)
    kvs = []
    for replica_id, total in sorted(members.items()):
        value = (b"\xff garbage" if total is None
                 else stored_pb2.Leadership(total=total, uid=1).SerializeToString())
        kvs.append(SimpleNamespace(key=keys.leader(replica_id), value=value, lease=7))
    return kvs


@pytest.mark.unit
@pytest.mark.parametrize("members, partition, owner", [
    ({"a": 3, "b": 3, "c": 3}, 4, "b"),           # index 1 of the sorted keys
    ({"a": 3, "b": 3, "c": 3}, 6, "a"),
    ({"a": 2, "b": 3, "c": 3}, 4, None),          # a rebalance: no agreement yet
    ({"a": 3, "b": 3}, 4, None),                  # a replica left, the others not yet rewritten
    ({"a": 2, "b": None}, 1, None),               # a key that cannot be decoded
    ({"0": 12, "2": 12, "11": 12}, 11, "11"),     # static: the id is the partition index
    ({"0": 12, "2": 12, "11": 12}, 14, "2"),
    ({"0": 12, "2": 12, "11": 12}, 13, None),     # static: partition 1 has no replica
    ({}, 5, None),
])
def test_owner_follows_the_leadership_keys(members, partition, owner):
    assert _membership(_kvs("ns", members), Keys("ns")).owner(partition) == owner
