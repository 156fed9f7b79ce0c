"""Two views in front of one slow upstream: a sync one and an async one.

The decorated functions are made when Django first imports this module (at the first
request, once settings are loaded), each with the backend of its kind.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from urllib.parse import quote

from django.conf import settings  # type: ignore[import-untyped]
from django.http import HttpRequest, HttpResponse, JsonResponse  # type: ignore[import-untyped]

from django_app.backends import async_backend, sync_backend
from stampede_guard import cached_stampede_safe

Weather = dict[str, object]

# No proxy from the environment: the upstream is named by WEATHER_API_URL itself.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call_weather_api(city: str) -> Weather:
    """Ask the upstream for *city*'s weather: one slow, metered HTTP request."""
    url = f"{settings.WEATHER_API_URL}/weather/{quote(city)}"
    with _opener.open(url, timeout=10) as response:
        weather: Weather = json.load(response)
    return weather


@cached_stampede_safe(key="weather:{city}", ttl=300, backend=sync_backend())
def get_weather(city: str) -> Weather:
    """Return *city*'s weather; concurrent misses, in all processes, call the API once."""
    return call_weather_api(city)


@cached_stampede_safe(key="weather:{city}", ttl=300, backend=async_backend())
async def aget_weather(city: str) -> Weather:
    """The same for async views (the blocking request runs in a thread)."""
    return await asyncio.to_thread(call_weather_api, city)


def weather(request: HttpRequest, city: str) -> JsonResponse:  # noqa: ARG001 - Django's view signature
    """Serve ``GET /weather/<city>`` (sync: WSGI, or ASGI in a thread)."""
    return JsonResponse(get_weather(city))


async def aweather(request: HttpRequest, city: str) -> JsonResponse:  # noqa: ARG001 - Django's view signature
    """Serve ``GET /async/weather/<city>`` (async: for ASGI; see docs/frameworks.md)."""
    return JsonResponse(await aget_weather(city))


def healthz(request: HttpRequest) -> HttpResponse:  # noqa: ARG001 - Django's view signature
    """Answer 200 once the worker serves requests (touches neither cache nor upstream)."""
    return HttpResponse("ok", content_type="text/plain")
