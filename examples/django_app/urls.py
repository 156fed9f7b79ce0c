"""The project's routes."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from django_app import views

urlpatterns = [
    path("weather/<str:city>", views.weather),
    path("async/weather/<str:city>", views.aweather),
    path("healthz", views.healthz),
]
