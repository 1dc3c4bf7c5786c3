"""The faults of a chaos run: a seeded plan of overlapping faults, and the threads that inject them.

A fault has a start and a duration (seconds from the start of the fault phase); each one runs
on its own thread (``chaos-fault-N``), which waits for the start, strikes, waits, undoes what it
did and logs both moments as JSON lines (``began`` right before striking, ``ended`` once the
undo is complete), so every fault's window is known to the audit.

Rules that keep a correct scheduler able to pass: at most one etcd member is down or frozen at
a time (the cluster keeps its quorum), a replica slot has one fault at a time, at most
``max_replica_faults`` slots are faulted at once, and every fault ends within the phase.

Kinds (``target`` is a slot index for replica faults, a member index for member faults):

``replica-kill``      SIGKILL, restart after the duration (same replica id, or a new one)
``replica-freeze``    SIGSTOP longer than the lease, then SIGCONT
``replica-pause``     SIGSTOP well inside the lease (often with a compaction meanwhile)
``replica-join``      a further replica starts (window: until it has started)
``replica-leave``     that replica stops (SIGTERM) or dies (SIGKILL)
``member-kill``       SIGKILL an etcd member, restart it after the duration
``leader-kill``       the same for whichever member leads the raft group then
``member-freeze``     SIGSTOP an etcd member, SIGCONT after the duration
``cut``, ``blackhole`` a replica's proxies (all, or one member's) reset or silence its traffic
``latency``           a replica's proxies delay every chunk
``compact``           compact etcd up to what the history has seen: past any watch that is
                      behind (a frozen, partitioned or slow replica's)
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field

REPLICA_KINDS = ("replica-kill", "replica-freeze", "replica-pause", "cut", "blackhole", "latency")
MEMBER_KINDS = ("member-kill", "leader-kill", "member-freeze")

WEIGHTS = {
    "replica-kill": 2.0,
    "replica-freeze": 1.5,
    "replica-pause": 2.0,
    "cut": 1.5,
    "blackhole": 1.5,
    "latency": 1.5,
    "member-kill": 1.0,
    "leader-kill": 1.0,
    "member-freeze": 1.0,
    "compact": 0.7,
}


@dataclass
class Fault:
    kind: str
    start: float
    duration: float
    target: int | None = None
    params: dict = field(default_factory=dict)
    began: float | None = None
    ended: float | None = None
    detail: str = ""

    def describe(self) -> str:
        target = "" if self.target is None else f" #{self.target}"
        extra = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"{self.kind}{target}{extra} {self.detail}".strip()


def plan(rng: random.Random, seconds: float, replicas: int, lease_ttl: float,
         mean_gap: float = 4.0, max_replica_faults: int = 2) -> list[Fault]:
    """A seeded sequence of overlapping faults within ``[0, seconds]``."""
    faults: list[Fault] = []
    busy_slot: dict[int, float] = {}   # slot -> when its current fault ends
    member_free_at = 0.0
    # One replica joins and later leaves, on the extra slot (index ``replicas``).
    if seconds >= 30:
        join = rng.uniform(0.1, 0.4) * seconds
        leave = rng.uniform(join + 10, max(join + 11, 0.85 * seconds))
        faults.append(Fault("replica-join", join, 0.0, replicas))
        faults.append(Fault("replica-leave", leave, 0.0, replicas,
                            {"how": rng.choice(["term", "kill"])}))
    t = rng.uniform(1.0, 3.0)
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    while t < seconds - 2:
        kind = rng.choices(kinds, weights)[0]
        room = seconds - 1 - t
        if kind in REPLICA_KINDS:
            free = [i for i in range(replicas) if busy_slot.get(i, -1) < t]
            active = sum(1 for end in busy_slot.values() if end >= t)
            if free and active < max_replica_faults:
                slot = rng.choice(free)
                fault = _replica_fault(rng, kind, t, slot, lease_ttl, room)
                if fault is not None:
                    faults.append(fault)
                    busy_slot[slot] = t + fault.duration
                    if kind in ("replica-pause", "latency", "blackhole") and rng.random() < 0.5:
                        at = t + rng.uniform(0.3, 0.8) * fault.duration
                        faults.append(Fault("compact", at, 0.0, None, {"during": kind}))
        elif kind in MEMBER_KINDS:
            if member_free_at <= t:
                duration = min(room, rng.uniform(1.0, 8.0) if kind != "member-freeze"
                               else rng.uniform(0.5, 6.0))
                if duration >= 0.5:
                    target = None if kind == "leader-kill" else rng.randrange(3)
                    faults.append(Fault(kind, t, duration, target))
                    member_free_at = t + duration + 2.0
        else:
            faults.append(Fault("compact", t, 0.0))
        t += rng.expovariate(1.0 / mean_gap)
    faults.sort(key=lambda f: f.start)
    return faults


def _replica_fault(rng: random.Random, kind: str, t: float, slot: int, lease_ttl: float,
                   room: float) -> Fault | None:
    if kind == "replica-kill":
        duration = rng.uniform(0.3, 2 * lease_ttl)
        params = {"new_id": rng.random() < 0.3}
    elif kind == "replica-freeze":
        duration = lease_ttl + rng.uniform(0.5, 3.0)
        params = {}
    elif kind == "replica-pause":
        duration = rng.uniform(0.2, 0.3 * lease_ttl)
        params = {}
    elif kind in ("cut", "blackhole"):
        duration = rng.uniform(0.5, lease_ttl + 3.0)
        params = {"members": "all" if rng.random() < 0.75 else rng.randrange(3)}
    else:  # latency
        delay = rng.uniform(0.02, 0.5)
        duration = rng.uniform(2.0, 10.0)
        params = {"delay": round(delay, 3), "jitter": round(rng.uniform(0, delay / 2), 3)}
    if duration > room:
        return None
    return Fault(kind, t, duration, slot, params)


class Injector:
    """Runs every fault of the plan on its own thread against ``world``.

    ``world`` provides ``slots`` (replica slots with ``kill``, ``start``, ``signal``,
    ``terminate`` and ``proxies``), ``cluster`` (an EtcdCluster) and ``compact()``.
    """

    def __init__(self, world, faults: list[Fault], p: float, log_path: str,
                 stop: threading.Event):
        self._world = world
        self.faults = faults
        self._p = p
        self._stop = stop
        self._log_lock = threading.Lock()
        self._log = open(log_path, "a", buffering=1)
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(f,), name=f"chaos-fault-{i}",
                                          daemon=True) for i, f in enumerate(faults)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float) -> list[Fault]:
        """Wait for every fault to end; returns those still running."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [f for f, t in zip(self.faults, self._threads) if t.is_alive()]

    def close(self) -> None:
        self._log.close()

    def _write(self, fault: Fault, event: str) -> None:
        with self._log_lock:
            self._log.write(json.dumps({"event": event, "kind": fault.kind, "target": fault.target,
                                        "params": fault.params, "start": fault.start,
                                        "duration": fault.duration, "began": fault.began,
                                        "ended": fault.ended, "detail": fault.detail}) + "\n")

    def _wait_until(self, epoch: float) -> bool:
        """Wait until wall time ``epoch``; False if the run is stopping."""
        delay = epoch - time.time()
        return not (delay > 0 and self._stop.wait(delay))

    def _run(self, fault: Fault) -> None:
        if not self._wait_until(self._p + fault.start):
            return
        try:
            undo = self._strike(fault)
            self._write(fault, "began")
            self._wait_until(fault.began + fault.duration)  # undone even when stopping
            if undo is not None:
                undo()
        except Exception as exc:  # noqa: BLE001 - recorded; the run reports it
            self.errors.append(f"{fault.describe()}: {exc!r}")
            fault.detail += f" error: {exc!r}"
        fault.ended = time.time()
        if fault.began is None:
            fault.began = fault.ended
        self._write(fault, "ended")

    def _strike(self, fault: Fault):
        world = self._world
        kind = fault.kind
        if kind == "compact":
            fault.began = time.time()
            fault.detail = world.compact()
            return None
        if kind in MEMBER_KINDS:
            member = (world.cluster.leader() if kind == "leader-kill"
                      else world.cluster.members[fault.target])
            fault.detail = member.name
            fault.began = time.time()
            if kind == "member-freeze":
                member.pause()
                return member.resume
            member.kill()
            return lambda: member.start(timeout=60)
        slot = world.slots[fault.target]
        fault.detail = slot.replica_id
        if kind == "replica-join":
            fault.began = time.time()
            slot.start()
            return None
        if kind == "replica-leave":
            fault.began = time.time()
            if fault.params["how"] == "kill":
                slot.kill()
            else:
                slot.terminate()
            return None
        if kind == "replica-kill":
            fault.began = time.time()
            slot.kill()
            return lambda: slot.start(new_id=fault.params["new_id"])
        if kind in ("replica-freeze", "replica-pause"):
            fault.began = time.time()
            slot.signal(signal.SIGSTOP)
            return lambda: slot.signal(signal.SIGCONT)
        members = fault.params.get("members", "all")
        proxies = slot.proxies if members == "all" else slot.proxies[members]
        fault.began = time.time()
        if kind == "cut":
            proxies.cut()
        elif kind == "blackhole":
            proxies.blackhole()
        else:
            proxies.latency(fault.params["delay"], fault.params["jitter"])
        return proxies.heal
