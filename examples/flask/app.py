"""A Flask app whose every worker process runs one etcdcron replica.

Run it with gunicorn (4 workers; ``--preload`` is safe, see ``gunicorn.conf.py``)::

    export ETCDCRON_ENDPOINTS=127.0.0.1:2379 ETCDCRON_NAMESPACE=myapp
    gunicorn -c gunicorn.conf.py -w 4 --preload 'app:create_app()'

    curl -X POST localhost:8000/jobs/report-1 -H 'content-type: application/json' \\
         -d '{"schedule": "@every 10s", "repeats": 3}'
    curl localhost:8000/jobs/report-1        # its status: count, last and next trigger, owner

Every job fires once, on one of the workers. The trigger here logs, and appends the job name to
``$FIRED_LOG_DIR/worker-<pid>.log`` when that is set (the tests count those lines).
"""

from __future__ import annotations

import logging
import os
import threading

from flask import Flask, abort, jsonify, request

from etcdcron import Cron, Job, TriggerResult, ValidationError


class Scheduler:
    """One :class:`~etcdcron.Cron` per process, created on first use in that process.

    Nothing is created when the app is built, so building it in gunicorn's master (with
    ``--preload``) opens no gRPC connection there: those do not survive ``fork()``. Each worker
    starts its own from gunicorn's ``post_fork`` hook, and stops it in ``worker_exit``.
    """

    def __init__(self, trigger, **options):
        self._trigger = trigger
        self._options = options
        # Guards _cron and _pid: the first request and the post_fork hook may race.
        self._lock = threading.Lock()
        self._cron: Cron | None = None
        self._pid: int | None = None

    @property
    def cron(self) -> Cron:
        with self._lock:
            if self._cron is None or self._pid != os.getpid():
                self._cron = Cron(trigger=self._trigger, **self._options)
                self._pid = os.getpid()
            return self._cron

    def start(self) -> None:
        self.cron.start()

    def stop(self) -> None:
        with self._lock:
            cron = self._cron if self._pid == os.getpid() else None
        if cron is not None:
            cron.stop()


def make_trigger(log_dir: str | None, logger: logging.Logger):
    lock = threading.Lock()  # guards the log file of this process: workers fire in parallel

    def trigger(req) -> TriggerResult:
        logger.info("fired %s", req.name)
        if log_dir:
            with lock, open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), "a") as log:
                log.write(req.name + "\n")
        return TriggerResult.SUCCESS

    return trigger


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        ETCDCRON_ENDPOINTS=os.environ.get("ETCDCRON_ENDPOINTS", "127.0.0.1:2379"),
        ETCDCRON_NAMESPACE=os.environ.get("ETCDCRON_NAMESPACE", "flask-example"),
        ETCDCRON_LEASE_TTL=float(os.environ.get("ETCDCRON_LEASE_TTL", "20")),
        FIRED_LOG_DIR=os.environ.get("FIRED_LOG_DIR"),
    )
    app.config.update(config or {})
    scheduler = Scheduler(make_trigger(app.config["FIRED_LOG_DIR"], app.logger),
                          endpoints=app.config["ETCDCRON_ENDPOINTS"],
                          namespace=app.config["ETCDCRON_NAMESPACE"],
                          lease_ttl=app.config["ETCDCRON_LEASE_TTL"])
    app.extensions["etcdcron"] = scheduler

    @app.post("/jobs/<name>")
    def add_job(name):
        fields = request.get_json(silent=True) or {}
        try:
            scheduler.cron.add(name, Job(**fields))
        except (ValidationError, TypeError, ValueError) as exc:
            return jsonify(error=str(exc)), 400
        return jsonify(added=name), 201

    @app.get("/jobs/<name>")
    def job_status(name):
        status = scheduler.cron.status(name)
        if status is None:
            abort(404)
        return jsonify(name=status.name, count=status.count, owner=status.owner,
                       last_trigger=status.last_trigger and status.last_trigger.isoformat(),
                       next_trigger=status.next_trigger and status.next_trigger.isoformat())

    @app.delete("/jobs/<name>")
    def delete_job(name):
        scheduler.cron.delete(name)
        return "", 204

    @app.get("/healthz")
    def health():
        cron = scheduler.cron
        return jsonify(pid=os.getpid(), replica=cron.replica_id, elected=cron.is_elected())

    return app
