"""``python -m etcdcron``: the ``etcdcron`` command (see :mod:`etcdcron.cli`)."""

from etcdcron.cli import run

run()
