"""One etcdcron replica per Django process, started by ``JobsConfig.ready()`` when the process
serves requests (and never in management commands such as ``migrate``).

When does a process start it? ``$ETCDCRON_AUTOSTART`` decides: ``always``, ``never``, or
``auto`` (the default): when ``mysite/wsgi.py`` loaded Django (gunicorn, uwsgi, mod_wsgi), or
in the serving process of ``manage.py runserver`` (not its autoreloader parent).

With ``gunicorn --preload`` the WSGI module is imported in the master before it forks: set
``ETCDCRON_AUTOSTART=never`` there and call :func:`start` from a ``post_fork`` hook, as the
Flask example does. With uwsgi, use ``lazy-apps = true`` (each worker loads the app after the
fork) and ``enable-threads = true``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

from etcdcron import Cron, TriggerResult

log = logging.getLogger(__name__)

#: Set by mysite/wsgi.py before Django is set up.
serving = False

# Guards _cron: one per process.
_lock = threading.Lock()
_cron: Cron | None = None


def should_start(argv: list[str] | None = None) -> bool:
    mode = os.environ.get("ETCDCRON_AUTOSTART", "auto")
    if mode in ("always", "never"):
        return mode == "always"
    if serving:
        return True
    argv = sys.argv if argv is None else argv
    runserver = len(argv) > 1 and argv[1] == "runserver"
    return runserver and (os.environ.get("RUN_MAIN") == "true" or "--noreload" in argv)


def trigger(req) -> TriggerResult:
    from django.conf import settings

    log.info("fired %s", req.name)
    if settings.FIRED_LOG:
        with _lock, open(settings.FIRED_LOG, "a") as fired:
            fired.write(req.name + "\n")
    return TriggerResult.SUCCESS


def cron() -> Cron:
    """This process's Cron (created, not started, on first use: views may add jobs anyway)."""
    global _cron
    from django.conf import settings

    with _lock:
        if _cron is None:
            _cron = Cron(trigger=trigger, **settings.ETCDCRON)
        return _cron


def start() -> None:
    instance = cron()
    instance.start()
    atexit.register(instance.stop)
    print(f"etcdcron: replica {instance.replica_id} started (pid {os.getpid()})",
          file=sys.stderr, flush=True)


def stop() -> None:
    global _cron
    with _lock:
        instance, _cron = _cron, None
    if instance is not None:
        instance.stop()
