"""Referrers in the cache's lifecycle: they live while their subject lives, a pin of the subject
covers them, and rmi or eviction of the subject takes them along."""

from __future__ import annotations

from config.settings import Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH
from tests.support.fake_upstream import FakeUpstream, Fault, digest_of

SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"


async def cached_with_signature(client, fake: FakeUpstream, repository: str) -> tuple[str, str, bytes]:  # type: ignore[no-untyped-def]
    """An image pulled through with its signature, every blob stored: (subject, signature, payload)."""
    subject = fake.add_image(repository, "1", [f"layer of {repository}".encode() * 50])
    payload = f"signature of {repository}".encode()
    sig = fake.add_artifact(repository, subject, SIGNATURE, payload)
    assert (await client.get(f"/v2/{repository}/manifests/1")).status == 200
    r = await client.get(f"/v2/{repository}/referrers/{subject}")
    assert r.status == 200 and sig in await r.text()
    await client.server.app[PULLTHROUGH].fills.settle()
    return subject, sig, payload


def stored(data_dir, digest: str) -> bool:  # type: ignore[no-untyped-def]
    return (data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()


async def proxy(aiohttp_client, fake: FakeUpstream, data_dir, **storage):  # type: ignore[no-untyped-def]
    fake.referrers_api = True
    settings = Settings(
        data_dir=data_dir, storage=StorageSettings(**storage),
        upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=0)],
    )
    return await aiohttp_client(create_app(settings))


async def test_rmi_of_the_subject_removes_its_referrers_and_their_blobs(fake, aiohttp_client, tmp_path):
    data = tmp_path / "data"
    client = await proxy(aiohttp_client, fake, data)
    subject, sig, payload = await cached_with_signature(client, fake, "team/app")
    assert stored(data, sig) and stored(data, digest_of(payload))
    lifecycle = client.server.app[LIFECYCLE]
    key = await lifecycle.resolve("fake.test", "team/app", "1")
    report = await lifecycle.remove_image(key)
    assert report is not None
    assert sorted(i.manifest for i in report.images) == sorted([subject, sig])
    assert not stored(data, sig) and not stored(data, digest_of(payload))
    # What the cache held changed: the next answer asks the upstream again, within the TTL.
    asked = fake.count("GET", "/referrers/")
    r = await client.get(f"/v2/team/app/referrers/{subject}")
    assert r.status == 200 and sig in await r.text()
    assert fake.count("GET", "/referrers/") == asked + 1


async def test_eviction_keeps_a_pinned_subjects_referrers_and_takes_the_others_with_theirs(
    fake, aiohttp_client, tmp_path
):
    data = tmp_path / "data"
    client = await proxy(aiohttp_client, fake, data, gc_grace=0)
    kept_subject, kept_sig, kept_payload = await cached_with_signature(client, fake, "team/kept")
    gone_subject, gone_sig, gone_payload = await cached_with_signature(client, fake, "team/gone")
    lifecycle = client.server.app[LIFECYCLE]
    assert await lifecycle.pin(await lifecycle.resolve("fake.test", "team/kept", "1"))
    # A budget nothing fits: eviction takes every unit that is not pinned.
    lifecycle.settings = lifecycle.settings.model_copy(update={"max_size": 1})
    report = await lifecycle.gc()
    assert sorted(i.manifest for i in report.images) == sorted([gone_subject, gone_sig])
    assert stored(data, kept_sig) and stored(data, digest_of(kept_payload))
    assert not stored(data, gone_sig) and not stored(data, digest_of(gone_payload))
    # The pinned image's signature is still answered with the upstream down.
    fake.faults["referrers"] = Fault("status", status=503)
    metadata = client.server.app[METADATA]
    repo_id = await metadata.repository_id("fake.test", "team/kept")
    assert [row.digest for row in await metadata.referrers.referrers(repo_id, kept_subject)] == [kept_sig]
    r = await client.get(f"/v2/team/kept/referrers/{kept_subject}")
    assert r.status == 200 and kept_sig in await r.text()
