"""Job CRUD against a real etcd, without starting the scheduler."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.any_pb2 import Any

from etcdcron import (
    EtcdCronError,
    FailurePolicy,
    FailurePolicyConstant,
    FailurePolicyDrop,
    Job,
    JobExistsError,
    NamedJob,
    ValidationError,
)
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.testing import bulk_add

pytestmark = pytest.mark.etcd


def never(_req):
    raise AssertionError("nothing runs in these tests")


@pytest.fixture
def crud(make_cron):
    """A Cron that is never started: CRUD alone."""
    return make_cron(never)


def stored_keys(client, namespace: str) -> list[bytes]:
    return sorted(kv.key for kv in client.list_prefix(f"{namespace}/".encode(),
                                                      keys_only=True)[1])


def test_add_get_round_trip_with_default_failure_policy(crud):
    payload = Any()
    payload.Pack(wrappers_pb2.StringValue(value="hello"))
    crud.add("job", Job(schedule="@every 10s", repeats=3, payload=payload))

    job = crud.get("job")

    assert job.schedule == "@every 10s"
    assert job.repeats == 3
    assert job.payload == payload
    assert job.failure_policy == FailurePolicy(
        constant=FailurePolicyConstant(interval={"seconds": 1}, max_retries=3))


def test_explicit_failure_policy_is_kept(crud):
    crud.add("drop", Job(due_time="1h", failure_policy=FailurePolicy(drop=FailurePolicyDrop())))
    assert crud.get("drop").failure_policy.WhichOneof("policy") == "drop"


def test_get_missing_is_none(crud):
    assert crud.get("nope") is None


def test_add_replaces_and_drops_the_old_counter(crud, client, namespace):
    keys = Keys(namespace)
    crud.add("job", Job(due_time="1h"))
    client.put(keys.counter("job"), stored_pb2.Counter(count=2).SerializeToString())
    first = stored_pb2.Job.FromString(client.get(keys.job("job")).value)

    crud.add("job", Job(due_time="2h"))

    second = stored_pb2.Job.FromString(client.get(keys.job("job")).value)
    assert second.partition_id != first.partition_id
    assert crud.get("job").due_time == "2h"
    assert client.get(keys.counter("job")) is None


def test_add_if_not_exists_is_create_only(crud):
    crud.add_if_not_exists("x", Job(due_time="10s"))
    with pytest.raises(JobExistsError, match=r"job already exists: 'x'"):
        crud.add_if_not_exists("x", Job(due_time="20s"))
    assert crud.get("x").due_time == "10s"


def test_delete_removes_job_and_counter_and_missing_is_fine(crud, client, namespace):
    keys = Keys(namespace)
    crud.add("job", Job(due_time="1h"))
    client.put(keys.counter("job"), b"")
    crud.delete("job")
    crud.delete("job")
    crud.delete("never-existed")
    assert stored_keys(client, namespace) == []


def test_delete_prefixes_removes_jobs_and_counters_under_each_prefix(crud, client, namespace):
    keys = Keys(namespace)
    for name in ["tenant-a||1", "tenant-a||2", "tenant-b||1", "tenant-c||1"]:
        crud.add(name, Job(due_time="1h"))
        client.put(keys.counter(name), b"")

    crud.delete_prefixes("tenant-a||", "tenant-b||")

    assert [j.name for j in crud.list()] == ["tenant-c||1"]
    assert stored_keys(client, namespace) == [keys.counter("tenant-c||1"), keys.job("tenant-c||1")]


def test_delete_prefixes_rejects_too_many_prefixes_and_deletes_nothing(crud):
    crud.add("keep", Job(due_time="1h"))
    with pytest.raises(ValidationError, match="at most 64 prefixes"):
        crud.delete_prefixes(*[f"p{i}" for i in range(65)], "k")
    assert crud.get("keep") is not None


def test_list_is_sorted_without_namespace_and_filters_by_prefix(crud):
    for name in ["b", "a||2", "a||1", "c"]:
        crud.add(name, Job(due_time="1h"))
    assert [j.name for j in crud.list()] == ["a||1", "a||2", "b", "c"]
    assert [j.name for j in crud.list("a||")] == ["a||1", "a||2"]
    assert all(isinstance(j, NamedJob) and j.job.due_time == "1h" for j in crud.list())


def test_list_pages_through_more_than_one_page(crud):
    names = [f"job-{i:05d}" for i in range(2345)]
    bulk_add(crud, {n: Job(due_time="1h") for n in names})

    listed = crud.list()

    assert [j.name for j in listed] == names


def test_list_gives_every_field_of_every_job_as_get_does(crud, client, namespace):
    """list() assembles its messages from the stored records: names and jobs of every size
    (lengths past one varint byte), multi-byte names, all fields."""
    payload = Any()
    payload.Pack(wrappers_pb2.StringValue(value="p" * 300))
    jobs = {
        "a": Job(due_time="1h"),
        "é-ünïcødé-名前": Job(schedule="@every 1m", repeats=3, ttl="2h", metadata=payload),
        "n" * 200: Job(schedule="*/5 * * * * *", payload=payload, coalesce=True,
                       catch_up_window="30s", trigger_timeout="10s",
                       failure_policy=FailurePolicy(constant=FailurePolicyConstant(
                           interval=timedelta(seconds=1), max_retries=2))),
        "z-drop": Job(due_time="2h", failure_policy=FailurePolicy(drop=FailurePolicyDrop())),
    }
    for name, job in jobs.items():
        crud.add(name, job)
    keys = Keys(namespace)
    client.put(keys.job("b-undecodable"), b"\xff\xff\xff")

    listed = crud.list()

    assert [j.name for j in listed] == sorted(jobs)
    for named in listed:
        assert named.job == crud.get(named.name)
        assert named.job.SerializeToString(deterministic=True) == \
            crud.get(named.name).SerializeToString(deterministic=True)
    value = wrappers_pb2.StringValue()
    assert next(j for j in listed if j.name == "n" * 200).job.payload.Unpack(value)
    assert value.value == "p" * 300


def test_jobs_stream_with_their_counters_across_pages(crud, client, namespace):
    from etcdcron.store import stream_jobs_and_counters
    keys = Keys(namespace)
    names = [f"s-{i:03d}" for i in range(60)]
    bulk_add(crud, {n: Job(due_time="1h") for n in names})
    counted = names[::3] + ["s-000a", "r-before", "t-after"]  # and counters of no job
    for name in counted:
        client.put(keys.counter(name), name.encode())

    revision, pairs = stream_jobs_and_counters(client, keys, page_size=7)
    client.put(keys.job("s-999"), b"")  # after the revision: not listed
    got = [(kv.key, counter.value if counter is not None else None) for kv, counter in pairs]

    assert got == [(keys.job(n), n.encode() if n in names[::3] else None) for n in names]
    assert revision < client.get(keys.job("s-999")).mod_revision


def test_invalid_input_raises_and_writes_nothing(crud, client, namespace):
    with pytest.raises(ValidationError, match="'foo/'"):
        crud.add("foo/", Job(due_time="1s"))
    with pytest.raises(ValidationError, match="schedule or a due_time"):
        crud.add("ok", Job())
    with pytest.raises(ValidationError, match=r"invalid schedule '\* \* \* \* \*'.*seconds"):
        crud.add("ok", Job(schedule="* * * * *"))
    with pytest.raises(ValidationError, match="ttl"):
        crud.add_if_not_exists("ok", Job(due_time="1s", ttl="1h"))
    with pytest.raises(ValidationError):
        crud.get("")
    with pytest.raises(ValidationError):
        crud.delete("..")
    assert stored_keys(client, namespace) == []


def test_undecodable_record_is_skipped_by_list_and_reported_by_get(crud, client, namespace,
                                                                  caplog):
    keys = Keys(namespace)
    crud.add("good", Job(due_time="1h"))
    client.put(keys.job("bad"), b"\xff\xff not a protobuf")

    with caplog.at_level(logging.WARNING):
        assert [j.name for j in crud.list()] == ["good"]
    assert "'bad'" in caplog.text
    with pytest.raises(EtcdCronError, match="cannot decode"):
        crud.get("bad")
    assert client.get(keys.job("bad")) is not None  # never deleted


def test_crud_after_stop_is_a_lifecycle_error(crud):
    crud.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        crud.add("x", Job(due_time="1s"))
