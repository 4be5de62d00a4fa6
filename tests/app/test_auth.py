"""Client authentication settings: htpasswd format checks, protected metrics, caching of verified credentials."""

from __future__ import annotations

import base64

import pytest

from config.settings import AuthSettings, ConfigError, Settings, UpstreamSettings
from proxy.app import create_app
from proxy.http.clientauth import ClientAuth
from tests.support.registry import bcrypt_hash


def _settings(tmp_path, auth: AuthSettings) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(data_dir=tmp_path, upstreams=[UpstreamSettings(name="x.test", url="http://127.0.0.1:9")], auth=auth)


def test_htpasswd_with_a_non_bcrypt_hash_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(f"good:{bcrypt_hash('pw')}\n# comment\nold:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    with pytest.raises(ConfigError, match="line 3: only bcrypt"):
        ClientAuth(AuthSettings(htpasswd=path))


def test_missing_htpasswd_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"auth\.htpasswd"):
        ClientAuth(AuthSettings(htpasswd=tmp_path / "nope"))


async def test_metrics_can_require_credentials(aiohttp_client, tmp_path):
    client = await aiohttp_client(
        create_app(_settings(tmp_path, AuthSettings(tokens=["t0ken-abc"], protect_metrics=True)))
    )
    r = await client.get("/metrics")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="regcache"'
    assert (await client.get("/metrics", headers={"Authorization": "Bearer t0ken-abc"})).status == 200
    assert (await client.get("/healthz")).status == 200


async def test_verified_basic_credentials_are_remembered_not_rehashed(tmp_path, monkeypatch):
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{bcrypt_hash('s3cret')}\n")
    auth = ClientAuth(AuthSettings(htpasswd=path))
    header = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert await auth.identify(header, "10.0.0.1")
    calls = []
    monkeypatch.setattr("proxy.http.clientauth.bcrypt.checkpw", lambda *a: calls.append(a) or False)
    assert await auth.identify(header, "10.0.0.1")
    assert calls == []
    assert not await auth.identify("Basic " + base64.b64encode(b"alice:wrong").decode(), "10.0.0.1")
    assert not await auth.identify("Basic !!notbase64", "10.0.0.1")
    assert not await auth.identify("Digest whatever", "10.0.0.1")
