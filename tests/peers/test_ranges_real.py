"""Range and conditional requests answered as the distribution registry answers them.

Each case asks the real registry (the anchor) and regcache in front of it the same
question and compares what the bytes say: the status, which bytes of the blob the
answer carries (every one checked against the blob), ``Content-Range`` on a 416, and
the validators. Multipart framing may differ where RFC 9110 lets a server choose
(regcache coalesces overlapping ranges, Go's net/http sends them as asked), the bytes
may not.

regcache is asked in the three states a blob can be in, on both backends:
cold (its first request), filling (a fill is under way, held at half the blob by a
relay in front of the registry, so it cannot end while the case runs) and cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import S3Settings, Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import PULLTHROUGH
from storage.blobs import FLUSH_BYTES
from storage.oci.digest import Digest
from tests.support import byteranges
from tests.support.gatedrelay import GatedRelay
from tests.support.registry import Registry

REPOSITORY = "ranges/blob"
BLOB = os.urandom(4 * 1024 * 1024 + 12345)
SIZE = len(BLOB)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HALF = SIZE // 2  # where the relay holds a fill's body
# A fill hands its bytes to the spool in batches: this much of the held half is
# surely readable from the spool.
LANDED = HALF - FLUSH_BYTES
PATH = f"/v2/{REPOSITORY}/blobs/{DIGEST}"

RANGES = {
    "single": "bytes=0-9",
    "single past the held half": "bytes=3000000-3065535",
    "suffix": "bytes=-4096",
    "suffix longer than the blob": f"bytes=-{SIZE * 2}",
    "open-ended": "bytes=4000000-",
    "open-ended from 0": "bytes=0-",
    "last position past the end": f"bytes=10-{SIZE * 3}",
    "multi": "bytes=0-9,1000-1999,4000000-4000099",
    "multi out of order": "bytes=4000000-4000099,0-9",
    "overlapping": "bytes=0-99,50-149",
    "overlapping whole": "bytes=0-,0-",
    "unsatisfiable": f"bytes={SIZE}-",
    "unsatisfiable multi": f"bytes={SIZE}-,{SIZE + 10}-{SIZE + 20}",
    "partly unsatisfiable": f"bytes=0-9,{SIZE}-",
}
IF_RANGES = {
    "this blob": f'"{DIGEST}"',
    "another blob": '"sha256:0000"',
    "weak tag of this blob": f'W/"{DIGEST}"',
    "a date": "Wed, 21 Oct 2015 07:28:00 GMT",
}
STATES = ["cold", "filling", "cached"]


def _push(registry: Registry) -> None:
    """The blob, uploaded to the registry through its API (no manifest needed for blob GETs)."""
    start = urllib.request.Request(f"{registry.url}/v2/{REPOSITORY}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start) as r:
        location = r.headers["Location"]
    target = location if location.startswith("http") else registry.url + location
    target += ("&" if "?" in target else "?") + f"digest={DIGEST}"
    put = urllib.request.Request(target, data=BLOB, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(put) as r:
        assert r.status == 201


@pytest.fixture(scope="module")
def anchor(upstream: Registry) -> Registry:
    _push(upstream)
    return upstream


Answer = tuple[int, dict[str, str], bytes]


async def _ask(session: Any, url: str, headers: dict[str, str], method: str = "GET") -> Answer:
    async with session.request(method, url, headers=headers) as r:
        # distribution's 416 keeps the blob's Content-Length over Go's short error text:
        # its body cannot be read, and says nothing.
        return r.status, dict(r.headers), b"" if r.status == 416 else await r.read()


@pytest.fixture(params=["filesystem", "s3"])
def storage(request: pytest.FixtureRequest) -> StorageSettings:
    if request.param == "filesystem":
        return StorageSettings()
    rgw = request.getfixturevalue("rgw")
    return StorageSettings(backend="s3", s3=S3Settings(**rgw.s3_settings(rgw.make_bucket())))


@pytest.fixture
async def regcache(anchor, storage, aiohttp_server, aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    """Starts a regcache in front of the anchor (behind the relay) with the blob in ``state``."""
    relay = GatedRelay(anchor.url, hold_at=HALF)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay.handle)
    relay_server = await aiohttp_server(app)
    started: list[Any] = []
    filling: list[tuple[aiohttp.ClientResponse, bytes]] = []
    kept: dict[str, Any] = {}

    async def make(state: str, *, keep: bool = False) -> tuple[Any, GatedRelay]:
        """With ``keep``, a cache already made in ``state`` by this test is handed out again:
        a cached blob stays cached whatever ranges were asked of it."""
        if keep and state in kept:
            relay.range_gets.clear()
            return kept[state], relay
        settings = Settings(
            data_dir=tmp_path / f"data-{len(started)}",
            upstreams=[UpstreamSettings(name="upstream.test", url=str(relay_server.make_url("")).rstrip("/"),
                                        default=True, prefetch=0)],
            storage=storage,
        )
        client = await aiohttp_client(create_app(settings))
        started.append(client)
        if state == "filling":
            # The first half is in the fill's spool once a reader of the fill has it.
            whole = await client.get(PATH)
            filling.append((whole, await whole.content.readexactly(LANDED)))
        elif state == "cached":
            relay.gate.set()
            status, _, body = await _ask(client, PATH, {})
            assert (status, body) == (200, BLOB)
            await client.app[PULLTHROUGH].fills.settle()
            relay.gate.clear()
        relay.range_gets.clear()
        if keep:
            kept[state] = client
        return client, relay

    yield make
    relay.gate.set()
    for whole, first in filling:
        assert first + await whole.read() == BLOB, "the fill the ranges joined ends with the whole blob"
    await relay.close()


def _bytes_of(answer: Answer) -> tuple[str, list[tuple[int, int]] | str]:
    """What an answer says about the blob: the bytes it carries (all of them, checked),
    or for a 416 the size it names. A 200 and a 206 of every byte say the same (asked
    for ``0-,0-``, Go's net/http sends the 200, regcache coalesces to one range)."""
    status, headers, body = answer
    if status == 200:
        assert body == BLOB
        return "content", [(0, SIZE)]
    if status == 206:
        parts = byteranges.parts(status, headers, body)
        byteranges.check_against(BLOB, parts)
        return "content", byteranges.covered(parts)
    if status == 416:
        return "416", headers["Content-Range"]
    return str(status), ""


def _same(ours: Answer, theirs: Answer) -> None:
    assert _bytes_of(ours) == _bytes_of(theirs)
    for name in ("ETag", "Cache-Control", "Docker-Content-Digest"):
        if theirs[0] != 416:  # distribution's 416 is Go's plain error, without its headers
            assert ours[1].get(name) == theirs[1].get(name), name


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("case", list(RANGES))
async def test_ranges_answer_as_distribution_does(regcache, anchor, state: str, case: str) -> None:
    client, _ = await regcache(state)
    headers = {"Range": RANGES[case]}
    async with aiohttp.ClientSession() as direct:
        theirs = await _ask(direct, anchor.url + PATH, headers)
    _same(await _ask(client, PATH, headers), theirs)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("case", list(IF_RANGES))
async def test_if_range_applies_as_distribution_applies_it(regcache, anchor, state: str, case: str) -> None:
    client, relay = await regcache(state)
    headers = {"Range": "bytes=3000000-3000099", "If-Range": IF_RANGES[case]}
    async with aiohttp.ClientSession() as direct:
        theirs = await _ask(direct, anchor.url + PATH, headers)
    if theirs[0] == 200:
        relay.gate.set()  # the whole blob: the fill must be let through
    _same(await _ask(client, PATH, headers), theirs)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_validators_and_304_as_distribution(regcache, anchor, state: str, method: str) -> None:
    client, relay = await regcache(state)
    relay.gate.set()  # the whole blob is asked for
    async with aiohttp.ClientSession() as direct:
        for headers in ({}, {"If-None-Match": f'"{DIGEST}"'}):
            theirs = await _ask(direct, anchor.url + PATH, headers, method)
            ours = await _ask(client, PATH, headers, method)
            assert ours[0] == theirs[0]
            for name in ("ETag", "Cache-Control", "Docker-Content-Digest"):
                assert ours[1].get(name) == theirs[1].get(name), name
            assert ours[1]["Accept-Ranges"] == "bytes"
            if theirs[0] == 200 and method == "GET":
                assert ours[2] == BLOB


async def test_a_range_the_fill_has_landed_comes_from_the_spool(regcache) -> None:
    client, relay = await regcache("filling")
    status, _, body = await _ask(client, PATH, {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, BLOB[1000:2000])
    assert relay.range_gets == [], "no upstream request for bytes the cache has"
    status, _, body = await _ask(client, PATH, {"Range": "bytes=-4096"})
    assert (status, body) == (206, BLOB[-4096:])
    assert relay.range_gets == [f"bytes={SIZE - 4096}-{SIZE - 1}"], "the rest from the upstream's own 206"


async def test_a_cold_range_is_answered_before_the_fills_get_is_and_later_ranges_ask_no_head(regcache) -> None:
    client, relay = await regcache("cold")
    relay.hold_answer = True  # the fill's whole-blob GET gets no answer until the gate opens
    pullthrough = client.app[PULLTHROUGH]
    async with asyncio.timeout(30):  # a guard against a hang (waiting for the fill), not a pace
        status, headers, body = await _ask(client, PATH, {"Range": "bytes=-4096"})
    assert (status, body, headers["Content-Range"]) == (206, BLOB[-4096:], f"bytes {SIZE - 4096}-{SIZE - 1}/{SIZE}")
    assert relay.range_gets == ["bytes=-4096"], "the suffix went to the upstream as asked"
    # The next read of a lazy puller (the range the footer names), while the fill still waits.
    status, headers, body = await _ask(client, PATH, {"Range": "bytes=1000-1999,3000000-3000099"})
    parts = byteranges.parts(status, headers, body)
    byteranges.check_against(BLOB, parts)
    assert byteranges.covered(parts) == [(1000, 2000), (3000000, 3000100)]
    assert relay.heads == 0, "the fill's own repository needs no HEAD"
    assert relay.whole_gets == 1 and len(pullthrough.fills) == 1
    relay.gate.set()
    await pullthrough.fills.settle()
    assert b"".join([chunk async for chunk in pullthrough.store.read(Digest.parse(DIGEST))]) == BLOB


async def test_a_cold_range_starts_one_full_fill_and_stores_only_the_verified_blob(regcache) -> None:
    client, relay = await regcache("cold")
    pullthrough = client.app[PULLTHROUGH]
    status, _, body = await _ask(client, PATH, {"Range": "bytes=-4096"})
    assert (status, body) == (206, BLOB[-4096:])
    assert len(pullthrough.fills) == 1, "the whole blob is on its way"
    relay.gate.set()
    await pullthrough.fills.settle()
    assert b"".join([chunk async for chunk in pullthrough.store.read(Digest.parse(DIGEST))]) == BLOB


SPEC = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, SIZE + 10), st.integers(0, SIZE + 10)),
    st.builds(lambda a: f"{a}-", st.integers(0, SIZE + 10)),
    st.builds(lambda n: f"-{n}", st.integers(0, SIZE + 10)),
    st.sampled_from(["", " ", "x", "-", "1-2-3", "²-5"]),
)
HEADER = st.one_of(
    st.lists(SPEC, min_size=1, max_size=8).map(lambda specs: "bytes=" + ",".join(specs)),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)


@pytest.mark.parametrize("state", ["cold", "cached"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HEADER)
async def test_any_range_header_gives_right_bytes_and_never_a_500(regcache, state: str, value: str) -> None:
    # A cold cache is made for every example; one cached cache answers them all.
    client, relay = await regcache(state, keep=state == "cached")
    relay.gate.set()  # an ignored Range asks for the whole blob
    answer = await _ask(client, PATH, {"Range": value})
    assert answer[0] in (200, 206, 416), (value, answer[0], answer[2][:200])
    _bytes_of(answer)  # every byte carried is the blob's own, at its place
