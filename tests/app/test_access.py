"""Who may pull what, through every repository route and every way of naming an upstream.

Two in-process upstreams: ``docker.io`` (the default) and ``ghcr.io``, reached by short name,
by containerd's ``?ns=`` and by the path prefix. Every image is in the cache before the rules
are put to the test (warmed by the ``ci`` token, which may pull anything the lists allow), so
a refusal proves that cached content is refused too; the upstreams' request counts prove the
refusal came before any upstream traffic.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.registry import bcrypt_hash
from tests.support.serving import start_proxy

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
CI_TOKEN, SPARE_TOKEN = "ci-token-0123456789", "spare-token-0123456789"
IMAGES = {  # (upstream, repository) -> layer
    ("docker.io", "library/busybox"): b"busybox layer\n" * 64,
    ("docker.io", "team-a/app"): b"team a layer\n" * 64,
    ("docker.io", "team-b/app"): b"team b layer\n" * 64,
    ("docker.io", "team-b/internal"): b"team b internal\n" * 64,
    ("docker.io", "other/thing"): b"other layer\n" * 64,
    ("ghcr.io", "org/tool"): b"org tool layer\n" * 64,
    ("ghcr.io", "org/secret"): b"org secret layer\n" * 64,
}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


WHO = {
    "anonymous": {},
    "alice": basic("alice", PASSWORDS["alice"]),
    "bob": basic("bob", PASSWORDS["bob"]),
    "ci": {"Authorization": f"Bearer {CI_TOKEN}"},
    "spare": basic("anyone", SPARE_TOKEN),
}


def access_settings(tmp_path, docker_url: str, ghcr_url: str, **extra) -> Settings:  # type: ignore[no-untyped-def]
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in PASSWORDS.items()))
    upstreams = [
        UpstreamSettings(name="docker.io", url=docker_url, default=True, prefetch=0,
                         allow=["library/*", "team-a/**", "team-b/**", "other/**"], deny=["team-b/internal"]),
        UpstreamSettings(name="ghcr.io", url=ghcr_url, prefetch=0, deny=["org/secret"]),
    ]
    return Settings.model_validate({
        "data_dir": tmp_path / "data",
        "upstreams": [u.model_dump() for u in upstreams],
        "auth": {"htpasswd": htpasswd, "tokens": [{"name": "ci", "token": CI_TOKEN}, SPARE_TOKEN]},
        "access": {
            "anonymous": [{"upstream": "docker.io", "repositories": ["library/*"]}],
            "users": {
                "alice": [{"repositories": ["team-a/**", "org/**"]}],
                "bob": [{"upstream": "docker.io", "repositories": ["team-b/**"]}],
            },
            "tokens": {"ci": [{"repositories": ["**"]}]},
        },
        **extra,
    })


@dataclass
class Cache:
    proxy: object
    fakes: dict[str, FakeUpstream]
    digests: dict[tuple[str, str], str]

    def upstream_requests(self) -> int:
        return sum(len(f.requests) for f in self.fakes.values())


@pytest.fixture
async def cache(aiohttp_server, aiohttp_client, tmp_path) -> Cache:  # type: ignore[no-untyped-def]
    fakes = {"docker.io": FakeUpstream(), "ghcr.io": FakeUpstream()}
    for fake in fakes.values():
        server = await aiohttp_server(fake.app, host="127.0.0.1")
        fake.base_url = str(server.make_url("")).rstrip("/")
    digests = {key: fakes[key[0]].add_image(key[1], "1", [layer]) for key, layer in IMAGES.items()}
    settings = access_settings(tmp_path, fakes["docker.io"].base_url, fakes["ghcr.io"].base_url)
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    cache = Cache(proxy, fakes, digests)
    # Warm: everything the lists let anyone pull, by the token that may pull all of it.
    for (upstream, repository), _layer in IMAGES.items():
        if repository in ("team-b/internal", "org/secret"):
            continue
        for path in paths(upstream, repository, "prefix" if upstream == "ghcr.io" else "plain", cache):
            r = await proxy.get(path, headers=WHO["ci"])
            assert r.status == 200, (path, await r.text())
            await r.read()
    await proxy.server.app[PULLTHROUGH].fills.settle()
    return cache


def paths(upstream: str, repository: str, naming: str, cache: Cache) -> list[str]:
    """One path per repository route, naming the upstream as ``naming`` says."""
    digest = cache.digests[(upstream, repository)]
    layer = digest_of(IMAGES[(upstream, repository)])
    name = repository.removeprefix("library/") if naming == "short" else repository
    if naming == "prefix":
        name = f"{upstream}/{name}"
    query = f"?ns={upstream}" if naming == "ns" else ""
    return [
        f"/v2/{name}/manifests/1{query}",
        f"/v2/{name}/manifests/{digest}{query}",
        f"/v2/{name}/blobs/{layer}{query}",
        f"/v2/{name}/tags/list{query}",
        f"/v2/{name}/referrers/{digest}{query}",
    ]


# (who, upstream, repository, how the upstream is named, expected status on every route)
CASES = [
    ("anonymous", "docker.io", "library/busybox", "short", 200),
    ("anonymous", "docker.io", "library/busybox", "ns", 200),
    ("anonymous", "docker.io", "team-a/app", "plain", 401),
    ("anonymous", "ghcr.io", "org/tool", "prefix", 401),
    ("alice", "docker.io", "team-a/app", "plain", 200),
    ("alice", "docker.io", "team-a/app", "ns", 200),
    ("alice", "docker.io", "library/busybox", "short", 200),  # what anonymous may, a user may
    ("alice", "docker.io", "team-b/app", "plain", 403),
    ("alice", "ghcr.io", "org/tool", "prefix", 200),
    ("alice", "ghcr.io", "org/tool", "ns", 200),
    ("alice", "ghcr.io", "org/secret", "prefix", 403),  # deny list beats her org/**
    ("bob", "docker.io", "team-b/app", "plain", 200),
    ("bob", "docker.io", "team-b/internal", "ns", 403),  # deny list beats his team-b/**
    ("bob", "docker.io", "team-a/app", "plain", 403),
    ("bob", "ghcr.io", "org/tool", "ns", 403),  # his rule is for docker.io only
    ("ci", "docker.io", "team-b/internal", "plain", 403),
    ("ci", "ghcr.io", "org/secret", "ns", 403),
    ("spare", "docker.io", "team-a/app", "plain", 403),  # an unnamed token: access.default, empty
    ("spare", "docker.io", "library/busybox", "ns", 200),
]


async def test_rules_hold_on_every_route_and_every_upstream_naming(cache: Cache) -> None:
    proxy = cache.proxy
    for who, upstream, repository, naming, expected in CASES:
        for path in paths(upstream, repository, naming, cache):
            before = cache.upstream_requests() if expected != 200 else None
            method = proxy.head if "/manifests/" in path and path.endswith("1") else proxy.get  # type: ignore[attr-defined]
            r = await method(path, headers=WHO[who])
            assert r.status == expected, (who, path, r.status, await r.text())
            if expected == 401:
                assert r.headers["WWW-Authenticate"].startswith("Basic ")
            if expected == 403 and method is proxy.get:  # type: ignore[attr-defined]
                error = (await r.json())["errors"][0]
                assert error["code"] == "DENIED"
                assert f"upstream {upstream}" in error["message"]
                assert "*" not in error["message"]  # names the upstream, never the list
            if before is not None:
                assert cache.upstream_requests() == before, (who, path, "reached the upstream")


async def test_blob_and_manifest_heads_are_judged_like_gets(cache: Cache) -> None:
    layer = digest_of(IMAGES[("docker.io", "team-b/app")])
    for path in (f"/v2/team-b/app/blobs/{layer}", "/v2/team-b/app/manifests/1"):
        assert (await cache.proxy.head(path, headers=WHO["alice"])).status == 403  # type: ignore[attr-defined]
        assert (await cache.proxy.head(path, headers=WHO["bob"])).status == 200  # type: ignore[attr-defined]


async def test_catalog_lists_only_what_the_client_may_pull(cache: Cache) -> None:
    async def listed(who: str) -> set[str]:
        r = await cache.proxy.get("/v2/_catalog", headers=WHO[who])  # type: ignore[attr-defined]
        assert r.status == 200
        return set((await r.json())["repositories"])

    assert await listed("anonymous") == {"library/busybox"}
    assert await listed("alice") == {"library/busybox", "team-a/app", "ghcr.io/org/tool"}
    assert await listed("bob") == {"library/busybox", "team-b/app"}


async def test_wrong_password_is_401_not_a_fallback_to_anonymous(cache: Cache) -> None:
    r = await cache.proxy.get("/v2/busybox/manifests/1", headers=basic("alice", "wrong"))  # type: ignore[attr-defined]
    assert r.status == 401


async def test_access_log_names_identity_decision_and_rule_kind_never_a_secret(
    aiohttp_server, aiohttp_client, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="regcache.access")
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    fake.add_image("team-a/app", "1", [b"x" * 100])
    proxy = await start_proxy(aiohttp_server, aiohttp_client, access_settings(tmp_path, fake.base_url, fake.base_url))
    assert (await proxy.get("/v2/team-a/app/manifests/1", headers=WHO["alice"])).status == 200
    assert (await proxy.get("/v2/team-a/app/manifests/1", headers=WHO["bob"])).status == 403
    assert (await proxy.get("/v2/team-b/internal/manifests/1", headers=WHO["ci"])).status == 403
    assert (await proxy.get("/v2/team-a/app/manifests/1")).status == 401
    text = [r.getMessage() for r in caplog.records if r.name == "regcache.access"]
    lines = [json.loads(t) for t in text]
    got = [(x["identity"], x["decision"], x["rule"], x["status"]) for x in lines]
    assert got == [
        ("user:alice", "allowed", "identity", 200),
        ("user:bob", "denied", "identity", 403),
        ("token:ci", "denied", "deny_list", 403),
        ("anonymous", "denied", "anonymous", 401),
    ]
    for secret in (*PASSWORDS.values(), CI_TOKEN, base64.b64encode(b"alice:alice-pw").decode()):
        assert not any(secret in t for t in text)


FULL_ADMIN, READ_ADMIN = "admin-full-token-0123", "admin-read-token-0123"


async def test_admin_pull_is_bound_by_the_lists_and_refused_to_a_read_token(
    aiohttp_server, aiohttp_client, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="regcache.access")
    fakes = {"docker.io": FakeUpstream(), "ghcr.io": FakeUpstream()}
    for fake in fakes.values():
        server = await aiohttp_server(fake.app, host="127.0.0.1")
        fake.base_url = str(server.make_url("")).rstrip("/")
    for (upstream, repository), layer in IMAGES.items():
        fakes[upstream].add_image(repository, "1", [layer])
    fakes["docker.io"].add_image("unlisted/app", "1", [b"unlisted\n" * 64])
    settings = access_settings(tmp_path, fakes["docker.io"].base_url, fakes["ghcr.io"].base_url, admin={
        "token": FULL_ADMIN, "tokens": [{"name": "dashboard", "token": READ_ADMIN, "role": "read"}]})
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)

    def upstream_requests() -> int:
        return sum(len(f.requests) for f in fakes.values())

    async def admin_pull(token: str, image: str):  # type: ignore[no-untyped-def]
        return await proxy.post("/admin/pull", headers={"Authorization": f"Bearer {token}"}, json={"image": image})

    # The full token, refused by the lists alone: (image, upstream, repository, rule kind).
    for image, upstream, repository, rule in (("team-b/internal:1", "docker.io", "team-b/internal", "deny_list"),
                                              ("unlisted/app:1", "docker.io", "unlisted/app", "allow_list"),
                                              ("ghcr.io/org/secret:1", "ghcr.io", "org/secret", "deny_list")):
        r = await admin_pull(FULL_ADMIN, image)
        assert r.status == 403, (image, await r.text())
        error = (await r.json())["errors"][0]
        assert error["code"] == "DENIED"
        # The upstream, never the list.
        assert error["message"] == f"access to {repository} on upstream {upstream} is denied"
        line = json.loads([x for x in caplog.records if x.name == "regcache.access"][-1].getMessage())
        assert (line["identity"], line["decision"], line["rule"]) == ("admin:admin", "denied", rule)
    # A read token may not pull even what the lists allow.
    r = await admin_pull(READ_ADMIN, "team-a/app:1")
    assert r.status == 403
    error = (await r.json())["errors"][0]
    assert error["code"] == "DENIED" and "dashboard" in error["message"]
    assert upstream_requests() == 0
    images = await proxy.get("/admin/images", headers={"Authorization": f"Bearer {READ_ADMIN}"})
    assert (await images.json())["images"] == []
    # The same pull by the full token goes through: the refusals were the lists' and the role's.
    r = await admin_pull(FULL_ADMIN, "team-a/app:1")
    assert r.status == 200
    assert b'"error"' not in await r.read()
    assert upstream_requests() > 0
