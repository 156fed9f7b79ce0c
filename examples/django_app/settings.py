"""Settings, all from the environment; nothing here needs a database.

``STAMPEDE_GUARD_REDIS_URL`` unset means in memory: each worker process then has its own
cache, and a stampede costs one upstream call per process, not one in all.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "django_app.urls"
INSTALLED_APPS: list[str] = []  # none: no models, no migrations
DATABASES: dict[str, object] = {}
MIDDLEWARE: list[str] = []
USE_TZ = True
WSGI_APPLICATION = "django_app.wsgi.application"
ASGI_APPLICATION = "django_app.asgi.application"

# Read by django_app.backends, which makes each backend once, at its first use.
STAMPEDE_GUARD_REDIS_URL = os.environ.get("STAMPEDE_GUARD_REDIS_URL") or None
STAMPEDE_GUARD_PREFIX = os.environ.get("STAMPEDE_GUARD_PREFIX", "django-example")
# The slow upstream the views protect: GET {WEATHER_API_URL}/weather/<city> -> JSON.
WEATHER_API_URL = os.environ.get("WEATHER_API_URL", "http://127.0.0.1:8001")
