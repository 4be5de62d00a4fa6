"""Shared fixtures. Add new fixtures in their own section below; keep each one small."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.regcache import RegcacheProcess
from tests.support.registry import Registry
from tests.support.seed import SeededImage, seed_upstream

# --------------------------------------------------------------------------- real upstream registry


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real distribution registry on loopback, shared by the whole session.

    Never stop it in a test (other tests use it) and call ``reset_requests()`` before counting:
    the log is shared too. Tests that take an upstream away use ``registry_factory``.
    """
    with Registry(tmp_path_factory.mktemp("upstream")) as registry:
        yield registry


@pytest.fixture(scope="session")
def seeded(upstream: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SeededImage]:
    """The standard images (see tests/support/seed.py) pushed into ``upstream``, by "repo:tag"."""
    return seed_upstream(upstream, tmp_path_factory.mktemp("seed"))


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
    """Start private registries (``Registry`` keyword arguments); all are stopped at teardown."""
    started: list[Registry] = []

    def make(**kwargs: Any) -> Registry:
        registry = Registry(tmp_path / f"registry-{len(started)}", **kwargs)
        started.append(registry)
        return registry.start()

    yield make
    for registry in reversed(started):
        registry.stop()


# --------------------------------------------------------------------------- regcache processes


@pytest.fixture
def regcache_factory(tmp_path: Path) -> Iterator[Callable[..., RegcacheProcess]]:
    """Start regcache servers: ``make(upstreams=[{name, url, default}], settings={...})``."""
    started: list[RegcacheProcess] = []

    def make(upstreams: list[dict[str, Any]], **kwargs: Any) -> RegcacheProcess:
        server = RegcacheProcess(tmp_path / f"regcache-{len(started)}", upstreams, **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in reversed(started):
        server.stop()


def upstream_entry(registry: Registry, name: str = "upstream.test", **extra: Any) -> dict[str, Any]:
    """A regcache upstream setting for a test registry (plain HTTP on loopback)."""
    return {"name": name, "url": registry.url, "default": True, **extra}


# --------------------------------------------------------------------------- object store (Ceph RGW)


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Ceph RADOS Gateway (mon + memstore OSD + radosgw) for the session (tests/support/ceph.py).

    Give each test its own bucket (``rgw.make_bucket()``); everything is killed at the end.
    """
    from tests.support.ceph import CephRGW

    with CephRGW(tmp_path_factory.mktemp("ceph")) as gateway:
        yield gateway


# --------------------------------------------------------------------------- fake upstream


@pytest.fixture
async def fake(aiohttp_server: Any) -> AsyncIterator[FakeUpstream]:
    """An in-process registry for faults a real one cannot produce (tests/support/fake_upstream.py)."""
    upstream = FakeUpstream()
    server = await aiohttp_server(upstream.app, host="127.0.0.1")
    upstream.base_url = str(server.make_url("")).rstrip("/")
    yield upstream
    upstream.release()  # handlers held back by a test end before the server closes
