"""Helpers for tests of the serving layer: the app under the real runner options, metric samples."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from proxy.app import create_app
from proxy.server import runner_kwargs


async def start_proxy(aiohttp_server, aiohttp_client, settings: Settings, **client_kwargs: Any):  # type: ignore[no-untyped-def]
    """The app behind the same runner options ``regcache serve`` uses (access log, limits)."""
    options = runner_kwargs(settings)
    options.pop("handler_cancellation")  # the test server sets it itself
    server = await aiohttp_server(create_app(settings), **options)
    return await aiohttp_client(server, **client_kwargs)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition; 0 when absent."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    return total if found else 0.0
