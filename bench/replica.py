"""One replica process of the benchmark suite: ``python bench/replica.py MODE ...``.

Started by ``bench/run.py``, which talks to it over its stdin and stdout, a JSON object a line:

1. it builds its :class:`~etcdcron.Cron` (the channel opened by one ``list()``), then prints
   ``{"event": "ready", "rss_kib": ...}``;
2. it waits for the line ``go`` on stdin, then calls ``start()`` (``go_at`` is that instant);
3. it reports as its mode says (below), and on the line ``stop`` (or the end of stdin) it stops
   the Cron and prints ``{"event": "stopped", ...}`` with its CPU seconds since ``go``.

Modes (what the trigger does):

``count``
    counts the calls; a reporter thread prints ``{"count": n, "last": wall time}`` every 10 ms
    while the count changes (a burst: the parent adds the counts of all its replicas).
``steady``
    jobs ``j<i>`` ``@every 1s`` whose first tick is ``--first`` (aligned) or
    ``--first + i / n`` (``--spread``), so tick ``k`` of job ``i`` is due at that plus ``k`` s.
    The trigger's lateness is its call time minus that tick; the ticks inside the window
    ``[--window-start, --window-end)`` are kept, in an ``array('d')`` written to ``--out`` on
    stop, with each job's count of them (all fired: every job has ``window`` calls).
``ready``
    jobs are loaded but not due, except ``--last``, past due and the last name in key order:
    its trigger call means the replica has loaded everything. Prints ``{"event": "fired_last",
    "after": seconds since go}``, then, after a second to settle, the RSS growth.
``log``
    appends ``<wall time> <job name>`` for every call to ``--out`` (failover).

The trigger does as little as it can: it runs on etcdcron's worker threads, and its cost is in
every number the parent reports.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import resource
import sys
import threading
import time

try:
    import etcdcron  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etcdcron import Cron


def say(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Count:
    """Counts trigger calls; ``report`` prints the count while it changes."""

    def __init__(self):
        # Guards n and last (+= on an int is not atomic across threads).
        self._lock = threading.Lock()
        self.n = 0
        self.last = 0.0

    def trigger(self, request) -> None:
        now = time.time()
        with self._lock:
            self.n += 1
            self.last = now

    def report(self, stopping: threading.Event) -> None:
        shown = -1
        while not stopping.wait(0.01):
            with self._lock:
                n, last = self.n, self.last
            if n != shown:
                say(count=n, last=last)
                shown = n


class Steady:
    """Lateness of each call of jobs ``j0 .. j<n-1>`` ``@every 1s`` (see the module docstring)."""

    def __init__(self, n: int, first: float, spread: bool, window: tuple[float, float]):
        self._due = [first + (i / n if spread else 0.0) for i in range(n)]
        self._calls = [0] * n               # per job: calls so far (k of the next one)
        self.in_window = [0] * n            # per job: calls whose tick is in the window
        self.lateness = array.array("d")
        self._start, self._end = window
        self.window_cpu = float("nan")
        self.calls_in_window = 0            # calls made inside the window, whatever their tick
        # Guards _calls, in_window and lateness: a job's calls come one at a time, but a list
        # element's += is not atomic against another job's on another worker.
        self._lock = threading.Lock()

    def measure_cpu(self, stopping: threading.Event) -> None:
        """The process's CPU seconds inside the window, into ``window_cpu``."""
        if stopping.wait(max(0.0, self._start - time.time())):
            return
        began = cpu_seconds()
        if stopping.wait(max(0.0, self._end - time.time())):
            return
        self.window_cpu = cpu_seconds() - began

    def trigger(self, request) -> None:
        now = time.time()
        i = int(request.name[1:])
        with self._lock:
            if self._start <= now < self._end:
                self.calls_in_window += 1
            k = self._calls[i]
            self._calls[i] = k + 1
            tick = self._due[i] + k
            if self._start <= tick < self._end:
                self.in_window[i] += 1
                self.lateness.append(now - tick)


class LastFired:
    """Notes when the job ``name`` fires."""

    def __init__(self, name: str):
        self._name = name
        self.fired = threading.Event()
        self.at = 0.0

    def trigger(self, request) -> None:
        if request.name == self._name and not self.fired.is_set():
            self.at = time.time()
            self.fired.set()


class Log:
    """Appends ``<wall time> <name>`` per call, each line one ``os.write`` (SIGKILL-safe)."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def trigger(self, request) -> None:
        os.write(self._fd, f"{time.time():.6f} {request.name}\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["count", "steady", "ready", "log"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--lease-ttl", type=float, default=20)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--first", type=float, default=0.0)
    parser.add_argument("--spread", action="store_true")
    parser.add_argument("--window-start", type=float, default=0.0)
    parser.add_argument("--window-end", type=float, default=0.0)
    parser.add_argument("--last", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    if args.mode == "count":
        behaviour = Count()
    elif args.mode == "steady":
        behaviour = Steady(args.n, args.first, args.spread, (args.window_start, args.window_end))
    elif args.mode == "ready":
        behaviour = LastFired(args.last)
    else:
        behaviour = Log(args.out)
    cron = Cron(endpoints=args.endpoint, namespace=args.namespace, trigger=behaviour.trigger,
                lease_ttl=args.lease_ttl, workers=args.workers)
    cron.list(prefix="warm-up")            # open the channel before the baseline
    gc.collect()
    before = rss_kib()
    say(event="ready", rss_kib=before, pid=os.getpid())
    if sys.stdin.readline().strip() != "go":
        cron.stop()
        return
    stopping = threading.Event()
    reporter = None
    go_at, cpu_at_go = time.time(), cpu_seconds()
    try:
        cron.start()
        if isinstance(behaviour, Count):
            reporter = threading.Thread(target=behaviour.report, args=(stopping,),
                                        name="bench-reporter", daemon=True)
            reporter.start()
        if isinstance(behaviour, Steady):
            threading.Thread(target=behaviour.measure_cpu, args=(stopping,),
                             name="bench-cpu", daemon=True).start()
        if isinstance(behaviour, LastFired):
            threading.Thread(target=report_ready, args=(behaviour, go_at, before),
                             name="bench-ready", daemon=True).start()
        elected = cron.wait_elected(120)
        say(event="elected" if elected else "not-elected", after=time.time() - go_at)
        while sys.stdin.readline().strip() not in ("stop", ""):
            pass
        cpu = cpu_seconds() - cpu_at_go
        wall = time.time() - go_at
    finally:
        stopping.set()
        if reporter is not None:
            reporter.join()
        began = time.monotonic()
        cron.stop(timeout=30)
    result = dict(event="stopped", cpu=cpu, wall=wall, stop_took=time.monotonic() - began)
    if isinstance(behaviour, Count):
        result.update(count=behaviour.n, last=behaviour.last)
    if isinstance(behaviour, Steady):
        with open(args.out, "wb") as out:
            behaviour.lateness.tofile(out)
        result.update(samples=len(behaviour.lateness), window_cpu=behaviour.window_cpu,
                      calls_in_window=behaviour.calls_in_window,
                      short=sum(1 for c in behaviour.in_window if c < c_expected(args)),
                      over=sum(1 for c in behaviour.in_window if c > c_expected(args)))
    say(**result)


def c_expected(args) -> int:
    """Ticks of each job inside the window (whole seconds, the window starting on a tick)."""
    return round(args.window_end - args.window_start)


def report_ready(behaviour: LastFired, go_at: float, before: int) -> None:
    behaviour.fired.wait()
    say(event="fired_last", after=behaviour.at - go_at)
    time.sleep(1.0)                        # let the load's garbage go and the threads settle
    gc.collect()
    say(event="rss", before_kib=before, after_kib=rss_kib())


if __name__ == "__main__":
    main()
