"""Upstream credentials go to a token realm on the registry's own host, or one the operator listed.

On shared domains (one tenant per subdomain) a realm elsewhere under the same
domain is another tenant, which must not see the credentials.
"""

from __future__ import annotations

from pydantic import SecretStr
from yarl import URL

from config.settings import Settings, UpstreamSettings, load_settings
from proxy.upstream.auth import UpstreamAuth, may_receive_credentials

SCOPE = "repository:team/app:pull"


def test_a_realm_on_a_sibling_subdomain_gets_no_credentials():
    upstream = URL("https://tenant-a.registry.example.com")
    assert not may_receive_credentials(URL("https://tenant-b.registry.example.com/token"), upstream)
    assert not may_receive_credentials(URL("https://auth.registry.example.com/token"), upstream)
    assert may_receive_credentials(URL("https://tenant-a.registry.example.com/token"), upstream)


def test_docker_hubs_registry_trusts_its_token_service_by_default_and_only_it():
    for settings in (Settings(), load_settings(environ={"REGCACHE_UPSTREAMS__0__USERNAME": "u"})):
        hub = settings.default_upstream
        assert "auth.docker.io" in hub.trusted_realms
        assert may_receive_credentials(URL("https://auth.docker.io/token"), URL(hub.base_url), hub.trusted_realms)
    # A "docker.io" upstream that is really a mirror elsewhere does not trust Docker Hub's token service.
    mirror = UpstreamSettings(name="docker.io", url="https://mirror.example.com", default=True)
    assert mirror.trusted_realms == []


async def _authorization_sent(settings: UpstreamSettings, realm: str) -> str | None:
    sent: list[str | None] = []

    async def get_token(url: URL, authorization: str | None) -> bytes:
        sent.append(authorization)
        return b'{"token": "t"}'

    auth = UpstreamAuth(settings, get_token)
    assert await auth.answer(f'Bearer realm="{realm}",service="registry"', SCOPE) == "Bearer t"
    return sent[0]


async def test_token_fetch_sends_credentials_only_to_the_own_host_or_a_listed_realm():
    base = {"name": "tenant-a.registry.example.com", "url": "https://tenant-a.registry.example.com",
            "username": "robot", "password": SecretStr("pw")}
    own = UpstreamSettings(**base)
    assert await _authorization_sent(own, "https://tenant-b.registry.example.com/token") is None
    assert await _authorization_sent(own, "https://tenant-a.registry.example.com/token") is not None
    listed = UpstreamSettings(**base, token_realms=["login.registry.example.com"])
    assert await _authorization_sent(listed, "https://login.registry.example.com/token") is not None
