"""``client_credentials: verify`` against an in-process upstream with per-repository grants,
with the clock of the remembered answers in the test's hand; and admin token roles."""

from __future__ import annotations

import base64

from aiohttp import web

from config.settings import Settings
from proxy.access.clientcheck import ClientCheck
from proxy.access.gate import ACCESS
from tests.support.fake_upstream import FakeUpstream, digest_of
from tests.support.serving import start_proxy

LAYER = b"private layer\n" * 100


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GrantingUpstream(FakeUpstream):
    """Basic auth with a password per user and the repositories each user may read (403 otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, str] = {}
        self.grants: dict[str, set[str]] = {}
        self.seen: list[str] = []  # Authorization headers of every request

    def _auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        self.seen.append(header)
        user, _, password = base64.b64decode(header.removeprefix("Basic ") or b"").decode().partition(":")
        if self.users.get(user) != password or not password:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if request.match_info.get("name", "") not in self.grants.get(user, set()) and request.path != "/v2/":
            return web.json_response({"errors": [{"code": "DENIED"}]}, status=403)
        return None


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_cached_content_is_served_only_to_credentials_the_upstream_lets_read_it(
    aiohttp_server, aiohttp_client, tmp_path
) -> None:
    fake = GrantingUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    fake.add_image("team/private", "1", [LAYER])
    fake.users = {"alice": "alice-pw", "bob": "bob-pw"}
    fake.grants = {"alice": {"team/private"}}
    settings = Settings.model_validate({
        "data_dir": tmp_path / "data",
        "upstreams": [{"name": "private.test", "url": fake.base_url, "default": True, "prefetch": 0,
                       "client_credentials": "verify", "access_ttl": 60}],
    })
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    clock = Clock()
    proxy.server.app[ACCESS].check = ClientCheck(clock)
    alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
    routes = [
        "/v2/team/private/manifests/1",
        f"/v2/team/private/blobs/{digest_of(LAYER)}",
        "/v2/team/private/tags/list",
    ]

    # No credentials: the challenge, so docker and skopeo send theirs.
    r = await proxy.get(routes[0])
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
    # alice warms the cache; the cache has no credentials of its own, so the fills used hers.
    for path in routes:
        assert (await proxy.get(path, headers=alice)).status == 200, path
    assert fake.seen and all(h in ("", alice["Authorization"]) for h in fake.seen)

    fetched = fake.count("GET", "/blobs/")
    for path in routes:
        r = await proxy.get(path, headers=bob)
        assert r.status == 403, path
        assert "upstream private.test" in (await r.json())["errors"][0]["message"]
    assert (await proxy.get(routes[0], headers=basic("bob", "wrong"))).status == 403
    assert fake.count("GET", "/blobs/") == fetched  # nothing was fetched for bob

    # Granted upstream: bob stays refused while the remembered answer lives...
    fake.grants["bob"] = {"team/private"}
    clock.now += 59
    assert (await proxy.get(routes[1], headers=bob)).status == 403
    # ... and is let in once access_ttl has passed, to the cached blob too.
    clock.now += 2
    for path in routes:
        assert (await proxy.get(path, headers=bob)).status == 200, path
    # Revoked: alice keeps her remembered answer (asked again just now) until it expires, then is refused.
    assert (await proxy.get(routes[1], headers=alice)).status == 200
    fake.grants["alice"] = set()
    assert (await proxy.get(routes[1], headers=alice)).status == 200
    clock.now += 61
    assert (await proxy.get(routes[1], headers=alice)).status == 403


async def test_upstream_down_while_checking_is_503_and_nothing_is_remembered(
    aiohttp_server, aiohttp_client, tmp_path
) -> None:
    fake = GrantingUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    fake.add_image("team/private", "1", [LAYER])
    fake.users, fake.grants = {"alice": "pw"}, {"alice": {"team/private"}}
    settings = Settings.model_validate({
        "data_dir": tmp_path / "data",
        "upstreams": [{"name": "private.test", "url": fake.base_url, "default": True, "retries": 0,
                       "client_credentials": "verify"}],
    })
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    from tests.support.fake_upstream import Fault

    fake.faults["tags"] = Fault("status", status=503, times=1)
    assert (await proxy.get("/v2/team/private/manifests/1", headers=basic("alice", "pw"))).status == 503
    assert (await proxy.get("/v2/team/private/manifests/1", headers=basic("alice", "pw"))).status == 200


async def test_read_admin_token_may_look_but_not_change(aiohttp_server, aiohttp_client, tmp_path, caplog) -> None:
    import json
    import logging

    caplog.set_level(logging.INFO, logger="regcache.access")
    settings = Settings.model_validate({
        "data_dir": tmp_path / "data",
        # Not Docker Hub: search then asks no one.
        "upstreams": [{"name": "local.test", "url": "http://127.0.0.1:9", "default": True}],
        "admin": {"token": "full-token-123", "tokens": [{"name": "dashboard", "token": "read-token-123",
                                                        "role": "read"}]},
    })
    proxy = await start_proxy(aiohttp_server, aiohttp_client, settings)
    read = {"Authorization": "Bearer read-token-123"}
    full = {"Authorization": "Bearer full-token-123"}
    for verb in ("images", "stats", "search?term=x"):
        assert (await proxy.get(f"/admin/{verb}", headers=read)).status == 200, verb
    for verb in ("gc", "rmi", "pin", "pull", "load", "save"):
        r = await proxy.post(f"/admin/{verb}", headers=read, json={})
        assert r.status == 403, verb
        assert (await r.json())["errors"][0]["code"] == "DENIED"
    assert (await proxy.post("/admin/gc", headers=full, json={})).status == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "regcache.access"]
    assert {(x["identity"], x["decision"]) for x in lines if x["route"] == "admin_gc"} == {
        ("admin:dashboard", "denied"),
        ("admin:admin", "allowed"),
    }
