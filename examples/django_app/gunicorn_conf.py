"""gunicorn settings: close each worker's Redis connections when it exits.

Django has no shutdown signal of its own; gunicorn's ``worker_exit`` hook runs in the
worker, after its last request. (Without it the operating system closes the sockets
at exit anyway; closing them is tidier for Redis, which sees a clean QUIT.)
"""

from __future__ import annotations

wsgi_app = "django_app.wsgi:application"


def worker_exit(server: object, worker: object) -> None:  # noqa: ARG001 - gunicorn's signature
    """Close the worker's sync backend, if its views made one."""
    from django_app.backends import close_sync_backend  # noqa: PLC0415 - in the worker

    close_sync_backend()
