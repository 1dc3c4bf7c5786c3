"""Several replicas sharing one namespace, as threads of this process (go-etcd-cron's cluster
behaviours, plus counter GC and blocked elections)."""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict

import pytest
from google.protobuf import wrappers_pb2
from google.protobuf.any_pb2 import Any

from etcdcron import ElectionState, Job
from etcdcron._pb import stored_pb2
from etcdcron.keys import Keys
from etcdcron.election import Elector
from etcdcron.lease import LeaseKeeper
from etcdcron.testing import bulk_add, wait_until

pytestmark = [pytest.mark.etcd, pytest.mark.cluster]


class Fired:
    """Which replica fired which job, thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.events: list[tuple[str, str]] = []

    def trigger_for(self, replica: str):
        def trigger(req):
            with self._lock:
                self.events.append((replica, req.name))
        return trigger

    def per_job(self) -> Counter:
        with self._lock:
            return Counter(name for _, name in self.events)

    def replicas(self) -> set[str]:
        with self._lock:
            return {replica for replica, _ in self.events}

    def total(self) -> int:
        with self._lock:
            return len(self.events)


@pytest.fixture
def fired() -> Fired:
    return Fired()


def start_replicas(make_cron, fired: Fired, names, **options):
    crons = [make_cron(fired.trigger_for(n), replica_id=n, workers=2, **options) for n in names]
    for cron in crons:
        cron.start()
    return crons


def wait_all_elected(crons, timeout: float = 30) -> None:
    wait_until(lambda: all(c.is_elected() for c in crons), timeout,
               message=lambda: f"all elected: {[(c.replica_id, c.election_state) for c in crons]}")


def ownership(cron):
    own = cron._elector.ownership
    return (own.total, tuple(sorted(own.indices))) if own else None


def test_three_replicas_share_100_one_shots_each_fired_once(make_cron, fired):
    crons = start_replicas(make_cron, fired, ["r1", "r2", "r3"])
    wait_all_elected(crons)
    assert sorted(ownership(c) for c in crons) == [(3, (0,)), (3, (1,)), (3, (2,))]

    for i in range(100):
        crons[0].add(f"job-{i:03d}", Job(due_time="0s"))
    wait_until(lambda: fired.total() >= 100 and not crons[0].list(), 20)

    assert fired.per_job() == {f"job-{i:03d}": 1 for i in range(100)}
    assert fired.replicas() == {"r1", "r2", "r3"}


@pytest.mark.slow
def test_scale_up_from_3_to_5_while_jobs_run_keeps_exactly_5_triggers(make_cron, fired,
                                                                      producer):
    crons = start_replicas(make_cron, fired, ["r1", "r2", "r3"])
    wait_all_elected(crons)
    names = [f"job-{i:03d}" for i in range(100)]
    bulk_add(producer, {n: Job(schedule="@every 1s", repeats=5) for n in names})
    wait_until(lambda: fired.total() >= 150, 20)  # well into the run

    crons += start_replicas(make_cron, fired, ["r4", "r5"])
    wait_all_elected(crons)

    wait_until(lambda: not crons[0].list(), 30, message="every job to finish")
    assert fired.per_job() == {n: 5 for n in names}
    assert {"r4", "r5"} & fired.replicas()


@pytest.mark.slow
def test_scale_down_from_5_to_3_every_job_completes(make_cron, fired, producer):
    crons = start_replicas(make_cron, fired, ["r1", "r2", "r3", "r4", "r5"])
    wait_all_elected(crons)
    names = [f"job-{i:03d}" for i in range(100)]
    bulk_add(producer, {n: Job(schedule="@every 1s", repeats=5) for n in names})
    wait_until(lambda: fired.total() >= 150, 20)

    crons[3].stop()
    crons[4].stop()
    wait_all_elected(crons[:3])

    wait_until(lambda: not crons[0].list(), 30, message="every job to finish")
    assert fired.per_job() == {n: 5 for n in names}


def test_duplicated_replica_ids_are_active_and_passive(make_cron, fired):
    (active,) = start_replicas(make_cron, fired, ["same"])
    assert active.wait_elected(10)
    (passive,) = start_replicas(make_cron, fired, ["same"])
    wait_until(lambda: passive.election_state is ElectionState.PASSIVE, 10)

    active.add("before", Job(due_time="0s"))
    wait_until(lambda: fired.per_job()["before"] == 1, 10)

    active.stop()
    assert passive.wait_elected(10)
    passive.add("after", Job(due_time="0s"))
    wait_until(lambda: fired.per_job()["after"] == 1, 10)
    assert fired.events == [("same", "before"), ("same", "after")]


class LoneElector:
    """One replica's lease keeper and elector, without the engine: for the claim of its key."""

    UID = 0x5EED

    def __init__(self, client, namespace: str, replica_id: str, *, static=None, clock=None):
        self.stop_event = threading.Event()
        self.lease = LeaseKeeper(client, 5, self.stop_event, on_change=lambda: self.elector.wake(),
                                 clock=clock)
        self.elector = Elector(client=client, keys=Keys(namespace), lease=self.lease,
                               replica_id=replica_id, uid=self.UID, replica_data=None,
                               static=static, activate=lambda ownership: None,
                               deactivate=lambda: None, on_elected=lambda ownership: None,
                               stop=self.stop_event)

    def start(self) -> None:
        self.lease.start()
        self.elector.start()

    def close(self) -> None:
        self.elector.halt()
        self.elector.thread.join(10)
        self.stop_event.set()
        self.elector.watch.stop()
        self.lease.stop()
        for thread in (self.elector.thread, self.elector.watch.thread, self.lease.thread):
            thread.join(10)
            assert not thread.is_alive(), thread.name


@pytest.fixture
def lone_elector(client, namespace):
    made = []

    def make(replica_id: str, **options) -> LoneElector:
        made.append(LoneElector(client, namespace, replica_id, **options))
        return made[-1]

    yield make
    for lone in made:
        lone.close()


def own_record() -> bytes:
    return stored_pb2.Leadership(total=1, uid=LoneElector.UID).SerializeToString()


def test_a_replica_takes_up_its_own_key_written_under_its_current_lease(lone_elector, client,
                                                                        namespace):
    # A claim that etcd applied but whose answer was lost leaves the key with this replica's
    # own record, bound to its current lease: that is no other process holding the id.
    lone = lone_elector("r1")
    lone.lease.start()
    lease_id, _ = wait_until(lone.lease.current, 10, message="a lease")
    client.put(Keys(namespace).leader("r1"), own_record(), lease=lease_id)
    lone.elector.start()
    assert lone.elector.wait_elected(10), lone.elector.state
    assert lone.elector.ownership.total == 1


def test_a_replica_waits_for_its_own_key_of_an_earlier_lease(lone_elector, client, namespace,
                                                             caplog):
    # After losing a lease, the key it bound may outlive it for a moment (until the revoke or
    # etcd's expiry): the replica waits for it to go, not passively as if another held the id.
    caplog.set_level(logging.INFO, logger="etcdcron")
    earlier, _ = client.lease_grant(60)
    client.put(Keys(namespace).leader("r1"), own_record(), lease=earlier)
    lone = lone_elector("r1")
    lone.start()
    wait_until(lambda: f"earlier lease ({earlier:x})" in caplog.text, 10,
               message="the replica to wait for its earlier key")
    assert lone.elector.state is ElectionState.CLAIMING
    client.lease_revoke(earlier)
    assert lone.elector.wait_elected(10), lone.elector.state
    assert "held by another process" not in caplog.text


def test_a_leadership_key_written_again_gets_a_new_fence(make_cron, fired, client, namespace):
    # A write of the key whose answer was lost (its deadline passed after etcd applied it)
    # leaves the key at a newer revision than the replica knows. Fencing results with the old
    # one would fail every write: the replica must take the revision etcd holds.
    (cron,) = start_replicas(make_cron, fired, ["r1"])
    assert cron.wait_elected(10)
    key = Keys(namespace).leader("r1")
    kv = client.get(key)
    revision = client.put(key, kv.value, lease=kv.lease).header.revision
    wait_until(lambda: cron.is_elected() and cron._elector.ownership.fence_revision == revision,
               10, message="a session fenced by the key's new revision")
    cron.add("after", Job(due_time="0s"))
    wait_until(lambda: not cron.list(), 10, message="the one-shot to be recorded and deleted")
    assert fired.events == [("r1", "after")]


def text_any(text: str) -> Any:
    value = Any()
    value.Pack(wrappers_pb2.StringValue(value=text))
    return value


def test_replica_data_reaches_on_leadership_after_each_join_and_leave(make_cron, fired):
    seen: dict[str, list] = defaultdict(list)
    lock = threading.Lock()

    def listener(name):
        def on_leadership(replicas):
            texts = []
            for data in replicas:
                value = wrappers_pb2.StringValue()
                data.Unpack(value)
                texts.append(value.value)
            with lock:
                seen[name].append(texts)
        return on_leadership

    def replica(name):
        cron = make_cron(fired.trigger_for(name), replica_id=name,
                         replica_data=wrappers_pb2.StringValue(value=f"data-{name}"),
                         on_leadership=listener(name))
        cron.start()
        return cron

    a = replica("a")
    wait_until(lambda: seen["a"] == [["data-a"]], 10)
    b = replica("b")
    wait_until(lambda: seen["a"][-1:] == [["data-a", "data-b"]]
               and seen["b"][-1:] == [["data-a", "data-b"]], 15)
    a.stop()
    wait_until(lambda: seen["b"][-1:] == [["data-b"]], 15)
    assert b.is_elected()


def test_consumer_sink_follows_ownership_across_elections(make_cron, fired, producer):
    events: dict[str, list] = defaultdict(list)
    lock = threading.Lock()

    def sink_for(name):
        def sink(event):
            with lock:
                events[name].append(event)
        return sink

    def owned(name) -> set[str]:
        """The jobs a replica owns according to its sink: puts since the last drop_all."""
        jobs: set[str] = set()
        with lock:
            for event in events[name]:
                kind = event.WhichOneof("event")
                if kind == "drop_all":
                    jobs.clear()
                elif kind == "put":
                    jobs.add(event.put.name)
                else:
                    jobs.discard(event.delete.name)
        return jobs

    names = {f"job-{i:02d}" for i in range(20)}
    bulk_add(producer, {n: Job(due_time="1h") for n in names})
    a = make_cron(fired.trigger_for("a"), replica_id="a", consumer_sink=sink_for("a"))
    a.start()
    wait_until(lambda: owned("a") == names, 10)

    b = make_cron(fired.trigger_for("b"), replica_id="b", consumer_sink=sink_for("b"))
    b.start()
    wait_all_elected([a, b])
    wait_until(lambda: owned("a") | owned("b") == names and not owned("a") & owned("b")
               and owned("a") and owned("b"), 15)
    with lock:
        assert any(e.WhichOneof("event") == "drop_all" for e in events["a"])

    a.delete(sorted(owned("a"))[0])
    gone = sorted(names - owned("a") - owned("b"))
    wait_until(lambda: len(owned("a") | owned("b")) == 19, 10)
    assert len(gone) <= 1

    b.stop()
    with lock:
        assert events["b"][-1].WhichOneof("event") == "drop_all"
    wait_until(lambda: len(owned("a")) == 19, 15)


@pytest.mark.slow
def test_100_replicas_in_one_process_each_adding_one_job(make_cron, fired):
    crons = [make_cron(fired.trigger_for(f"r{i:03d}"), replica_id=f"r{i:03d}", workers=1,
                       lease_ttl=20)
             for i in range(100)]
    for i, cron in enumerate(crons):
        cron.start()
        cron.add(f"job-{i:03d}", Job(due_time="0s"))
    wait_until(lambda: fired.total() >= 100 and not crons[0].list(), 120,
               message=lambda: f"100 jobs fired (have {fired.total()})")
    assert fired.per_job() == {f"job-{i:03d}": 1 for i in range(100)}
    wait_all_elected(crons, 60)
    assert sorted(ownership(c) for c in crons) == [(100, (i,)) for i in range(100)]


def test_a_bogus_leadership_key_blocks_election_until_deleted(make_cron, fired, client,
                                                             namespace, caplog):
    bogus = Keys(namespace).leader("bogus")
    client.put(bogus, b"\xff\xff not a leadership record")
    with caplog.at_level(logging.WARNING, logger="etcdcron"):
        (cron,) = start_replicas(make_cron, fired, ["r1"])
        wait_until(lambda: cron.election_state is ElectionState.BLOCKED, 10)
    assert not cron.is_elected()
    assert "cannot be decoded" in caplog.text and "bogus" in caplog.text

    client.delete(bogus)
    assert cron.wait_elected(10)
    cron.add("job", Job(due_time="0s"))
    wait_until(lambda: fired.per_job()["job"] == 1, 10)


def test_upsert_across_three_replicas_never_fires_the_old_version(make_cron, client, namespace):
    events = []
    lock = threading.Lock()

    def trigger_for(name):
        def trigger(req):
            value = wrappers_pb2.StringValue()
            req.payload.Unpack(value)
            with lock:
                events.append((name, req.name, value.value))
        return trigger

    crons = [make_cron(trigger_for(n), replica_id=n) for n in ["r1", "r2", "r3"]]
    for cron in crons:
        cron.start()
    wait_all_elected(crons)
    for i in range(30):
        crons[0].add(f"job-{i:02d}", Job(due_time="2s", payload=text_any("old")))
    for i in range(30):
        crons[1].add(f"job-{i:02d}", Job(due_time="0s", payload=text_any("new")))
    crons[2].add("zz-barrier", Job(due_time="3s", payload=text_any("barrier")))
    wait_until(lambda: not crons[0].list(), 15)
    with lock:
        versions = Counter(version for _, name, version in events if name != "zz-barrier")
    assert versions == {"new": 30}


def test_static_replica_with_a_different_total_does_not_start(make_cron, fired, caplog):
    first = make_cron(fired.trigger_for("p0"), partition_id=0, partition_total=2)
    second = make_cron(fired.trigger_for("p1"), partition_id=1, partition_total=2)
    first.start()
    second.start()
    wait_all_elected([first, second])

    with caplog.at_level(logging.WARNING, logger="etcdcron"):
        odd = make_cron(fired.trigger_for("odd"), partition_id=2, partition_total=3)
        odd.start()
        wait_until(lambda: odd.election_state is ElectionState.BLOCKED, 10)
    assert "partition total is 3" in caplog.text
    assert not odd.is_elected()
    assert first.is_elected() and second.is_elected()

    for i in range(20):
        first.add(f"job-{i:02d}", Job(due_time="0s"))
    wait_until(lambda: fired.total() >= 20 and not first.list(), 10)
    assert fired.replicas() == {"p0", "p1"}


def test_counter_gc_deletes_orphaned_and_stale_counters(make_cron, fired, client, namespace):
    keys = Keys(namespace)
    (cron,) = start_replicas(make_cron, fired, ["gc"], counter_gc_interval=0.2)
    assert cron.wait_elected(10)
    cron.add("live", Job(schedule="@every 1h"))
    cron.add("stale", Job(schedule="@every 1h"))
    live = stored_pb2.Job.FromString(client.get(keys.job("live")).value)
    client.put(keys.counter("live"), stored_pb2.Counter(
        job_partition_id=live.partition_id, count=1).SerializeToString())
    client.put(keys.counter("stale"), stored_pb2.Counter(
        job_partition_id=12345, count=9).SerializeToString())
    for i in range(150):  # more than one delete batch
        client.put(keys.counter(f"orphan-{i:03d}"), stored_pb2.Counter(count=1).SerializeToString())
    client.put(keys.counter("undecodable"), b"\xff\xff")

    def counters():
        return sorted(keys.counter_name(kv.key)
                      for kv in client.list_prefix(keys.counters)[1])

    wait_until(lambda: counters() == ["live", "undecodable"], 15,
               message=lambda: f"garbage gone (have {len(counters())})")
    wait_until(lambda: cron._collector.deleted == 151, 5)


def test_a_rolling_start_of_ten_replicas_costs_one_rebalance(make_cron, fired, client,
                                                            namespace, monkeypatch):
    """Joins close together are acknowledged together: about one leadership write per replica
    to claim and one to acknowledge, not one acknowledgement per replica per join."""
    from etcdcron import election

    monkeypatch.setattr(election, "SETTLE", 2.0)  # wide enough for a loaded machine
    keys = Keys(namespace)
    start = client.current_revision()
    crons = []
    for i in range(10):
        (cron,) = start_replicas(make_cron, fired, [f"r{i}"])
        crons.append(cron)
        wait_until(lambda: client.get(keys.leader(f"r{i}")) is not None, 10)
    wait_all_elected(crons, 60)

    stream = client.watch(keys.leadership, keys.leadership[:-1] + b"0", start + 1)
    end, writes = client.current_revision(), 0
    for events in stream:
        writes += len(events)
        if events[-1].kv.mod_revision >= end:
            break
    stream.cancel()
    assert writes <= 2 * 10 + 2, writes  # 10 claims + one round of acknowledgements
