"""The WSGI application, for gunicorn: ``gunicorn -c django_app/gunicorn_conf.py django_app.wsgi``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.settings")

application = get_wsgi_application()
