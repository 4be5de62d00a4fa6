"""Credentials never leak: not in logs, metrics, error bodies, headers or ``/admin/images``.

Every secret in play is configured or provoked at once: upstream basic credentials
that a token realm exchanges for a bearer token, a second upstream whose
credentials are wrong, the admin token, a client pull token. Then the requests
that could spill them (successes, upstream auth failures, wrong admin tokens,
listing images, scraping metrics) run with every logger at DEBUG.
"""

from __future__ import annotations

import base64
import logging

import pytest
from aiohttp import web

from config.settings import AdminSettings, AuthSettings, Settings, UpstreamSettings
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.serving import start_proxy

UPSTREAM_USER, UPSTREAM_PASSWORD = "mirror-user", "upstream-Pa55word-zz9"
WRONG_PASSWORD = "wrong-Pa55word-qq7"
ISSUED_TOKEN = "issued-bearer-token-4f1c9e"
ADMIN_TOKEN = "admin-secret-token-8d2a7b"
PULL_TOKEN = "client-pull-token-5e3f1a"
LAYER = b"secret test layer" * 64


def secrets() -> list[str]:
    values = [UPSTREAM_PASSWORD, WRONG_PASSWORD, ISSUED_TOKEN, ADMIN_TOKEN, PULL_TOKEN]
    for password in (UPSTREAM_PASSWORD, WRONG_PASSWORD):
        values.append(base64.b64encode(f"{UPSTREAM_USER}:{password}".encode()).decode())
    return values


async def _fake(aiohttp_server) -> FakeUpstream:  # type: ignore[no-untyped-def]
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    fake.token = ISSUED_TOKEN
    fake.basic = (UPSTREAM_USER, UPSTREAM_PASSWORD)
    fake.add_image("team/app", "1", [LAYER])
    return fake


async def test_no_secret_reaches_logs_metrics_bodies_or_images(aiohttp_server, aiohttp_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    good, bad = await _fake(aiohttp_server), await _fake(aiohttp_server)
    settings = Settings(
        listen="127.0.0.1:5000",
        data_dir=tmp_path / "d",
        upstreams=[
            UpstreamSettings(
                name="good.test",
                url=good.base_url,
                default=True,
                retries=0,
                username=UPSTREAM_USER,
                password=UPSTREAM_PASSWORD,
            ),
            UpstreamSettings(
                name="bad.test", url=bad.base_url, retries=0, username=UPSTREAM_USER, password=WRONG_PASSWORD
            ),
        ],
        admin=AdminSettings(token=ADMIN_TOKEN),
        auth=AuthSettings(tokens=[PULL_TOKEN]),
    )
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    pull = {"Authorization": f"Bearer {PULL_TOKEN}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    seen: list[str] = []

    async def call(method: str, path: str, headers: dict[str, str] | None = None, **kwargs) -> web.Response:  # type: ignore[no-untyped-def]
        r = await proxy.request(method, path, headers=headers, **kwargs)
        seen.append(await r.text(errors="replace"))
        seen.append("\n".join(f"{k}: {v}" for k, v in r.headers.items()))
        return r

    assert (await call("GET", "/v2/team/app/manifests/1", pull)).status == 200
    assert (await call("GET", f"/v2/team/app/blobs/{digest_of(LAYER)}", pull)).status == 200
    # The wrong upstream credentials: the realm refuses them.
    assert (await call("GET", "/v2/bad.test/team/app/manifests/1", pull)).status >= 400
    assert (await call("GET", f"/v2/bad.test/team/app/blobs/{digest_of(LAYER)}", pull)).status >= 400
    # Wrong and right tokens, echoed nowhere.
    assert (await call("GET", "/v2/", {"Authorization": f"Bearer {ADMIN_TOKEN}"})).status == 401
    assert (await call("GET", "/admin/images", {"Authorization": f"Bearer {PULL_TOKEN}"})).status == 401
    assert (await call("GET", "/admin/images", admin)).status == 200
    assert "team/app" in seen[-2]
    assert (await call("POST", "/admin/pull", admin, json={"image": "bad.test/team/app:1"})).status < 500
    assert (await call("GET", "/metrics")).status == 200
    good.faults.clear()

    assert len(good.token_requests) >= 1, "the realm was used, so secrets were really in play"
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records) + caplog.text
    assert "regcache.access" in {r.name for r in caplog.records}
    for secret in secrets():
        assert secret not in logged, f"a secret ({secret[:4]}...) was logged"
        for text in seen:
            assert secret not in text, f"a secret ({secret[:4]}...) was sent to a client:\n{text[:500]}"


@pytest.mark.parametrize("path", ["/v2/", "/v2/team/app/manifests/1"])
async def test_bad_client_credentials_are_not_echoed(aiohttp_server, aiohttp_client, tmp_path, caplog, path):
    caplog.set_level(logging.DEBUG)
    fake = await _fake(aiohttp_server)
    settings = Settings(
        data_dir=tmp_path / "d",
        upstreams=[UpstreamSettings(name="good.test", url=fake.base_url, default=True)],
        auth=AuthSettings(tokens=[PULL_TOKEN]),
    )
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    attempt = "almost-" + PULL_TOKEN
    r = await proxy.get(path, headers={"Authorization": f"Bearer {attempt}"})
    assert r.status == 401
    body = await r.text()
    assert attempt not in body and attempt not in str(r.headers)
    assert attempt not in caplog.text
