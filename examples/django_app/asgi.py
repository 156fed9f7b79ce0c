"""The ASGI application, for uvicorn: ``uvicorn --lifespan on django_app.asgi:application``.

Django's ASGI handler does not speak the lifespan protocol, so it has no shutdown
step: with uvicorn's default ``--lifespan auto``, uvicorn notes that lifespan is
unsupported and goes on without one. This module puts a small lifespan handler in
front of Django that closes the async backend at shutdown, in the event loop its
connections belong to; ``--lifespan on`` makes uvicorn require it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.settings")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

django_application = get_asgi_application()


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """Serve HTTP with Django; on lifespan shutdown, close the async backend."""
    if scope["type"] != "lifespan":
        await django_application(scope, receive, send)
        return
    from django_app.backends import aclose_async_backend  # noqa: PLC0415 - after setup

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await aclose_async_backend()
            await send({"type": "lifespan.shutdown.complete"})
            return
