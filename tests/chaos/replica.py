"""One replica process of a chaos run: ``python -m tests.chaos.replica ...``.

It runs one :class:`~etcdcron.Cron` on the endpoints it is given (the proxies of its slot) and
appends one line per event to its own log, each line written whole with one ``os.write`` on an
``O_APPEND`` file, so a SIGKILL leaves at most a partial last line (readers skip it)::

    <wall time> started <replica id> <pid>
    <wall time> fire <job name> <version> <S|F>     one per trigger call
    <wall time> elected <number of replicas>        after every election (on_leadership)
    <wall time> health <problems, '|'-separated>    whenever Cron.health().problems changes
    <wall time> stopped <seconds stop() took>

The wall time of a ``fire`` line is taken when the trigger is entered, before anything else.
The job's payload (a ``StringValue``) names its version and its failure pattern: the trigger
returns FAILED for the n-th delivery of a version on this process when the pattern's
``(n - 1) % len``-th letter is ``F``. Results are logged, so the audit knows every delivery's
result without relying on the pattern.

SIGTERM stops the Cron cleanly (``stop()`` records the results in flight).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections import defaultdict

from google.protobuf import wrappers_pb2

import etcdcron.engine as engine_module
from etcdcron import Cron, TriggerResult


class EventLog:
    """Whole lines appended to one file, each with a single ``os.write``."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, *fields: object, at: float | None = None) -> None:
        stamp = time.time() if at is None else at
        line = " ".join([f"{stamp:.6f}", *(str(f) for f in fields)]) + "\n"
        os.write(self._fd, line.encode())


def parse_payload(text: str) -> tuple[str, str]:
    """``(version, failure pattern)`` of a payload ``"<version>|<pattern>"``."""
    version, _, pattern = text.partition("|")
    return version, pattern or "S"


class ChaosTrigger:
    """The trigger: log the delivery with its result, fail as the job's pattern says."""

    def __init__(self, log: EventLog):
        self._log = log
        # Guards _deliveries: version -> deliveries of it on this process so far.
        self._lock = threading.Lock()
        self._deliveries: dict[str, int] = defaultdict(int)

    def __call__(self, request) -> TriggerResult:
        entered = time.time()
        value = wrappers_pb2.StringValue()
        request.payload.Unpack(value)
        version, pattern = parse_payload(value.value)
        with self._lock:
            self._deliveries[version] += 1
            n = self._deliveries[version]
        failed = pattern[(n - 1) % len(pattern)] == "F"
        # When the engine last proved this replica's view current before this delivery (its
        # read barrier): a change acknowledged before that must never fire.
        fresh = getattr(engine_module._delivery, "fresh_as_of", entered)
        self._log.write("fire", request.name, version, "F" if failed else "S", f"{fresh:.6f}",
                        at=entered)
        return TriggerResult.FAILED if failed else TriggerResult.SUCCESS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", required=True, help="comma-separated")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--replica-id", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--lease-ttl", type=float, required=True)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(levelname)s "
                               "%(name)s: %(message)s", datefmt="%H:%M:%S")
    log = EventLog(args.log)
    cron = Cron(endpoints=args.endpoints.split(","), namespace=args.namespace,
                replica_id=args.replica_id, lease_ttl=args.lease_ttl, workers=args.workers,
                trigger=ChaosTrigger(log),
                on_leadership=lambda replicas: log.write("elected", len(replicas)))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    log.write("started", args.replica_id, os.getpid())
    cron.start()
    problems: list[str] = []
    while not stopping.wait(0.5):
        now = cron.health().problems
        if now != problems:
            problems = now
            log.write("health", "|".join(p.replace("\n", " ") for p in problems) or "ok")
    began = time.monotonic()
    cron.stop(timeout=30)
    log.write("stopped", f"{time.monotonic() - began:.3f}")


if __name__ == "__main__":
    main()
