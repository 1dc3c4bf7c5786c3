"""The election against real etcd: quorum after membership changes a replica missed, the quorum
warning, resigning, honest ``is_elected()``, records that cannot be encoded, and leadership keys
that are not a replica's (bad names, nested namespaces); plus the pure quorum rule."""

from __future__ import annotations

import logging
import threading

import pytest

from etcdcron import ElectionState, Job
from etcdcron import election
from etcdcron._pb import stored_pb2
from etcdcron.election import _TRANSITIONS, _Member, quorum, resign_backoff
from etcdcron.keys import Keys
from etcdcron.testing import EtcdProxy, bulk_add, wait_until
from tests.test_handoff import Slow
from tests.test_cluster import (  # noqa: F401 - fired and lone_elector are fixtures
    fired,
    lone_elector,
    ownership,
    start_replicas,
    wait_all_elected,
)


def leader_total(client, namespace: str, replica_id: str) -> int | None:
    kv = client.get(Keys(namespace).leader(replica_id))
    return stored_pb2.Leadership.FromString(kv.value).total if kv else None


def fire_shots(producer, fired, count: int = 20) -> set[str]:
    """Add ``count`` one-shots due now, wait for every one to fire; returns who fired them."""
    names = [f"shot-{i:02d}" for i in range(count)]
    before = fired.total()
    bulk_add(producer, {n: Job(due_time="0s") for n in names})
    wait_until(lambda: not producer.list() and fired.total() >= before + count, 20,
               message="every one-shot to fire")
    with fired._lock:
        new = fired.events[before:]
    assert sorted(name for _, name in new) == names  # each once
    return {replica for replica, _ in new}


def firing_pair(make_cron, fired, jobs: int = 16) -> tuple:
    """Replicas ``a`` and ``b``, elected, both firing ``@every 300ms`` jobs; returns
    ``(a, b, job names)``."""
    a, b = start_replicas(make_cron, fired, ["a", "b"])
    wait_all_elected([a, b])
    names = {f"every-{i}" for i in range(jobs)}
    for name in sorted(names):
        a.add(name, Job(schedule="@every 300ms"))
    wait_until(lambda: set(fired.per_job()) == names and fired.replicas() == {"a", "b"}, 15,
               message="both replicas to fire")
    return a, b, names


def fired_since(fired, mark: int, replica: str) -> set[str]:
    """The jobs ``replica`` fired after the first ``mark`` events."""
    with fired._lock:
        return {name for r, name in fired.events[mark:] if r == replica}


def quorum_again(a, b, producer, fired) -> None:
    """``a`` and ``b`` are elected together again, and every partition fires."""
    wait_all_elected([a, b], 15)
    assert ownership(a)[0] == ownership(b)[0] == 2
    assert fire_shots(producer, fired) == {"a", "b"}


def join_and_leave(make_cron, fired, client, namespace) -> None:
    """Replica ``c`` joins; once ``b`` has acknowledged it, it leaves; ``b`` acknowledges that."""
    c = make_cron(fired.trigger_for("c"), replica_id="c")
    c.start()
    wait_until(lambda: leader_total(client, namespace, "b") == 3, 10,
               message="b to acknowledge c joining")
    c.stop()
    wait_until(lambda: leader_total(client, namespace, "b") == 2, 10,
               message="b to acknowledge c leaving")


@pytest.mark.etcd
@pytest.mark.cluster
def test_a_join_and_leave_seen_in_one_evaluation_does_not_stall_quorum(
        make_cron, fired, client, namespace, producer, monkeypatch):
    # Issue 6 defect 1: a and b elected; c joins and leaves while a's election thread is held,
    # so a takes c's create and delete in one evaluation and its membership looks unchanged.
    # b saw c come and go; it must reach quorum with a again, and every partition fire.
    a, b = start_replicas(make_cron, fired, ["a", "b"])
    wait_all_elected([a, b])
    held, release = threading.Event(), threading.Event()
    take = a._elector._take

    def held_take(message):
        if not release.is_set():
            held.set()
            release.wait(30)
        take(message)

    monkeypatch.setattr(a._elector, "_take", held_take)
    try:
        wait_until(held.is_set, 5, message="a's election thread to be held")
        join_and_leave(make_cron, fired, client, namespace)
    finally:
        release.set()
    quorum_again(a, b, producer, fired)


@pytest.mark.etcd
@pytest.mark.cluster
def test_a_join_and_leave_a_replica_never_saw_does_not_stall_quorum(
        make_cron, fired, client, namespace, producer, monkeypatch):
    # The same, but a's leadership watch loses the events (as when it falls behind compaction)
    # and lists the keys again: its snapshot shows no trace of c.
    a, b = start_replicas(make_cron, fired, ["a", "b"])
    wait_all_elected([a, b])
    watch = a._elector.watch
    deliver = watch._deliver
    dropping = threading.Event()
    dropping.set()
    monkeypatch.setattr(watch, "_deliver", lambda message: None if dropping.is_set()
                        else deliver(message))
    try:
        join_and_leave(make_cron, fired, client, namespace)
    finally:
        dropping.clear()
    watch.relist()
    quorum_again(a, b, producer, fired)


@pytest.mark.etcd
@pytest.mark.cluster
def test_a_join_and_leave_while_a_replica_is_cut_off_does_not_stall_quorum(
        etcd, make_cron, fired, client, namespace, producer):
    # The reproduction: a's connections to etcd are cut (through a proxy) while c joins
    # and leaves; a's lease outlives the cut, and its watch resumes where it stopped.
    proxy = EtcdProxy(etcd.endpoint).start()
    try:
        a = make_cron(fired.trigger_for("a"), replica_id="a", lease_ttl=10,
                      endpoints=proxy.endpoint)
        (b,) = start_replicas(make_cron, fired, ["b"], lease_ttl=10)
        a.start()
        wait_all_elected([a, b])
        proxy.cut()
        try:
            join_and_leave(make_cron, fired, client, namespace)
        finally:
            proxy.heal()
        assert a.is_elected()  # its lease held through the cut
        quorum_again(a, b, producer, fired)
    finally:
        proxy.close()


@pytest.mark.etcd
@pytest.mark.cluster
def test_a_quorum_not_reached_in_time_is_a_warning_naming_who_has_not_acknowledged(
        make_cron, fired, client, namespace, caplog, monkeypatch):
    monkeypatch.setattr(election, "QUORUM_PATIENCE", 0.2)  # one second with lease_ttl=5
    ghost = Keys(namespace).leader("ghost")  # a key nobody keeps up to date
    client.put(ghost, stored_pb2.Leadership(total=7, uid=1).SerializeToString())
    with caplog.at_level(logging.WARNING, logger="etcdcron"):
        (a,) = start_replicas(make_cron, fired, ["a"])
        wait_until(lambda: "no quorum" in caplog.text, 10, message="a quorum warning")
    (record,) = [r for r in caplog.records if "no quorum" in r.getMessage()][:1]
    assert record.levelno == logging.WARNING
    assert "waiting for 'ghost' (total 7 at revision" in record.getMessage()
    assert "'a' (total" not in record.getMessage()
    assert not a.is_elected() and a.election_state is ElectionState.WAITING
    client.delete(ghost)
    assert a.wait_elected(10)


@pytest.mark.etcd
@pytest.mark.cluster
def test_resign_moves_every_job_to_the_other_replica_and_it_rejoins_later(make_cron, fired,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="etcdcron")
    a, b, names = firing_pair(make_cron, fired)
    a._elector.resign("a test asked")
    assert not a.is_elected()  # at once
    wait_until(lambda: ownership(b) == (1, (0,)), 10, message="b to take every partition")
    assert a.election_state is ElectionState.RESIGNED and not a.is_elected()
    mark = fired.total()
    wait_until(lambda: fired_since(fired, mark, "b") == names, 10,
               message="every job to fire on b")
    if a.election_state is ElectionState.RESIGNED:
        assert fired_since(fired, mark, "a") == set()
    warnings = [r for r in caplog.records if "resigns its partitions" in r.getMessage()]
    assert warnings and warnings[0].levelno == logging.WARNING
    assert "a test asked" in warnings[0].getMessage()

    wait_all_elected([a, b], 20)  # rejoined after its backoff
    assert ownership(a)[0] == ownership(b)[0] == 2
    mark = fired.total()
    wait_until(lambda: fired_since(fired, mark, "a"), 10, message="a to fire again")

    # A second resignation soon after the first stays out twice as long.
    a._elector.resign("again")
    wait_until(lambda: "resigned (2 in a row); claiming again in 5.0s" in caplog.text, 10)
    assert "resigned (1 in a row); claiming again in 2.5s" in caplog.text


@pytest.mark.etcd
@pytest.mark.cluster
def test_triggers_running_when_a_replica_resigns_are_handed_over_not_fired_again(make_cron,
                                                                               client,
                                                                               namespace):
    # Resigning deletes the leadership key and keeps the lease: the NS/inflight/ keys of the
    # triggers still running are bound to it, so the other replica waits for their results.
    slow = Slow()
    try:
        a, b = (make_cron(slow.trigger_for(n), replica_id=n, workers=16) for n in ("a", "b"))
        a.start()
        b.start()
        wait_all_elected([a, b])
        names = [f"slow-{i:02d}" for i in range(16)]  # on both replicas, but for 2**-15
        for name in names:
            b.add(name, Job(due_time="0s"))
        wait_until(lambda: sorted(slow.per_job()) == names, 10, message="every trigger to start")
        assert slow.by("a") and slow.by("b")
        a._elector.resign("a test asked")
        wait_until(lambda: ownership(b) == (1, (0,)), 15, message="b to take every partition")
        inflight = client.list_prefix(Keys(namespace).inflight)[1]
        assert set(slow.by("a")) <= {Keys(namespace).in_flight_name(kv.key) for kv in inflight}
    finally:
        slow.release.set()
    wait_until(lambda: not b.list(), 15, message="every result to be recorded")
    assert slow.per_job() == {name: 1 for name in names}


@pytest.mark.etcd
@pytest.mark.cluster
def test_is_elected_is_false_while_the_session_drains(make_cron, namespace):
    # Issue 6 defect 12: from the moment a session ends, drain included.
    started, release = threading.Event(), threading.Event()

    def slow(req):
        started.set()
        release.wait(20)

    a = make_cron(slow, replica_id="a")
    a.start()
    assert a.wait_elected(10)
    a.add("slow", Job(due_time="0s"))
    wait_until(started.is_set, 10)
    b = make_cron(print, replica_id="b")
    try:
        b.start()  # a's session ends when it sees b; it drains while "slow" runs
        wait_until(lambda: a._engine.index.ownership is None, 10, message="a to drain")
        assert a._engine.index.running == 1
        assert not a.is_elected()
        assert a.election_state is ElectionState.WAITING
    finally:
        release.set()
    wait_all_elected([a, b])


@pytest.mark.etcd
def test_a_record_that_cannot_be_encoded_blocks_the_election_visibly(lone_elector, caplog):
    # Issue 6 defect 17: a total the record's uint64 cannot hold must not kill the thread.
    with caplog.at_level(logging.WARNING, logger="etcdcron"):
        lone = lone_elector("0", static=(0, 2**64))
        lone.start()
        wait_until(lambda: lone.elector.state is ElectionState.BLOCKED, 10)
        wait_until(lambda: "cannot be encoded" in caplog.text, 5)
    health = lone.elector.loop.health()
    assert health.alive and not health.ok and health.restarts == 0
    assert health.last_error.startswith("ElectionBlocked: its leadership record (total "
                                        "18446744073709551616) cannot be encoded")
    assert not lone.elector.is_elected()


@pytest.mark.etcd
@pytest.mark.cluster
def test_leadership_keys_of_a_nested_namespace_or_with_bad_names_are_ignored(
        make_cron, fired, client, namespace, caplog):
    # Issue 6 defects 2 and 3 for NS/leadership/: namespace NS/leadership keeps its keys under
    # NS/leadership/{jobs,counters,leadership}/..., and other keys have names no replica has.
    leadership = Keys(namespace).leadership
    client.put(leadership + b"\xff\xfe", b"\x08\x01")  # a decodable record, a non-UTF-8 name
    client.put(leadership, b"\x08\x01")  # an empty name
    inner = make_cron(fired.trigger_for("inner"), replica_id="inner",
                      namespace=f"{namespace}/leadership")
    inner.start()
    assert inner.wait_elected(10)
    inner.add("inner-every", Job(schedule="@every 200ms", repeats=5))
    with caplog.at_level(logging.WARNING, logger="etcdcron"):
        (outer,) = start_replicas(make_cron, fired, ["outer"])
        assert outer.wait_elected(10), outer.election_state
        outer.add("outer-shot", Job(due_time="0s"))
        inner.add("inner-shot", Job(due_time="0s"))
        wait_until(lambda: fired.per_job()["inner-every"] == 5 and fired.per_job()["outer-shot"]
                   and fired.per_job()["inner-shot"], 15)
    assert ownership(outer) == (1, (0,)) and ownership(inner) == (1, (0,))
    assert outer.is_elected() and inner.is_elected()
    assert sorted(fired.events) == sorted([("outer", "outer-shot"), ("inner", "inner-shot")]
                                          + [("inner", "inner-every")] * 5)
    skipped = [r for r in caplog.records if "skipping leadership key" in r.getMessage()]
    assert len(skipped) == 1 and "not UTF-8" in skipped[0].getMessage()
    assert skipped[0].levelno == logging.WARNING


# -- pure logic ---------------------------------------------------------------------------------


def member(total: int, create: int, mod: int) -> _Member:
    return _Member(stored_pb2.Leadership(total=total), create, mod, lease=0)


@pytest.mark.unit
def test_quorum_needs_every_key_to_show_the_total_written_after_the_newest_key():
    # a and b, elected; c joined (at 20) and left: b acknowledged c, then its leaving.
    assert quorum({b"a": member(2, 5, 10), b"b": member(2, 8, 30)}) == []
    # b acknowledged c joining and has not yet seen it leave.
    assert quorum({b"a": member(2, 5, 10), b"b": member(3, 8, 25)}) == [b"b"]
    # d joined at 40: a has not written since.
    d_joined = {b"a": member(3, 5, 10), b"b": member(3, 8, 45), b"d": member(3, 40, 40)}
    assert quorum(d_joined) == [b"a"]
    # The right total, written before the newest key was created, is no acknowledgement.
    assert quorum({b"a": member(2, 5, 39), b"e": member(2, 40, 41)}) == [b"a"]
    assert quorum({b"a": member(1, 5, 5)}) == []


@pytest.mark.unit
def test_resign_backoff_doubles_from_half_a_ttl_up_to_three_ttls():
    assert [resign_backoff(n, 20) for n in range(1, 7)] == [10, 20, 40, 60, 60, 60]
    assert resign_backoff(10**6, 5) == 15


@pytest.mark.unit
def test_every_state_can_resign_and_a_resigned_replica_only_claims_again_or_stops():
    for state in ElectionState:
        if state not in (ElectionState.STOPPED, ElectionState.RESIGNED):
            assert ElectionState.RESIGNED in _TRANSITIONS[state], state
    assert _TRANSITIONS[ElectionState.RESIGNED] == {ElectionState.CLAIMING,
                                                    ElectionState.STOPPED}
