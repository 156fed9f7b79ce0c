"""A minimal Django project whose views are stampede-safe (docs/frameworks.md#django).

    cd examples
    WEATHER_API_URL=http://127.0.0.1:8001 \
        gunicorn --workers 2 --threads 8 -c django_app/gunicorn_conf.py django_app.wsgi
    STAMPEDE_GUARD_REDIS_URL=redis://127.0.0.1:6379/0 WEATHER_API_URL=... \
        uvicorn --workers 2 --lifespan on django_app.asgi:application

``/weather/<city>`` is a sync view (WSGI, gunicorn), ``/async/weather/<city>`` an async
one (ASGI, uvicorn); both call a slow upstream at most once per city and TTL, across
every worker process that shares the Redis. No database, no installed apps.
"""
