"""Settings of the etcdcron Django example: a minimal project with one app, ``jobs``."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "jobs.apps.JobsConfig",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB", str(BASE_DIR / "db.sqlite3")),
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# What jobs.scheduler passes to etcdcron.Cron.
ETCDCRON = {
    "endpoints": os.environ.get("ETCDCRON_ENDPOINTS", "127.0.0.1:2379"),
    "namespace": os.environ.get("ETCDCRON_NAMESPACE", "django-example"),
    "lease_ttl": float(os.environ.get("ETCDCRON_LEASE_TTL", "20")),
}
# Where the example trigger appends the name of every job it fires (None: only log it).
FIRED_LOG = os.environ.get("FIRED_LOG")
