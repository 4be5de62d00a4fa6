"""An in-process regcache with the admin archive routes, for the save/load tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config.settings import Settings, UpstreamSettings
from proxy.admin.archive import add_archive_routes
from proxy.app import create_app

UPSTREAM = "upstream.test"


def settings_for(data_dir: Path, url: str) -> Settings:
    return Settings(data_dir=data_dir, upstreams=[UpstreamSettings(name=UPSTREAM, url=url, default=True, retries=0)])


async def proxy_for(aiohttp_client: Any, data_dir: Path, url: str) -> Any:
    app = create_app(settings_for(data_dir, url))
    add_archive_routes(app)
    return await aiohttp_client(app)
