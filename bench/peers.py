"""APScheduler 3.11 firing the past-due one-shots of the burst row, in a process of its own:
``python bench/peers.py memory|sqlite N [SQLITE FILE]``; prints one JSON object.

A ``BackgroundScheduler`` (its default ``ThreadPoolExecutor`` of 10 threads) is started paused,
``N`` date-triggered jobs due a second ago are added (``misfire_grace_time=None``: late jobs
run, as etcdcron's past-due one-shots do), then it is resumed. Measured from ``resume()`` until
every job has run and its store is empty (a date job is removed once submitted), which is the
same end as etcdcron's burst: all fired and the store empty. With ``sqlite`` the store is a
``SQLAlchemyJobStore`` on a SQLite file on disk.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler

# Guards _fired: the executor's threads call fire() at once.
_lock = threading.Lock()
_fired = 0
_all_fired = threading.Event()
_expected = 0


def fire() -> None:
    global _fired
    with _lock:
        _fired += 1
        if _fired >= _expected:
            _all_fired.set()


def main() -> None:
    global _expected
    store_name, _expected = sys.argv[1], int(sys.argv[2])
    store = (MemoryJobStore() if store_name == "memory"
             else SQLAlchemyJobStore(url=f"sqlite:///{sys.argv[3]}"))
    scheduler = BackgroundScheduler(jobstores={"default": store}, timezone=timezone.utc,
                                    job_defaults={"misfire_grace_time": None,
                                                  "coalesce": False})
    scheduler.start(paused=True)
    try:
        due = datetime.now(timezone.utc) - timedelta(seconds=1)
        began = time.perf_counter()
        for i in range(_expected):
            scheduler.add_job(fire, "date", run_date=due, id=f"job-{i}")
        added = time.perf_counter() - began
        began = time.perf_counter()
        scheduler.resume()
        if not _all_fired.wait(600):
            raise SystemExit(f"only {_fired} of {_expected} jobs ran in 600 s")
        fired = time.perf_counter() - began
        while scheduler.get_jobs():
            time.sleep(0.005)
        emptied = time.perf_counter() - began
    finally:
        scheduler.shutdown(wait=True)
    print(json.dumps(dict(fired=fired, emptied=emptied, added=added, n=_expected)), flush=True)


if __name__ == "__main__":
    main()
