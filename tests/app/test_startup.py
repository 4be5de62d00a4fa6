"""A start that fails at any step gives back everything the steps before it took.

Each case makes one step of ``proxy.resources`` fail, runs ``proxy.server.serve``
as the process does, and then looks from the outside: the store lock can be taken
exclusively (as ``regcache fsck`` would), SQLite has no connection left (the last
connection to close removes the WAL file), every upstream session is closed and no
task started on the way is still running.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from config.settings import Settings, UpstreamSettings
from proxy import resources
from proxy.server import serve
from proxy.upstream.client import UpstreamClient
from storage import paths
from storage.blobs import BlobStore
from storage.index.metadata import Metadata
from storage.lifecycle.fsck import StoreLock
from storage.lifecycle.service import Lifecycle


class Boom(RuntimeError):
    """The injected failure."""


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected startup failure")


async def _raise_async(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected startup failure")


def _second_call_raises(original: Callable[..., Any]) -> Callable[..., Any]:
    calls = 0

    async def start(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Boom("injected startup failure")
        return await original(*args, **kwargs)

    return start


# step -> (what to patch, attribute, the failing replacement made from the original)
STEPS: dict[str, tuple[Any, str, Callable[[Any], Callable[..., Any]]]] = {
    "store lock": (StoreLock, "acquire", lambda _: _raise),
    "blob store": (BlobStore, "start", lambda _: _raise_async),
    "metadata": (Metadata, "open", lambda _: _raise_async),
    # The first upstream client has started when the second fails.
    "upstream clients": (UpstreamClient, "start", _second_call_raises),
    "pull service": (resources, "PullThrough", lambda _: _raise),
    "recovery": (resources, "recover", lambda _: _raise_async),
    "lifecycle": (Lifecycle, "start", lambda _: _raise_async),
    # The access statistics flush is already running when the store gauges fail to start.
    "background tasks": (resources, "refresh_store_totals", lambda _: _raise),
}
AFTER_METADATA = {"upstream clients", "pull service", "recovery", "lifecycle", "background tasks", "listening"}
AFTER_UPSTREAMS = AFTER_METADATA - {"upstream clients"}


def _settings(data_dir: Path, port: int = 0) -> Settings:
    return Settings(
        data_dir=data_dir,
        listen=f"127.0.0.1:{port}",
        upstreams=[
            UpstreamSettings(name="first.test", url="http://127.0.0.1:9", default=True),
            UpstreamSettings(name="second.test", url="http://127.0.0.1:9"),
        ],
    )


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[aiohttp.ClientSession]]:
    """Every aiohttp session the upstream clients open."""
    opened: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def recording(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        session = real(*args, **kwargs)
        opened.append(session)
        return session

    monkeypatch.setattr(aiohttp, "ClientSession", recording)
    yield opened


def _assert_all_given_back(data: Path, step: str, sessions: list[aiohttp.ClientSession],
                           tasks_before: set[asyncio.Task[Any]]) -> None:
    lock = StoreLock(data)
    lock.acquire(exclusive=True)  # raises StoreBusy if the failed server still holds it
    lock.release()
    database = paths.metadata_path(data)
    if step in AFTER_METADATA:
        assert database.exists(), "the metadata step ran"
        assert not Path(f"{database}-wal").exists(), "a SQLite connection is still open"
    if step in AFTER_UPSTREAMS:
        assert len(sessions) == 2
    assert all(session.closed for session in sessions), "an upstream session is still open"
    left = {t for t in asyncio.all_tasks() if not t.done()} - tasks_before - {asyncio.current_task()}
    assert not left, f"tasks still running: {left}"


@pytest.mark.parametrize("step", list(STEPS))
async def test_a_failed_startup_step_releases_every_resource_taken_before_it(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sessions: list[aiohttp.ClientSession]
) -> None:
    target, attribute, make_failing = STEPS[step]
    monkeypatch.setattr(target, attribute, make_failing(getattr(target, attribute)))
    data = tmp_path / "data"
    tasks_before = asyncio.all_tasks()
    with pytest.raises(Boom):
        await serve(_settings(data))
    monkeypatch.undo()  # the real StoreLock.acquire for the check
    _assert_all_given_back(data, step, sessions, tasks_before)


async def test_a_port_already_in_use_releases_every_resource(
    tmp_path: Path, sessions: list[aiohttp.ClientSession]
) -> None:
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        tasks_before = asyncio.all_tasks()
        with pytest.raises(OSError):
            await serve(_settings(data, port=taken.getsockname()[1]))
    _assert_all_given_back(data, "listening", sessions, tasks_before)
