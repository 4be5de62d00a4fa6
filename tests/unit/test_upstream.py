"""proxy.upstream against fake registries run in this process on loopback.

Two loopback addresses (127.0.0.1 and 127.0.0.2) stand for two hosts, so
"credentials never reach another host" is checked on real connections.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from config.settings import UpstreamSettings
from proxy.errors import (
    ManifestTooLarge,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamTooManyRequests,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from proxy.upstream.auth import may_receive_credentials, parse_challenges
from proxy.upstream.client import RETRY_BUDGET, UpstreamClient
from proxy.upstream.responses import retry_after, window

PASSWORD = "hunter2-PASSWORD-do-not-log"
USERNAME = "alice"
BASIC = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
REPO = "library/alpine"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
BLOB = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()

ServerFactory = Callable[..., Awaitable[TestServer]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps(list[float]):
    """Stands in for asyncio.sleep: records backoff instead of waiting it out."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@dataclass
class Registry:
    """A fake upstream registry that can demand a bearer token and records what it saw."""

    auth: str | None = None  # None, "bearer" or "basic"
    realm: str = ""  # set once the realm's server is running
    tokens: set[str] = field(default_factory=set)
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    unauthorized: int = 0
    blob_location: str | None = None  # answer blob GETs with a redirect here
    tags: list[str] = field(default_factory=lambda: ["a", "b", "c"])
    extra_headers: dict[str, str] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self.base)
        app.router.add_get(r"/v2/{name:.+}/manifests/{reference}", self.manifest)
        app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_get(r"/v2/{name:.+}/tags/list", self.tag_list)
        app.router.add_get("/moved/{digest}", self.blob)
        return app

    def _guard(self, request: web.Request) -> web.Response | None:
        authorization = request.headers.get("Authorization")
        self.seen.append((request.method, request.path, authorization))
        if self.auth is None:
            return None
        if self.auth == "basic" and authorization == BASIC:
            return None
        if self.auth == "bearer" and (authorization or "").removeprefix("Bearer ") in self.tokens:
            return None
        self.unauthorized += 1
        if self.auth == "basic":
            challenge = 'Basic realm="fake"'
        else:
            # The quoted scope holds a comma: a naive split would break it.
            challenge = f'Bearer realm="{self.realm}",service="fake-registry",scope="repository:{REPO}:pull,push"'
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={"WWW-Authenticate": challenge}
        )

    async def base(self, request: web.Request) -> web.StreamResponse:
        return self._guard(request) or web.json_response({})

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        if denied := self._guard(request):
            return denied
        if request.match_info["name"] != REPO:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": MANIFEST_DIGEST, **self.extra_headers}
        return web.Response(body=MANIFEST, headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        if denied := self._guard(request):
            return denied
        if self.blob_location and request.path.startswith("/v2/"):
            # A relative hop first: it stays on the upstream, so it must keep the token.
            raise web.HTTPFound(f"../../../../moved/{request.match_info['digest']}")
        if self.blob_location and request.path.startswith("/moved/"):
            raise web.HTTPTemporaryRedirect(self.blob_location)
        return web.Response(body=BLOB, headers={"Docker-Content-Digest": BLOB_DIGEST})

    async def tag_list(self, request: web.Request) -> web.StreamResponse:
        if denied := self._guard(request):
            return denied
        n = int(request.query.get("n", "100"))
        last = request.query.get("last")
        rest = [t for t in self.tags if last is None or t > last]
        page, more = rest[:n], len(rest) > n
        headers = {"Link": f'</v2/{REPO}/tags/list?n={n}&last={page[-1]}>; rel="next"'} if more else {}
        return web.json_response({"name": REPO, "tags": page}, headers=headers)


@dataclass
class TokenServer:
    """A token realm. Counts fetches and remembers each request's Authorization."""

    expires_in: int | None = 300
    field_name: str = "token"
    fetches: list[dict[str, Any]] = field(default_factory=list)
    registry: Registry | None = None
    gate: asyncio.Event | None = None  # when set, fetches wait for it

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.fetches.append({"authorization": request.headers.get("Authorization"), **request.query})
        if self.gate is not None:
            await self.gate.wait()
        value = f"tok-SECRET-{len(self.fetches)}"
        if self.registry is not None:
            self.registry.tokens.add(value)
        body: dict[str, Any] = {self.field_name: value}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Awaitable[UpstreamClient]]]:
    clients: list[UpstreamClient] = []

    async def make(url: str | URL, *, observer: Any = None, clock: Any = None, sleep: Any = None,
                   small_blob: int | None = None, **settings: Any):
        kwargs: dict[str, Any] = {"sleep": Sleeps() if sleep is None else sleep}
        if small_blob is not None:
            kwargs["small_blob"] = small_blob
        if clock is not None:
            kwargs["clock"] = clock
        upstream = UpstreamSettings(name="registry.test", url=str(url).rstrip("/"), **settings)
        client = UpstreamClient(upstream, observer, **kwargs)
        await client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def bearer_registry(aiohttp_server: ServerFactory, *, realm_host: str = "127.0.0.1", **token_kw: Any):
    """A bearer-protected registry on 127.0.0.1 with its realm on ``realm_host``."""
    registry = Registry(auth="bearer")
    tokens = TokenServer(registry=registry, **token_kw)
    realm_server = await aiohttp_server(tokens.app(), host=realm_host)
    registry.realm = str(realm_server.make_url("/token"))
    server = await aiohttp_server(registry.app())
    return registry, tokens, server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- WWW-Authenticate and the credential boundary ---------------------------------


def test_challenge_parsing_keeps_quoted_commas_and_separates_challenges() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull,push", Basic realm="say \\"hi\\", ok"'
    )
    bearer, basic = parse_challenges(header)
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull,push",
    }
    assert basic.scheme == "basic"
    assert basic.realm == 'say "hi", ok'
    assert parse_challenges("Basic realm=plain") == parse_challenges('basic REALM = "plain"')


@pytest.mark.parametrize(
    ("realm", "upstream", "trusted", "allowed"),
    [
        ("https://auth.docker.io/token", "https://registry-1.docker.io", ("auth.docker.io",), True),
        ("https://ghcr.io/token", "https://ghcr.io", (), True),
        ("https://auth.evil.com/token", "https://registry-1.docker.io", ("auth.docker.io",), False),
        ("https://a.co.uk/token", "https://b.co.uk", (), False),
        ("https://auth.example.co.uk/t", "https://registry.example.co.uk", (), False),
        ("https://127.0.0.2/token", "https://127.0.0.1", (), False),
        ("https://127.0.0.1:9000/token", "https://127.0.0.1:5000", (), True),
        ("http://auth.docker.io/token", "https://registry-1.docker.io", (), False),  # no downgrade
        ("https://login.corp.net/token", "https://registry.example.com", ("login.corp.net",), True),
        ("https://login.corp.net/token", "https://registry.example.com", ("https://login.corp.net",), True),
    ],
)
def test_credentials_only_go_to_the_upstreams_host_or_listed_realms(
    realm: str, upstream: str, trusted: tuple[str, ...], allowed: bool
) -> None:
    assert may_receive_credentials(URL(realm), URL(upstream), trusted) is allowed


# -- token flow ---------------------------------------------------------------------


async def test_token_is_fetched_for_the_repository_scope_and_reused_until_it_expires(aiohttp_server, make_client):
    registry, tokens, server = await bearer_registry(aiohttp_server, expires_in=300)
    clock = FakeClock()
    client = await make_client(server.make_url("/"), clock=clock)

    manifest = await client.get_manifest(REPO, "latest", [OCI_MANIFEST], max_size=1 << 20)
    assert (manifest.data, manifest.media_type, manifest.digest) == (MANIFEST, OCI_MANIFEST, MANIFEST_DIGEST)
    assert len(tokens.fetches) == 1
    assert tokens.fetches[0]["scope"] == f"repository:{REPO}:pull"
    assert tokens.fetches[0]["service"] == "fake-registry"
    assert tokens.fetches[0]["authorization"] is None  # no credentials configured

    clock.now += 200
    head = await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert head.digest == MANIFEST_DIGEST and head.size == len(MANIFEST)
    assert len(tokens.fetches) == 1
    assert registry.unauthorized == 1  # the cached token went up front: no second 401

    clock.now += 100  # past expires_in minus the margin
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert len(tokens.fetches) == 2


async def test_access_token_field_and_default_expiry_are_understood(aiohttp_server, make_client):
    _, tokens, server = await bearer_registry(aiohttp_server, expires_in=None, field_name="access_token")
    clock = FakeClock()
    client = await make_client(server.make_url("/"), clock=clock)
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    clock.now += 30
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert len(tokens.fetches) == 1
    clock.now += 60
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert len(tokens.fetches) == 2


async def test_concurrent_requests_share_one_token_fetch(aiohttp_server, make_client):
    registry, tokens, server = await bearer_registry(aiohttp_server)
    tokens.gate = asyncio.Event()
    client = await make_client(server.make_url("/"))
    heads = [asyncio.create_task(client.head_manifest(REPO, "latest", [OCI_MANIFEST])) for _ in range(5)]
    while registry.unauthorized < 5:  # every request has been challenged and now waits for a token
        await asyncio.sleep(0.01)
    tokens.gate.set()
    results = await asyncio.gather(*heads)
    assert {r.digest for r in results} == {MANIFEST_DIGEST}
    assert len(tokens.fetches) == 1


async def test_basic_credentials_go_to_a_token_realm_on_the_same_host(aiohttp_server, make_client):
    _, tokens, server = await bearer_registry(aiohttp_server, realm_host="127.0.0.1")
    client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD)
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert tokens.fetches[0]["authorization"] == BASIC


async def test_credentials_are_withheld_from_a_token_realm_on_another_host(aiohttp_server, make_client, caplog):
    caplog.set_level(logging.WARNING, logger="regcache.upstream")
    _, tokens, server = await bearer_registry(aiohttp_server, realm_host="127.0.0.2")
    client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD)
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert tokens.fetches[0]["authorization"] is None
    assert any("127.0.0.2" in r.getMessage() for r in caplog.records)


async def test_a_listed_token_realm_on_another_host_gets_the_credentials(aiohttp_server, make_client):
    _, tokens, server = await bearer_registry(aiohttp_server, realm_host="127.0.0.2")
    client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD, token_realms=["127.0.0.2"])
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert tokens.fetches[0]["authorization"] == BASIC


async def test_basic_challenge_is_answered_with_the_configured_credentials(aiohttp_server, make_client):
    registry = Registry(auth="basic")
    server = await aiohttp_server(registry.app())
    client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD)
    assert await client.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    assert await client.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    assert [auth for _, _, auth in registry.seen] == [None, BASIC, BASIC]


async def test_a_token_the_upstream_still_refuses_is_unauthorized(aiohttp_server, make_client):
    registry, tokens, server = await bearer_registry(aiohttp_server)
    registry.tokens = {"never-issued"}
    tokens.registry = None  # issued tokens are not accepted
    client = await make_client(server.make_url("/"))
    with pytest.raises(UpstreamUnauthorized) as caught:
        await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert caught.value.upstream == "registry.test"
    assert registry.unauthorized == 2  # answered once, then given up


async def test_ping_authenticates_without_a_repository_scope(aiohttp_server, make_client):
    _, tokens, server = await bearer_registry(aiohttp_server)
    client = await make_client(server.make_url("/"))
    await client.ping()
    assert tokens.fetches[0]["scope"] == f"repository:{REPO}:pull,push"  # the challenge's own scope


# -- redirects and streaming ----------------------------------------------------------


@pytest.fixture(params=["threads", "loop"])
def small_blob(request: pytest.FixtureRequest) -> int:
    """Both ways a blob body is read: on the transport's threads (what big blobs take), or on
    the loop through aiohttp (what a blob whose descriptor says it is small takes)."""
    return 0 if request.param == "threads" else len(BLOB)


async def test_a_blob_its_descriptor_says_is_small_comes_through_the_loop(aiohttp_server, make_client):
    server = await aiohttp_server(Registry().app())
    client = await make_client(server.make_url("/"), small_blob=len(BLOB))
    async with client.open_blob(REPO, BLOB_DIGEST, len(BLOB)) as small:
        assert small.body is None
        assert b"".join([c async for c in small.chunks]) == BLOB
    for size in (None, len(BLOB) + 1):  # unknown, or more than the limit: read on threads
        async with client.open_blob(REPO, BLOB_DIGEST, size) as big:
            assert big.body is not None
            assert b"".join([c async for c in big.chunks]) == BLOB


async def test_a_blob_body_cut_short_is_upstream_unavailable(aiohttp_server, make_client, small_blob):
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await response.prepare(request)
        await response.write(BLOB[:1000])
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", cut)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"), small_blob=small_blob)
    got = bytearray()
    with pytest.raises(UpstreamUnavailable):
        async with client.open_blob(REPO, BLOB_DIGEST, len(BLOB)) as stream:
            if stream.body is None:
                async for chunk in stream.chunks:
                    got += chunk
            else:
                buffer = bytearray(len(BLOB))
                while count := await asyncio.to_thread(stream.body.readinto, memoryview(buffer)):
                    got += buffer[:count]
    assert bytes(got) == BLOB[:1000]


async def test_blob_redirect_to_another_host_carries_no_authorization(aiohttp_server, make_client, small_blob):
    cdn_seen: list[str | None] = []

    async def cdn_blob(request: web.Request) -> web.Response:
        cdn_seen.append(request.headers.get("Authorization"))
        return web.Response(body=BLOB)

    cdn_app = web.Application()
    cdn_app.router.add_get("/cdn/blob", cdn_blob)
    cdn = await aiohttp_server(cdn_app, host="127.0.0.2")
    registry, _, server = await bearer_registry(aiohttp_server)
    registry.blob_location = str(cdn.make_url("/cdn/blob").with_query(sig="abc"))
    client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD, small_blob=small_blob)

    async with client.open_blob(REPO, BLOB_DIGEST, len(BLOB)) as stream:
        assert stream.size == len(BLOB)
        chunks = [chunk async for chunk in stream.chunks]
    assert b"".join(chunks) == BLOB
    assert len(chunks) > 1  # streamed, not read whole
    assert cdn_seen == [None]
    moved = [auth for _, path, auth in registry.seen if path.startswith("/moved/")]
    assert moved and all(auth and auth.startswith("Bearer ") for auth in moved)


async def test_endless_redirects_are_an_upstream_error(aiohttp_server, make_client):
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.path)

    app = web.Application()
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", loop)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"))
    with pytest.raises(UpstreamError, match="redirects"):
        await client.head_blob(REPO, BLOB_DIGEST)


async def test_blob_stream_timeout_mid_body_is_upstream_timeout(aiohttp_server, make_client, small_blob):
    done = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await response.prepare(request)
        await response.write(BLOB[:1000])
        await done.wait()
        return response

    app = web.Application()
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", stall)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"), read_timeout=0.2, small_blob=small_blob)
    try:
        with pytest.raises(UpstreamTimeout):
            async with client.open_blob(REPO, BLOB_DIGEST, len(BLOB)) as stream:
                async for _ in stream.chunks:
                    pass
    finally:
        done.set()


async def test_blob_streams_hold_a_concurrency_slot_until_closed(aiohttp_server, make_client, small_blob):
    registry = Registry()
    server = await aiohttp_server(registry.app())
    client = await make_client(server.make_url("/"), max_concurrency=1, small_blob=small_blob)
    async with client.open_blob(REPO, BLOB_DIGEST, len(BLOB)) as stream:
        head = asyncio.create_task(client.head_blob(REPO, BLOB_DIGEST))
        await asyncio.sleep(0.05)
        assert not head.done() and len(registry.seen) == 1
        assert b"".join([c async for c in stream.chunks]) == BLOB
    assert await head == len(BLOB)


# -- retries and error mapping ------------------------------------------------------


def flaky_app(statuses: list[int], headers: dict[str, str] | None = None) -> tuple[web.Application, list[int]]:
    """Answers each status in turn, then serves the blob."""
    served: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        if len(served) < len(statuses):
            served.append(statuses[len(served)])
            return web.Response(status=served[-1], headers=headers or {})
        served.append(200)
        return web.Response(body=BLOB)

    app = web.Application()
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", handler)
    return app, served


async def test_server_errors_are_retried_with_backoff_then_succeed(aiohttp_server, make_client, small_blob):
    app, served = flaky_app([503, 502])
    server = await aiohttp_server(app)
    sleeps = Sleeps()
    client = await make_client(server.make_url("/"), sleep=sleeps, retries=3, small_blob=small_blob)
    async with client.open_blob(REPO, BLOB_DIGEST, len(BLOB)) as stream:
        assert b"".join([c async for c in stream.chunks]) == BLOB
    assert served == [503, 502, 200]
    assert sleeps == [0.2, 0.4]


async def test_server_errors_that_persist_raise_upstream_server_error(aiohttp_server, make_client):
    app, served = flaky_app([500] * 10)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"), retries=2)
    with pytest.raises(UpstreamServerError) as caught:
        await client.head_blob(REPO, BLOB_DIGEST)
    assert caught.value.upstream == "registry.test"
    assert served == [500, 500, 500]


async def test_long_retry_after_raises_too_many_requests_at_once(aiohttp_server, make_client):
    app, served = flaky_app([429], {"Retry-After": "120"})
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"), retries=3)
    with pytest.raises(UpstreamTooManyRequests) as caught:
        await client.head_blob(REPO, BLOB_DIGEST)
    assert caught.value.retry_after == 120
    assert served == [429]


async def test_short_retry_after_is_waited_out(aiohttp_server, make_client):
    app, served = flaky_app([429], {"Retry-After": "1"})
    server = await aiohttp_server(app)
    sleeps = Sleeps()
    client = await make_client(server.make_url("/"), sleep=sleeps)
    assert await client.head_blob(REPO, BLOB_DIGEST) == len(BLOB)
    assert sleeps == [1.0] and served == [429, 200]


@pytest.mark.parametrize(
    ("header", "expected"),
    [("3", 3.0), ("0", 0.0), ("-5", 0.0), ("inf", None), ("nan", None), ("soon", None), (None, None)],
)
def test_retry_after_is_read_as_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after(header) == expected


def test_retry_after_may_be_an_http_date() -> None:
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 80 < (retry_after(later) or 0) <= 90


async def test_connection_refused_is_unavailable_within_the_retry_budget(make_client):
    sleeps = Sleeps()
    client = await make_client(f"http://127.0.0.1:{closed_port()}", sleep=sleeps, retries=10)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.head_manifest(REPO, "latest", [OCI_MANIFEST])
    assert type(caught.value) is UpstreamUnavailable
    assert 0 < sum(sleeps) <= RETRY_BUDGET


async def test_read_timeout_is_upstream_timeout(aiohttp_server, make_client):
    done = asyncio.Event()
    calls: list[str] = []

    async def hang(request: web.Request) -> web.Response:
        calls.append(request.path)
        await done.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get(r"/v2/{name:.+}/manifests/{reference}", hang)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"), read_timeout=0.2, retries=3)
    try:
        with pytest.raises(UpstreamTimeout):
            await client.get_manifest(REPO, "latest", [OCI_MANIFEST], max_size=1 << 20)
    finally:
        done.set()
    assert len(calls) == 2  # one retry of a timeout, not one per configured retry


@pytest.mark.parametrize(
    ("status", "error"), [(404, UpstreamNotFound), (403, UpstreamDenied), (401, UpstreamUnauthorized)]
)
async def test_client_errors_map_to_their_types(aiohttp_server, make_client, status, error):
    app, served = flaky_app([status] * 5)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"))
    with pytest.raises(error):
        await client.head_blob(REPO, BLOB_DIGEST)
    assert served == [status]  # not retried


# -- manifests, tags, search, headers ----------------------------------------------


async def test_manifest_over_max_size_is_refused(aiohttp_server, make_client):
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": OCI_MANIFEST})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(8):
            await response.write(b"x" * 1024)
        return response

    registry = Registry()
    app = registry.app()
    app.router.add_get(r"/chunked/v2/{name:.+}/manifests/{reference}", chunked)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"))
    with pytest.raises(ManifestTooLarge):  # told by Content-Length
        await client.get_manifest(REPO, "latest", [OCI_MANIFEST], max_size=len(MANIFEST) - 1)
    assert (await client.get_manifest(REPO, "latest", [OCI_MANIFEST], max_size=len(MANIFEST))).data == MANIFEST

    chunked_client = await make_client(server.make_url("/chunked"))
    with pytest.raises(ManifestTooLarge):  # no length given: counted while reading
        await chunked_client.get_manifest(REPO, "latest", [OCI_MANIFEST], max_size=4096)


async def test_tags_are_paged_with_the_upstreams_link_header(aiohttp_server, make_client):
    registry = Registry()
    server = await aiohttp_server(registry.app())
    client = await make_client(server.make_url("/"))
    tags, next_link = await client.list_tags(REPO, 2, None)
    assert tags == ["a", "b"]
    assert next_link == f"/v2/{REPO}/tags/list?n=2&last=b"
    tags, next_link = await client.list_tags(REPO, 2, "b")
    assert (tags, next_link) == (["c"], None)


async def test_accept_list_goes_out_as_one_header_and_rate_limits_are_reported(aiohttp_server, make_client):
    seen_accept: list[str | None] = []
    registry = Registry(extra_headers={"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "76;w=21600"})
    app = registry.app()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen_accept.append(request.headers.get("Accept"))
        return await handler(request)

    app.middlewares.append(record)
    server = await aiohttp_server(app)
    observer = RecordingObserver()
    client = await make_client(server.make_url("/"), observer=observer)
    await client.head_manifest(REPO, "latest", [OCI_MANIFEST, "application/vnd.oci.image.index.v1+json"])
    assert seen_accept == [f"{OCI_MANIFEST}, application/vnd.oci.image.index.v1+json"]
    assert observer.rate_limits == [("registry.test", 100, 76)]
    assert observer.done == [("registry.test", "manifest_head", "200")]


async def test_search_uses_the_configured_index(aiohttp_server, make_client):
    queries: list[dict[str, str]] = []

    async def search(request: web.Request) -> web.Response:
        queries.append(dict(request.query))
        assert "Authorization" not in request.headers
        return web.json_response({"results": [{"name": "library/alpine"}, {"name": "x/alpine"}]})

    app = web.Application()
    app.router.add_get("/v1/search", search)
    server = await aiohttp_server(app)
    client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD)
    assert await client.search("alpine", 5) == []  # no search_url, not Docker Hub

    client = await make_client(server.make_url("/"), search_url=str(server.make_url("/")))
    assert await client.search("alpine", 1) == [{"name": "library/alpine"}]
    assert queries == [{"q": "alpine", "n": "1"}]


# -- secrets --------------------------------------------------------------------------


async def test_password_and_tokens_never_reach_logs_or_errors(aiohttp_server, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = [PASSWORD, BASIC.removeprefix("Basic "), "tok-SECRET"]
    errors: list[BaseException] = []

    # A realm on another host (warning path) and one on the same host (credentials sent).
    for realm_host in ("127.0.0.2", "127.0.0.1"):
        registry, tokens, server = await bearer_registry(aiohttp_server, realm_host=realm_host)
        client = await make_client(server.make_url("/"), username=USERNAME, password=PASSWORD, retries=1)
        await client.get_manifest(REPO, "latest", [OCI_MANIFEST], max_size=1 << 20)
        registry.tokens.clear()
        tokens.registry = None  # from now on every token is refused
        for call in (
            client.head_manifest(REPO, "latest", [OCI_MANIFEST]),
            client.get_manifest("library/missing", "latest", [OCI_MANIFEST], max_size=10),
            client.head_blob(REPO, BLOB_DIGEST),
        ):
            with pytest.raises(UpstreamError) as caught:
                await call
            errors.append(caught.value)

    dead = await make_client(f"http://127.0.0.1:{closed_port()}", username=USERNAME, password=PASSWORD)
    with pytest.raises(UpstreamUnavailable) as caught:
        await dead.ping()
    errors.append(caught.value)

    texts = [r.getMessage() for r in caplog.records] + [str(r.args) for r in caplog.records]
    for error in errors:
        texts += [str(error), repr(error), str(error.__cause__), repr(error.__cause__)]
    assert any("127.0.0.2" in t for t in texts)  # the warning was logged, so logs were captured
    for secret in secrets:
        assert not [t for t in texts if secret in t]


class RecordingObserver:
    def __init__(self) -> None:
        self.done: list[tuple[str, str, str]] = []
        self.errors: list[tuple[str, str]] = []
        self.rate_limits: list[tuple[str, int | None, int | None]] = []

    def request_done(self, upstream: str, operation: str, status: str, seconds: float) -> None:
        self.done.append((upstream, operation, status))

    def error(self, upstream: str, kind: str) -> None:
        self.errors.append((upstream, kind))

    def rate_limit(self, upstream: str, limit: int | None, remaining: int | None) -> None:
        self.rate_limits.append((upstream, limit, remaining))


def test_ratelimit_window_is_read_only_from_ascii_digits() -> None:
    assert window("100;w=21600") == 21600
    assert window("100;w=\u00b2") is None  # a digit to str.isdigit(), not to int()
    assert window("100") is None and window(None) is None
