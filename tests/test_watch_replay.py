"""A watch that falls behind while large job records change gets them back in one replay larger
than gRPC's default 4 MiB message limit: the replica's watch takes it and goes on."""

from __future__ import annotations

import os

import grpc
import pytest
from etcd3.etcdrpc import rpc_pb2 as rpc
from etcd3.etcdrpc import rpc_pb2_grpc as rpc_grpc
from google.protobuf import any_pb2, wrappers_pb2

from etcdcron import Cron, Job
from etcdcron._etcd import EtcdClient
from etcdcron.keys import prefix_end
from etcdcron.testing import EtcdProxy, wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

RECORD = 300_000  # bytes of payload per job record (random, so nothing shrinks it)
NAMES, ROUNDS = 12, 2  # 24 revisions of about 300 KB: a 7 MB replay


def _big_job() -> Job:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.BytesValue(value=os.urandom(RECORD)))
    return Job(due_time="1h", payload=payload)


def _first_replay_error(endpoint: str, key: bytes, start_revision: int):
    """What a watch with gRPC's default receive limit gets when it asks for the replay."""
    with grpc.insecure_channel(endpoint) as channel:
        request = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=prefix_end(key), start_revision=start_revision))
        call = rpc_grpc.WatchStub(channel).Watch(iter([request]), timeout=20)
        try:
            for response in call:
                if response.events:
                    return None
        except grpc.RpcError as exc:
            return exc.code()
    return None


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_a_watch_replay_larger_than_4_mib_does_not_kill_the_watch(etcd, namespace, calls, fault):
    puts: list = []
    with EtcdProxy(etcd.endpoint) as proxy:
        # A lease long enough to outlast the fault: the watch resumes, nothing is listed again.
        replica = Cron(endpoints=proxy.endpoint, namespace=namespace, trigger=calls.add,
                       lease_ttl=30, consumer_sink=lambda e: e.HasField("put") and puts.append(
                           (e.put.name, e.put.mod_revision)))
        producer = Cron(endpoints=etcd.endpoint, namespace=namespace, trigger=print)
        client = EtcdClient(etcd.endpoint)
        try:
            replica.start()
            assert replica.wait_elected(10)
            producer.add("before", Job(due_time="0s"))
            calls.wait("before", 1)
            behind = client.current_revision() + 1
            getattr(proxy, fault)()
            for _ in range(ROUNDS):
                for i in range(NAMES):
                    producer.add(f"big-{i}", _big_job())
            producer.add("after", Job(due_time="0s"))
            jobs_key = f"{namespace}/jobs/".encode()
            assert _first_replay_error(etcd.endpoint, jobs_key, behind) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the replay is not bigger than 4 MiB"
            proxy.heal()

            calls.wait("after", 1, timeout=30)
            final = {f"big-{i}": client.get(f"{namespace}/jobs/big-{i}".encode()).mod_revision
                     for i in range(NAMES)}
            wait_until(lambda: all((name, rev) in puts for name, rev in final.items()), 10,
                       message="the replica to see the last version of every big job")
            watch = replica.health().threads["etcdcron-watch"]
            assert watch.alive and watch.restarts == 0 and watch.last_error is None, watch
            producer.add("later", Job(due_time="0s"))  # the watch still works
            calls.wait("later", 1, timeout=10)
        finally:
            client.close()
            producer.stop()
            replica.stop(timeout=15)
