"""The OCI 1.1 referrers API through the cache, against a fake upstream: proxied answers,
filtering, pagination both ways, the fallback tag, and an upstream that goes down."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from tests.support.fake_upstream import OCI_INDEX, OCI_MANIFEST, FakeUpstream, Fault, digest_of

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
# As clients send it: "+" in a query string would be a space.
SIGNATURE_Q = quote(SIGNATURE, safe="")


def make_proxy(fake: FakeUpstream, data_dir, **upstream):  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=data_dir,
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0, **upstream)],
    )
    return create_app(settings)


@pytest.fixture
async def signed(fake):  # type: ignore[no-untyped-def]
    """An image with a signature and an SBOM, on an upstream that has the referrers API."""
    fake.referrers_api = True
    subject = fake.add_image("team/app", "1", [b"layer bytes"])
    sig = fake.add_artifact("team/app", subject, SIGNATURE, b"signature", {"org.example.signer": "ci"})
    sbom = fake.add_artifact("team/app", subject, SBOM, b'{"spdxVersion": "SPDX-2.3"}')
    return subject, sig, sbom


async def get_index(client, path: str):  # type: ignore[no-untyped-def]
    r = await client.get(path)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == OCI_INDEX
    body = json.loads(await r.read())
    assert body["schemaVersion"] == 2 and body["mediaType"] == OCI_INDEX
    return r, body["manifests"]


async def test_proxied_answer_lists_referrers_with_artifact_type_and_annotations(fake, signed, aiohttp_client,
                                                                                   tmp_path):
    subject, sig, sbom = signed
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    _, manifests = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert manifests == fake.referrers_of("team/app", subject)
    by_digest = {m["digest"]: m for m in manifests}
    assert by_digest[sig]["artifactType"] == SIGNATURE
    assert by_digest[sig]["annotations"] == {"org.example.signer": "ci"}
    assert by_digest[sbom]["artifactType"] == SBOM and by_digest[sbom]["mediaType"] == OCI_MANIFEST
    # The listed manifests are in the cache: fetching them needs no upstream.
    before = fake.count("GET", f"/manifests/{sig}")
    r = await client.get(f"/v2/team/app/manifests/{sig}")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == sig
    assert fake.count("GET", f"/manifests/{sig}") == before == 1


async def test_artifact_type_filter_is_applied_and_announced(fake, signed, aiohttp_client, tmp_path):
    subject, sig, _ = signed
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    r, manifests = await get_index(client, f"/v2/team/app/referrers/{subject}?artifactType={SIGNATURE_Q}")
    assert [m["digest"] for m in manifests] == [sig]
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    r, manifests = await get_index(client, f"/v2/team/app/referrers/{subject}?artifactType=application/none")
    assert manifests == [] and r.headers["OCI-Filters-Applied"] == "artifactType"
    r, _ = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert "OCI-Filters-Applied" not in r.headers


async def test_upstream_pages_are_followed_and_own_pages_are_linked(fake, signed, aiohttp_client, tmp_path):
    subject, sig, sbom = signed
    third = fake.add_artifact("team/app", subject, SIGNATURE, b"second signature")
    fake.referrers_page = 1
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    _, manifests = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert sorted(m["digest"] for m in manifests) == sorted([sig, sbom, third])
    assert fake.count("GET", "/referrers/") == 3
    # regcache's own pages: n entries and a Link to the next page, filter kept.
    seen = []
    path = f"/v2/team/app/referrers/{subject}?n=1&artifactType={SIGNATURE_Q}"
    while path:
        r, page = await get_index(client, path)
        assert len(page) == 1
        seen += [m["digest"] for m in page]
        link = r.headers.get("Link")
        path = link.split(";")[0].strip("<>") if link else ""
        assert not link or "artifactType=" in link
    assert sorted(seen) == sorted([sig, third])


async def test_answer_is_served_from_cache_within_the_ttl(fake, signed, aiohttp_client, tmp_path):
    subject, _, _ = signed
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    _, first = await get_index(client, f"/v2/team/app/referrers/{subject}")
    _, second = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert first == second and len(first) == 2
    assert fake.count("GET", "/referrers/") == 1


async def test_stale_answer_is_revalidated_and_served_when_the_upstream_is_down(fake, signed, aiohttp_client,
                                                                                tmp_path):
    subject, sig, _ = signed
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data", tag_ttl=0))
    _, cached = await get_index(client, f"/v2/team/app/referrers/{subject}")
    newer = fake.add_artifact("team/app", subject, SIGNATURE, b"a later signature")
    _, revalidated = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert newer in [m["digest"] for m in revalidated] and len(revalidated) == len(cached) + 1
    fake.faults["referrers"] = Fault("status", status=503)
    fake.faults["manifest"] = Fault("status", status=503)
    _, stale = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert stale == revalidated
    r = await client.get(f"/v2/team/app/manifests/{sig}")
    assert r.status == 200


async def test_upstream_down_with_nothing_cached_is_unavailable_not_empty(fake, signed, aiohttp_client, tmp_path):
    subject, _, _ = signed
    fake.faults["referrers"] = Fault("status", status=503)
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    r = await client.get(f"/v2/team/app/referrers/{subject}")
    assert r.status == 503
    assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_without_the_api_the_fallback_tag_is_synthesized(fake, aiohttp_client, tmp_path):
    subject = fake.add_image("team/app", "1", [b"layer bytes"])
    sig = fake.add_artifact("team/app", subject, SIGNATURE, b"signature")
    listed = fake.referrers_of("team/app", subject)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}).encode()
    fallback = "sha256-" + subject.split(":")[1]
    fake.manifests[("team/app", fallback)] = (OCI_INDEX, index)
    fake.manifests[("team/app", digest_of(index))] = (OCI_INDEX, index)
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    _, manifests = await get_index(client, f"/v2/team/app/referrers/{subject}")
    assert manifests == listed and manifests[0]["digest"] == sig
    assert fake.count("GET", f"/manifests/{fallback}") == 1
    # The API's absence is remembered: the next check goes to the tag alone.
    other = fake.add_image("team/app", "2", [b"other layer"])
    _, none = await get_index(client, f"/v2/team/app/referrers/{other}")
    assert none == [] and fake.count("GET", "/referrers/") == 1


async def test_unknown_subject_gets_an_empty_index(fake, aiohttp_client, tmp_path):
    fake.referrers_api = True
    fake.add_image("team/app", "1", [b"layer bytes"])
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    _, manifests = await get_index(client, "/v2/team/app/referrers/sha256:" + "0" * 64)
    assert manifests == []


@pytest.mark.parametrize("digest", ["sha256:xyz", "md5:" + "0" * 32, "latest", "sha256:" + "A" * 64])
async def test_malformed_subject_is_digest_invalid(fake, aiohttp_client, tmp_path, digest):
    client = await aiohttp_client(make_proxy(fake, tmp_path / "data"))
    r = await client.get(f"/v2/team/app/referrers/{digest}")
    assert r.status == 400
    assert (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"
