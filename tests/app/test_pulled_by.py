"""Who pulled an image last: recorded from real pulls by htpasswd users, a token, anonymous
clients and admin ``pull``, shown in ``/admin/images`` and by ``regcache images``."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest

from config.settings import Settings
from proxy.cli import verbs
from proxy.cli.main import build_parser
from proxy.resources import PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream
from tests.support.registry import bcrypt_hash
from tests.support.serving import start_proxy

PASSWORDS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw"}
CI_TOKEN = "ci-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()}


@pytest.fixture
async def proxy(aiohttp_server, aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    for repository, layer in (("library/busybox", b"busybox\n"), ("team-a/app", b"team a\n"),
                              ("library/alpine", b"alpine\n"), ("library/never", b"never\n")):
        fake.add_image(repository, "1", [layer * 64])
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in PASSWORDS.items()))
    settings = Settings.model_validate({
        "data_dir": tmp_path / "data",
        "upstreams": [{"name": "docker.io", "url": fake.base_url, "default": True, "prefetch": 0}],
        "auth": {"htpasswd": htpasswd, "tokens": [{"name": "ci", "token": CI_TOKEN}]},
        "access": {
            "anonymous": [{"upstream": "docker.io", "repositories": ["library/*"]}],
            "users": {"alice": [{"repositories": ["team-a/**"]}]},
            "tokens": {"ci": [{"repositories": ["**"]}]},
        },
        "admin": {"token": ADMIN_TOKEN},
    })
    return await start_proxy(aiohttp_server, aiohttp_client, settings)


async def pull(proxy, name: str, headers: dict[str, str], method: str = "GET") -> int:  # type: ignore[no-untyped-def]
    r = await proxy.request(method, f"/v2/{name}/manifests/1", headers=headers)
    await r.read()
    return r.status


async def pulled_by(proxy) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    r = await proxy.get("/admin/images", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status == 200
    return {image["RepoTags"][0]: image["LastPulledBy"] for image in (await r.json())["images"]}


async def cli(proxy, *args: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:  # type: ignore[no-untyped-def]
    """``regcache images ARGS`` against the served app, as a user runs it (a blocking HTTP client:
    in a thread, so the app keeps answering)."""
    monkeypatch.setenv("REGCACHE_ADMIN_TOKEN", ADMIN_TOKEN)
    parsed = build_parser().parse_args(["images", "--server", str(proxy.server.make_url("")), *args])
    out = io.StringIO()
    assert await asyncio.to_thread(verbs.run, parsed, out) == 0
    return out.getvalue().splitlines()


async def test_images_name_the_last_identity_that_pulled_each_one(proxy, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert await pull(proxy, "busybox", basic("alice")) == 200
    assert await pull(proxy, "team-a/app", basic("alice")) == 200
    assert await pull(proxy, "busybox", basic("bob")) == 200  # what anonymous may, bob may
    assert await pull(proxy, "team-a/app", basic("bob")) == 403  # a refused pull is nobody's
    assert await pull(proxy, "library/never", {"Authorization": f"Bearer {CI_TOKEN}"}, method="HEAD") == 200
    assert await pull(proxy, "library/never", {}) == 200
    r = await proxy.post("/admin/pull", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                         json={"image": "alpine:1"})
    assert r.status == 200 and b'"error"' not in await r.read()
    await proxy.server.app[PULLTHROUGH].settle()
    assert await pulled_by(proxy) == {
        "busybox:1": "user:bob",
        "team-a/app:1": "user:alice",
        "alpine:1": "admin:admin",
        "never:1": "anonymous",
    }
    # docker's pull of an image it has is a HEAD by tag: that client is now the last puller.
    assert await pull(proxy, "team-a/app", {"Authorization": f"Bearer {CI_TOKEN}"}, method="HEAD") == 200
    assert (await pulled_by(proxy))["team-a/app:1"] == "token:ci"

    # On request only: the default table is docker's, with regcache's columns.
    table = await cli(proxy, monkeypatch=monkeypatch)
    assert "LAST PULLED BY" not in table[0]
    table = await cli(proxy, "--pulled-by", monkeypatch=monkeypatch)
    header = table[0]
    assert header.index("LAST PULLED") < header.index("LAST PULLED BY") < header.index("PULLS")
    column = header.index("LAST PULLED BY")
    rows = {line.split()[0]: line[column:].split()[0] for line in table[1:]}
    assert rows == {"busybox": "user:bob", "team-a/app": "token:ci", "alpine": "admin:admin", "never": "anonymous"}
    formatted = await cli(proxy, "--format", "{{.Repository}} {{.LastPulledBy}}", "busybox", monkeypatch=monkeypatch)
    assert formatted == ["busybox user:bob"]
    as_json = await cli(proxy, "--format", "{{json .}}", "team-a/app", monkeypatch=monkeypatch)
    assert json.loads(as_json[0])["LastPulledBy"] == "token:ci"
    assert not any(secret in "\n".join(table) for secret in (*PASSWORDS.values(), CI_TOKEN, ADMIN_TOKEN))


async def test_an_admin_save_is_nobodys_pull(proxy) -> None:  # type: ignore[no-untyped-def]
    assert await pull(proxy, "busybox", {}) == 200
    r = await proxy.post("/admin/save", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                         json={"images": ["busybox:1"]})
    assert r.status == 200
    assert len(await r.read()) > 0
    assert await pulled_by(proxy) == {"busybox:1": "anonymous"}
