"""A replica process for the multi-process tests: ``python -m tests.replica_proc ...``.

Appends one line per event to its own log file, flushed at once:
``<epoch seconds> fired <job>`` for every trigger and ``<epoch seconds> leaders <n>`` after every
election. Stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time

from etcdcron import Cron


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--lease-ttl", type=float, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--replica-id", default=None)
    args = parser.parse_args()

    lock = threading.Lock()
    log = open(args.log, "a", buffering=1)

    def write(line: str) -> None:
        with lock:
            log.write(f"{time.time():.6f} {line}\n")
            log.flush()

    cron = Cron(endpoints=args.endpoint, namespace=args.namespace, lease_ttl=args.lease_ttl,
                workers=args.workers, replica_id=args.replica_id,
                trigger=lambda req: write(f"fired {req.name}"),
                on_leadership=lambda replicas: write(f"leaders {len(replicas)}"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    cron.start()
    write("started")
    stopping.wait()
    cron.stop(timeout=20)
    write("stopped")


if __name__ == "__main__":
    main()
