"""Fixtures of the in-process tests; the shared ones are in tests/conftest.py."""

from __future__ import annotations

from typing import Any

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app


@pytest.fixture
async def proxy(fake: Any, aiohttp_client: Any, tmp_path: Any) -> Any:
    """regcache in this process in front of the fake upstream, settings at their defaults
    (one retry); a module that needs other settings defines its own ``proxy``."""
    settings = Settings(
        data_dir=tmp_path / "data",
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=1)],
    )
    return await aiohttp_client(create_app(settings))
