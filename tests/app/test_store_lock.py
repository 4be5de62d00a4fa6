"""Startup recovery runs only for a process alone on its store."""

from __future__ import annotations

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app


def _settings(data_dir) -> Settings:
    return Settings(
        data_dir=data_dir,
        upstreams=[UpstreamSettings(name="up.test", url="http://127.0.0.1:9", default=True)],
    )


async def test_temp_files_go_at_startup_only_when_no_other_process_uses_the_store(aiohttp_client, tmp_path):
    data = tmp_path / "data"
    first = await aiohttp_client(create_app(_settings(data)))
    assert (await first.get("/healthz")).status == 200
    # A fill in progress of the first server.
    in_flight = data / "tmp" / "0123456789abcdef"
    in_flight.write_bytes(b"partial")
    second = await aiohttp_client(create_app(_settings(data)))
    assert (await second.get("/healthz")).status == 200
    assert in_flight.exists(), "a second server must not delete another's fill in progress"
    await first.close()
    await second.close()
    # Alone again: what a crash left behind is removed.
    third = await aiohttp_client(create_app(_settings(data)))
    assert (await third.get("/healthz")).status == 200
    assert not in_flight.exists()
