"""The lease's clocks: validity is measured on a clock that counts a suspend, cross-checked with
the wall clock (which moves across a checkpoint/restore), and a jump past the lease ends its
generation at once. A real suspend or restore cannot be done in CI: these tests jump the clocks
the keeper reads instead."""

from __future__ import annotations

import threading
import time

import pytest

from etcdcron.lease import LeaseClock, LeaseKeeper, boottime
from etcdcron.testing import wait_until
from tests.test_cluster import lone_elector  # noqa: F401 - a fixture


class JumpingClock(LeaseClock):
    """The real clocks, each with an offset a test can move forward (a suspend, a restore)."""

    def __init__(self):
        real = LeaseClock()
        self.offset = {"elapsed": 0.0, "wall": 0.0}
        super().__init__(elapsed=lambda: real.elapsed() + self.offset["elapsed"],
                         wall=lambda: real.wall() + self.offset["wall"])


@pytest.mark.unit
def test_lease_validity_is_measured_on_boottime_and_the_wall_clock():
    # CLOCK_MONOTONIC stops while Linux is suspended; CLOCK_BOOTTIME does not.
    clock = LeaseClock()
    assert clock.wall is time.time
    if hasattr(time, "CLOCK_BOOTTIME"):
        assert clock.elapsed is boottime
        assert abs(boottime() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
    else:
        assert clock.elapsed is time.monotonic


class JumpOnWait(threading.Event):
    """A stop event that moves a :class:`JumpingClock` forward when the lease thread next waits.

    The jump then falls between a keepalive's answer and the next send, as a suspend between
    two renewals does. (A jump made by the test thread at any moment could also fall between
    the keeper's validity check and its next send: etcd then renews the lease, legitimately,
    under a new generation, and the test could not tell which case it saw.)
    """

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.pending = {}

    def wait(self, timeout=None):
        if threading.current_thread().name == "etcdcron-lease" and self.pending:
            for which, seconds in self.pending.items():
                self.clock.offset[which] += seconds
            self.pending = {}
        return super().wait(timeout)


@pytest.mark.etcd
@pytest.mark.parametrize("which", ["elapsed", "wall"])
def test_a_clock_jump_past_the_lease_ends_its_generation_at_once(client, which):
    # "elapsed": a suspend (boottime moves on, the monotonic clock would not); "wall": a restore
    # from a checkpoint (only the wall clock moves on).
    clock = JumpingClock()
    stop = JumpOnWait(clock)
    keeper = LeaseKeeper(client, 5, stop, on_change=lambda: None, clock=clock)
    keeper.start()
    try:
        lease_id, generation = wait_until(keeper.current, 10, message="a lease")
        assert keeper.valid(generation)
        stop.pending = {which: 5}
        wait_until(lambda: not stop.pending, 10, message="the lease thread waiting")
        assert not keeper.valid(generation) and not keeper.valid()
        assert keeper.current() is None

        def next_lease():
            current = keeper.current()
            return current if current and current[1] != generation else None

        new_id, _ = wait_until(next_lease, 10, message="a new lease")
        assert new_id != lease_id  # the one that ran out was given up, not trusted again
        assert not keeper.valid(generation)
    finally:
        stop.set()
        keeper.stop()
        keeper.thread.join(10)


@pytest.mark.etcd
def test_a_replica_resumed_past_its_lease_is_not_elected_and_is_elected_again_later(
        lone_elector):
    clock = JumpingClock()
    lone = lone_elector("r1", clock=clock)
    lone.start()
    assert lone.elector.wait_elected(10)
    first = lone.elector.ownership
    clock.offset["elapsed"] += 60  # suspended for a minute
    assert not lone.elector.is_elected()
    wait_until(lambda: lone.elector.is_elected() and lone.elector.ownership.lease_generation
               != first.lease_generation, 15, message="a new session under a new lease")
