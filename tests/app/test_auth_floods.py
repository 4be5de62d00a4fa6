"""Pull auth under attack: password sprays and user enumeration.

A flood of wrong passwords must not take the threads other requests need, must
not queue without bound, and must stop costing bcrypt work after a few failures
per address; and a wrong password must cost the same whether the user exists.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest
from aiohttp import web

from config.settings import AuthSettings, Settings
from proxy.access.clientcheck import ClientCheck
from proxy.access.gate import ACCESS, Access, access_middleware
from proxy.access.policy import Policy
from proxy.errors import LoginThrottled
from proxy.http.accesslog import request_context
from proxy.http.clientauth import AUTH, ClientAuth
from proxy.http.errors import error_middleware
from proxy.http.loginguard import THREAD_PREFIX
from proxy.pull.routing import Router
from tests.support.registry import bcrypt_hash

ADDRESS = "192.0.2.7"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def htpasswd(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{bcrypt_hash('s3cret', cost=5)}\nbob:{bcrypt_hash('hunter2', cost=6)}\n")
    return path


@pytest.fixture
def checkpw_calls(monkeypatch):  # type: ignore[no-untyped-def]
    """Every bcrypt check: (thread name, hash); the real check still runs."""
    import bcrypt

    calls: list[tuple[str, bytes]] = []
    real = bcrypt.checkpw

    def recording(password: bytes, hashed: bytes) -> bool:
        calls.append((threading.current_thread().name, hashed))
        return real(password, hashed)

    monkeypatch.setattr("proxy.http.clientauth.bcrypt.checkpw", recording)
    return calls


async def test_password_checks_run_on_their_own_pool_not_the_default_one(htpasswd, checkpw_calls):
    auth = ClientAuth(AuthSettings(htpasswd=htpasswd))
    try:
        assert not await auth.identify(basic("alice", "wrong"), ADDRESS)
        assert await auth.identify(basic("alice", "s3cret"), ADDRESS)
    finally:
        auth.close()
    assert [name.startswith(THREAD_PREFIX) for name, _ in checkpw_calls] == [True, True]


async def test_unknown_user_costs_the_same_bcrypt_work_as_the_costliest_known_one(htpasswd, checkpw_calls):
    auth = ClientAuth(AuthSettings(htpasswd=htpasswd))
    try:
        assert not await auth.identify(basic("mallory", "anything"), ADDRESS)
        assert not await auth.identify(basic("bob", "wrong"), ADDRESS)
    finally:
        auth.close()
    (_, unknown_hash), (_, bob_hash) = checkpw_calls
    assert unknown_hash[:7] == bob_hash[:7] == b"$2b$06$"


async def test_failed_logins_from_one_address_are_refused_without_hashing_until_the_window_passes(
    htpasswd, checkpw_calls
):
    clock = FakeClock()
    auth = ClientAuth(AuthSettings(htpasswd=htpasswd, max_failures=3, failure_window=60), clock=clock)
    try:
        assert await auth.identify(basic("alice", "s3cret"), ADDRESS)
        for _ in range(3):
            assert not await auth.identify(basic("alice", "wrong"), ADDRESS)
        assert len(checkpw_calls) == 4
        with pytest.raises(LoginThrottled) as refused:
            await auth.identify(basic("bob", "hunter2"), ADDRESS)
        assert refused.value.retry_after == 60
        assert len(checkpw_calls) == 4  # refused without hashing
        # Remembered credentials need no check, so the address's legitimate user keeps pulling.
        assert await auth.identify(basic("alice", "s3cret"), ADDRESS)
        assert not await auth.identify(basic("alice", "wrong"), "192.0.2.8")  # other addresses are checked
        clock.now += 60
        assert await auth.identify(basic("bob", "hunter2"), ADDRESS)
        assert len(checkpw_calls) == 6
    finally:
        auth.close()


def _app(htpasswd, **settings) -> web.Application:  # type: ignore[no-untyped-def]
    """The error and access middlewares as the server stacks them, in front of one protected route."""
    full = Settings(auth=AuthSettings(htpasswd=htpasswd, **settings))
    assert full.auth is not None
    auth = ClientAuth(full.auth)
    access = Access(Router(full.upstreams, full.default_upstream), Policy(full), auth, ClientCheck())

    async def protected(request: web.Request) -> web.Response:
        return web.Response(text="in")

    app = web.Application(middlewares=[request_context, error_middleware, access_middleware(access)])
    app[AUTH] = auth
    app[ACCESS] = access
    app.router.add_get("/v2/", protected)
    app.on_cleanup.append(lambda _: asyncio.to_thread(auth.close))
    return app


async def test_throttled_login_is_429_toomanyrequests_with_retry_after(aiohttp_client, htpasswd):
    client = await aiohttp_client(_app(htpasswd, max_failures=1, failure_window=30))
    assert (await client.get("/v2/", headers={"Authorization": basic("alice", "wrong")})).status == 401
    r = await client.get("/v2/", headers={"Authorization": basic("alice", "s3cret")})
    assert r.status == 429
    assert r.headers["Retry-After"] == "30"
    assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"


async def test_requests_complete_while_the_hashing_pool_is_saturated_and_the_overflow_is_refused_at_once(
    aiohttp_client, tmp_path, htpasswd, monkeypatch
):
    client = await aiohttp_client(_app(htpasswd, hash_threads=1, hash_queue=1, max_failures=100))
    good = {"Authorization": basic("alice", "s3cret")}
    assert (await client.get("/v2/", headers=good)).status == 200  # remembered from now on

    entered, release = threading.Event(), threading.Event()
    checks: list[bytes] = []

    def stuck(password: bytes, hashed: bytes) -> bool:
        checks.append(hashed)
        entered.set()
        release.wait(30)
        return False

    monkeypatch.setattr("proxy.http.clientauth.bcrypt.checkpw", stuck)
    spray = [
        asyncio.create_task(client.get("/v2/", headers={"Authorization": basic("alice", f"guess{i}")}))
        for i in range(2)
    ]
    try:
        # One check is hashing, one waits in the line: the pool and its line are full.
        assert await asyncio.to_thread(entered.wait, 30)
        while client.app[AUTH].hashing.pending < 2:
            await asyncio.sleep(0.01)
        # The default pool is free for file work, and a known client is served.
        assert await asyncio.to_thread(lambda: "default pool is free") == "default pool is free"
        assert (await client.get("/v2/", headers=good)).status == 200
        # A third unknown check finds the line full: refused at once, nothing hashed for it.
        overflow = await client.get("/v2/", headers={"Authorization": basic("bob", "guess")})
        assert overflow.status == 429
        assert (await overflow.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    finally:
        release.set()
    assert [r.status for r in await asyncio.gather(*spray)] == [401, 401]
    assert len(checks) == 2
