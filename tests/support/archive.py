"""An in-process regcache with the admin archive routes, for the save/load tests."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
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


def plain_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of regular files with exactly these member names (archive metadata)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    """An upload body as the archive loader reads it, in one piece."""
    yield data
