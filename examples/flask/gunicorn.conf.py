"""gunicorn settings for the Flask example: one etcdcron replica per worker.

``post_fork`` runs in each worker right after it is forked, with or without ``--preload``: the
Cron (and its gRPC connection) is created there, never in the master. With ``--preload`` the app
was built in the master, and ``worker.app.wsgi()`` returns it; without, that call loads it.
``worker_exit`` stops the Cron, which records results in flight and releases the leadership key
at once, so the other workers take over without waiting for the lease to expire.
"""

bind = "127.0.0.1:8000"
workers = 4
# etcdcron's trigger threads run beside the request threads; a sync worker is fine.
worker_class = "sync"
# Give stop() time to record triggers in flight (Cron.stop waits up to 10 s by default).
graceful_timeout = 15


def _scheduler(worker):
    return worker.app.wsgi().extensions["etcdcron"]


def post_fork(server, worker):
    _scheduler(worker).start()
    server.log.info("worker %s: etcdcron started", worker.pid)


def worker_exit(server, worker):
    _scheduler(worker).stop()
    server.log.info("worker %s: etcdcron stopped", worker.pid)
