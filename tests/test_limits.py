"""What ``add()`` refuses, and that what it accepts really runs, against a real etcd.

Sizes (etcd's default 1.5 MiB request limit), times and durations the engine can compute:
refused with a ValidationError and nothing written; a job at the largest accepted size fires
and is recorded, alone and many at once.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc
from google.protobuf.timestamp_pb2 import Timestamp

from etcdcron import FailurePolicy, FailurePolicyConstant, Job, ValidationError
from etcdcron._etcd import cmp_create, cmp_mod, op_delete, op_put, op_range, op_txn
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.testing import wait_until
from etcdcron.validation import MAX_NAME_BYTES, MAX_RECORD_BYTES
from tests.test_validation import blob, job_of_size

pytestmark = pytest.mark.etcd


def job_keys(client, namespace: str) -> list[bytes]:
    """The keys of jobs and counters in ``namespace``."""
    return [kv.key for prefix in ("jobs", "counters")
            for kv in client.list_prefix(f"{namespace}/{prefix}/".encode(), keys_only=True)[1]]


ETCD_MAX_REQUEST_BYTES = 1_572_864  # etcd's default --max-request-bytes
HEADER_BYTES = 1024  # etcd wraps a request with its id, user name and auth revision


@pytest.mark.unit
def test_the_largest_requests_fit_in_etcds_default_limit_with_16_kib_namespace_and_replica_id():
    keys = Keys("n" * 16 * 1024)
    name = "j" * MAX_NAME_BYTES
    job, counter = keys.job(name), keys.counter(name)
    record = b"r" * MAX_RECORD_BYTES
    # Store.add_if_not_exists, the largest add: create-only compare, put, delete, range
    add = rpc.TxnRequest(compare=[cmp_create(job, 0)],
                         success=[op_put(job, record), op_delete(counter)],
                         failure=[op_range(job)])
    # one job's own result, inside the recorder's fenced transaction (Engine._plan)
    stored = stored_pb2.Counter(job_partition_id=2**64 - 1, count=2**32 - 1, attempts=2**32 - 1,
                                last_trigger=Timestamp(seconds=253402300799, nanos=999_999_999))
    result = rpc.TxnRequest(
        compare=[cmp_mod(keys.leader("r" * 16 * 1024), 2**62)],
        success=[op_txn([cmp_mod(job, 2**62), cmp_mod(counter, 2**62)],
                        [op_put(counter, stored.SerializeToString())],
                        [op_range(job), op_range(counter)])])
    for request in (add, result):
        assert request.ByteSize() + HEADER_BYTES <= ETCD_MAX_REQUEST_BYTES


@pytest.mark.parametrize("how", ["add", "add_if_not_exists"])
def test_a_2mib_payload_is_refused_and_nothing_is_stored(producer, client, namespace, how):
    with pytest.raises(ValidationError) as info:
        getattr(producer, how)("big", Job(due_time="1s", payload=blob(2 * 1024 * 1024)))
    assert str(info.value).startswith("payload takes 2,097,152 bytes, more than the 1,310,720")
    assert job_keys(client, namespace) == []


def test_a_330kb_name_is_refused_and_nothing_is_stored(producer, client, namespace):
    with pytest.raises(ValidationError) as info:
        producer.add("n" * 330_000, Job(schedule="@every 1s"))
    assert "330,000 bytes of UTF-8, more than the 32,768 allowed" in str(info.value)
    assert job_keys(client, namespace) == []


@pytest.mark.parametrize("job", [
    Job(schedule="TZ=America/New_York @daily", due_time="0001-01-01T00:00:00Z"),
    Job(schedule="@every 1s", due_time="9999-12-31T23:59:59Z"),
    Job(due_time="P1000000000D"),
    Job(schedule="@every 1s", ttl="PT1000000000000000000H"),
    Job(schedule="@every 1s", ttl="P439456786.5W"),
    Job(schedule="@every 1s", failure_policy=FailurePolicy(constant=FailurePolicyConstant(
        interval=timedelta(days=3_000_000)))),
], ids=["due-year-1", "due-year-9999", "huge-days", "huge-hours", "huge-weeks", "huge-retry"])
def test_times_and_durations_the_engine_cannot_compute_are_refused(producer, client, namespace,
                                                                   job):
    with pytest.raises(ValidationError):
        producer.add("x", job)
    assert job_keys(client, namespace) == []


@pytest.mark.slow
def test_a_job_of_the_largest_accepted_size_fires_and_is_recorded(make_cron, calls, client,
                                                                   namespace):
    cron = make_cron(calls.add)
    name = "n" * MAX_NAME_BYTES
    # added at any time of day: the longest timestamps take as many bytes as these
    latest = datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
    job = job_of_size(MAX_RECORD_BYTES, latest, schedule="@every 1s", due_time="0s", repeats=3)
    cron.add(name, job)  # accepted: the add request fits
    cron.start()
    assert cron.wait_elected(10)
    calls.wait(name, 3, timeout=20)
    # Each result was recorded: after the third, the finished job is deleted with its counter.
    wait_until(lambda: job_keys(client, namespace) == [],
               timeout=20, message="the finished job deleted")
    assert calls.count(name) == 3


@pytest.mark.slow
def test_many_jobs_with_the_longest_names_due_at_once_are_all_recorded(make_cron, client,
                                                                       namespace):
    # 20 results of 32 KiB names: one result transaction of about 3 MiB, more than etcd takes
    # (its gRPC limit is --max-request-bytes + 512 KiB); it must be split, never abandoned.
    count = 20
    started = threading.Barrier(count)
    fired: list[str] = []

    def trigger(req):
        fired.append(req.name)
        started.wait(timeout=20)  # every trigger returns at once, so results arrive together
        return True

    cron = make_cron(trigger, workers=count + 4)
    names = [f"{i:02d}".ljust(MAX_NAME_BYTES, "n") for i in range(count)]
    for name in names:
        cron.add(name, Job(due_time="1s"))
    cron.start()
    assert cron.wait_elected(10)
    wait_until(lambda: job_keys(client, namespace) == [],
               timeout=30, message=lambda: f"all {count} one-shots recorded and deleted "
                                           f"({len(fired)} fired)")
    assert sorted(fired) == names
