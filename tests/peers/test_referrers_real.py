"""Referrers through the cache with the real distribution registry as upstream. distribution 2.8
has no referrers API: the answer is synthesized from the fallback tag and from the manifests
with a ``subject`` the cache holds; it survives save -> load into a cache with no upstream."""

from __future__ import annotations

import itertools
import json
from urllib.parse import quote

import pytest

from tests.support.archive import proxy_for
from tests.support.artifacts import OCI_INDEX, push_artifact, push_image

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
_repos = itertools.count()


@pytest.fixture
def signed(upstream):  # type: ignore[no-untyped-def]
    """A fresh repository with an image, a signature and an SBOM (fallback tag kept up to date)."""
    repository = f"referrers/app{next(_repos)}"
    subject = push_image(upstream, repository, "1", f"layer of {repository}".encode())
    sig = push_artifact(upstream, repository, subject, SIGNATURE, b"signature", {"org.example.signer": "ci"})
    sbom = push_artifact(upstream, repository, subject, SBOM, b'{"spdxVersion": "SPDX-2.3"}')
    return repository, subject[0], sig, sbom, subject


@pytest.fixture
async def proxy(aiohttp_client, tmp_path, upstream):  # type: ignore[no-untyped-def]
    return await proxy_for(aiohttp_client, tmp_path / "one", upstream.url)


@pytest.fixture
async def offline(aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    return await proxy_for(aiohttp_client, tmp_path / "two", "http://127.0.0.1:9")


async def referrers(client, repository: str, subject: str, query: str = "") -> tuple[dict, list[dict]]:  # type: ignore[no-untyped-def]
    r = await client.get(f"/v2/{repository}/referrers/{subject}{query}")
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == OCI_INDEX
    return dict(r.headers), json.loads(await r.read())["manifests"]


async def test_registry_without_the_api_gets_an_answer_from_its_fallback_tag(proxy, upstream, signed):
    repository, subject, sig, sbom, _ = signed
    assert upstream.request("GET", f"/v2/{repository}/referrers/{subject}").status == 404  # the anchor
    _, manifests = await referrers(proxy, repository, subject)
    assert sorted(m["digest"] for m in manifests) == sorted([sig, sbom])
    by_digest = {m["digest"]: m for m in manifests}
    assert by_digest[sig]["artifactType"] == SIGNATURE
    assert by_digest[sig]["annotations"] == {"org.example.signer": "ci"}
    assert by_digest[sbom]["artifactType"] == SBOM
    headers, filtered = await referrers(proxy, repository, subject, f"?artifactType={quote(SBOM, safe='')}")
    assert [m["digest"] for m in filtered] == [sbom] and headers["OCI-Filters-Applied"] == "artifactType"
    # Clients that read the fallback tag themselves still get the registry's index.
    r = await proxy.get(f"/v2/{repository}/manifests/{subject.replace(':', '-')}")
    assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX


async def test_manifests_with_a_subject_held_by_the_cache_join_the_answer(proxy, upstream, signed):
    repository, subject, sig, sbom, subject_pair = signed
    # Pushed without updating the fallback tag: only the cache, having fetched it, knows it refers.
    attestation = push_artifact(upstream, repository, subject_pair, "application/vnd.in-toto+json",
                                b'{"predicateType": "x"}', fallback_tag=False)
    _, before = await referrers(proxy, repository, subject)
    assert attestation not in [m["digest"] for m in before]
    r = await proxy.get(f"/v2/{repository}/manifests/{attestation}")
    assert r.status == 200
    _, after = await referrers(proxy, repository, subject)
    assert sorted(m["digest"] for m in after) == sorted([sig, sbom, attestation])


async def test_referrers_travel_with_save_and_load_to_a_cache_without_upstream(proxy, offline, signed):
    repository, subject, sig, sbom, _ = signed
    r = await proxy.post("/admin/save", json={"images": [f"{repository}:1"]})
    assert r.status == 200, await r.text()
    archive = await r.read()
    _, online = await referrers(proxy, repository, subject)
    r = await offline.post("/admin/load", data=archive)
    assert r.status == 200, await r.text()
    _, loaded = await referrers(offline, repository, subject)
    assert loaded == online
    assert sorted(m["digest"] for m in loaded) == sorted([sig, sbom])
    for descriptor in loaded:
        r = await offline.get(f"/v2/{repository}/manifests/{descriptor['digest']}")
        assert r.status == 200
        layer = json.loads(await r.read())["layers"][0]["digest"]
        r = await offline.get(f"/v2/{repository}/blobs/{layer}")
        assert r.status == 200
