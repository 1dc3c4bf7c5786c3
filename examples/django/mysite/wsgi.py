"""WSGI entry point (gunicorn, uwsgi, mod_wsgi): the one place that says "this process serves".

It marks the process as a server before Django sets up its apps, so ``JobsConfig.ready()``
starts the scheduler here and not in ``manage.py migrate`` or any other management command.
"""

import os

from django.core.wsgi import get_wsgi_application

from jobs import scheduler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
scheduler.serving = True
application = get_wsgi_application()
