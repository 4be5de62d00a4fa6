"""GC, rmi and listings across replicas on one bucket of a real Ceph RGW.

Replicas are in-process apps (``create_app``) with their own data directories, the upstream is
the in-process fake so every upstream request is counted, and the object store is real. What
is proven: a blob leaves the bucket only when no replica's image record reaches it, one replica
sweeps at a time, ``rmi`` on one replica is seen by the others' ``images``, and a replica that
starts on a used bucket deletes nothing.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os

import pytest

from config.settings import AdminSettings, S3Settings, Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import LIFECYCLE, PULLTHROUGH
from storage.oci.manifests import OCI_INDEX, OCI_MANIFEST
from tests.support.fake_upstream import FakeUpstream, digest_of, make_image
from tests.support.s3 import blob_key, leases

TOKEN = "s3-gc-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
OCI_ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


@pytest.fixture
def bucket(rgw) -> str:
    return rgw.make_bucket()


@pytest.fixture
def replica(fake, rgw, bucket, aiohttp_client, tmp_path):
    """``await replica(name, **storage)``: one regcache app on the test's bucket with the admin API on."""

    async def make(name: str, **storage: object):  # type: ignore[no-untyped-def]
        settings = Settings(
            data_dir=tmp_path / name,
            upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=1)],
            storage=StorageSettings(backend="s3", s3=S3Settings(**rgw.s3_settings(bucket)), **storage),
            admin=AdminSettings(token=TOKEN),
        )
        return await aiohttp_client(create_app(settings))

    return make


async def pull(client, repository: str, reference: str) -> list[str]:
    """What a client does: the manifest by tag, each platform's manifest, every blob. Returns blob digests."""
    r = await client.get(f"/v2/{repository}/manifests/{reference}", headers=OCI_ACCEPT)
    assert r.status == 200, await r.text()
    document = json.loads(await r.read())
    manifests = [document]
    for child in document.get("manifests", []):
        r = await client.get(f"/v2/{repository}/manifests/{child['digest']}", headers=OCI_ACCEPT)
        assert r.status == 200, await r.text()
        manifests.append(json.loads(await r.read()))
    blobs = []
    for manifest in manifests:
        for descriptor in [manifest.get("config"), *manifest.get("layers", [])]:
            if descriptor is None:
                continue
            r = await client.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
            assert r.status == 200
            assert digest_of(await r.read()) == descriptor["digest"]
            blobs.append(descriptor["digest"])
    return blobs


async def listed(client) -> list[tuple[list[str], list[str]]]:
    r = await client.get("/admin/images", headers=ADMIN)
    assert r.status == 200, await r.text()
    return sorted((sorted(i["RepoTags"]), sorted(i["RepoDigests"])) for i in (await r.json())["images"])


async def aged(rgw, bucket: str) -> None:
    """Until the store's clock (whole seconds in its Date header) is past every blob's LastModified,
    so that a removal with no grace may take what is in the bucket now."""
    client = rgw.client()
    newest = max(item["LastModified"] for item in client.list_objects_v2(Bucket=bucket, Prefix="blobs/")["Contents"])
    while True:
        date = client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]["date"]
        if email.utils.parsedate_to_datetime(date) > newest:
            return
        await asyncio.sleep(0.1)


async def orphan(rgw, bucket: str) -> str:
    """A blob in the bucket that no image references (as a fill whose manifest never came leaves)."""
    data = os.urandom(4096)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    rgw.client().put_object(Bucket=bucket, Key=blob_key(digest), Body=data)
    await aged(rgw, bucket)
    return digest


def add_index(fake: FakeUpstream, repository: str, tag: str, platforms: dict[str, list[bytes]]) -> str:
    """A two-platform OCI index in the fake upstream; the children are known by digest only."""
    children = []
    for arch, layers in platforms.items():
        manifest, blobs = make_image(layers, json.dumps({"architecture": arch, "os": "linux"}).encode())
        digest = digest_of(manifest)
        fake.manifests[(repository, digest)] = (OCI_MANIFEST, manifest)
        for blob_digest, data in blobs.items():
            fake.blobs[(repository, blob_digest)] = data
        children.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                         "platform": {"architecture": arch, "os": "linux"}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    fake.manifests[(repository, tag)] = (OCI_INDEX, index)
    fake.manifests[(repository, digest_of(index))] = (OCI_INDEX, index)
    fake.tags.setdefault(repository, []).append(tag)
    return digest_of(index)


async def test_rmi_on_one_replica_removes_the_image_from_every_replica(fake, rgw, bucket, replica):
    manifest = fake.add_image("team/app", "1", [os.urandom(3000)], config=b'{"os": "linux", "app": 1}')
    kept = fake.add_image("team/other", "2", [os.urandom(2000)])  # shares no blob with team/app
    a, b = await replica("a", gc_grace=0), await replica("b", gc_grace=0)
    blobs = await pull(b, "team/app", "1")  # recorded by B only
    await pull(a, "team/other", "2")  # recorded by A only
    # Both replicas list both images: each adopted what the other recorded.
    assert await listed(a) == await listed(b)
    assert len(await listed(a)) == 2
    await aged(rgw, bucket)  # gc_grace is 0: what the pulls wrote may go at once
    r = await a.post("/admin/rmi", json={"images": ["team/app:1"]}, headers=ADMIN)
    assert r.status == 200
    lines = (await r.json())["results"][0]["lines"]
    assert any(line.startswith("Untagged: ") and "team/app:1" in line for line in lines), lines
    # Gone from the bucket's records, from B's listing, and its blobs (nothing else used them) from the bucket.
    records = rgw.keys(bucket, "repositories/")
    assert not [k for k in records if "/team/app/" in k]
    after_a, after_b = await listed(a), await listed(b)
    assert after_a == after_b
    assert [tags for tags, _ in after_b] == [["team/other:2"]]
    stored = set(rgw.keys(bucket, "blobs/"))
    for digest in [manifest, *blobs]:
        assert blob_key(digest) not in stored, digest
    assert blob_key(kept) in stored
    # B no longer serves the removed image from stale rows: the manifest is fetched again.
    assert fake.count("GET", f"/manifests/{manifest}") == 0
    await pull(b, "team/app", "1")
    assert fake.count("GET", "/team/app/manifests/1") == 2


async def test_gc_on_one_replica_keeps_what_an_image_only_another_replica_recorded(fake, rgw, bucket, replica):
    index = add_index(fake, "team/multi", "1", {"amd64": [os.urandom(3000)], "arm64": [os.urandom(3000)]})
    a, b = await replica("a"), await replica("b")
    blobs = await pull(b, "team/multi", "1")  # A's SQLite knows nothing of it
    stray = await orphan(rgw, bucket)
    # A's SQLite has no row of it: its sweep reads B's records and the manifests from the bucket.
    report = await a.server.app[LIFECYCLE].sweep(grace=0)
    assert (report.blobs, report.sweep_skipped) == (1, False)
    stored = set(rgw.keys(bucket, "blobs/"))
    assert blob_key(stray) not in stored
    for digest in [index, *blobs]:
        assert blob_key(digest) in stored, digest
    # Every child manifest is kept too (reached through the index read from the bucket).
    document = json.loads(fake.manifests[("team/multi", index)][1])
    for child in document["manifests"]:
        assert blob_key(child["digest"]) in stored
    # And B still serves all of it without another upstream fetch.
    before = len(fake.requests)
    await pull(b, "team/multi", "1")
    assert [p for m, p, _ in fake.requests[before:] if "/blobs/" in p] == []


async def test_sweep_leaves_young_and_in_use_blobs_alone(fake, rgw, bucket, replica):
    (a,) = [await replica("a")]
    young = await orphan(rgw, bucket)
    report = await a.server.app[LIFECYCLE].sweep(grace=3600)  # written a moment ago: a fill's, perhaps
    assert report.blobs == 0
    assert blob_key(young) in rgw.keys(bucket, "blobs/")
    # This replica is about to answer with it (the pull path's lease): not deleted under it.
    lease = a.server.app[PULLTHROUGH].in_use.lease(young)
    report = await a.server.app[LIFECYCLE].sweep(grace=0)
    assert (report.blobs, report.deferred) == (0, 1)
    assert blob_key(young) in rgw.keys(bucket, "blobs/")
    lease.release()
    report = await a.server.app[LIFECYCLE].sweep(grace=0)
    assert report.blobs == 1
    assert blob_key(young) not in rgw.keys(bucket, "blobs/")


async def test_concurrent_sweeps_on_two_replicas_only_one_runs(fake, rgw, bucket, replica):
    a, b = await replica("a"), await replica("b")
    stray = await orphan(rgw, bucket)
    collector = a.server.app[LIFECYCLE].collector.shared
    # A's sweep is held right after it took the lease, as a long sweep over a big bucket would be.
    holding, go_on = asyncio.Event(), asyncio.Event()
    live = collector.live

    async def slow_live() -> set[str]:
        holding.set()
        await go_on.wait()
        return await live()

    collector.live = slow_live
    sweeping = asyncio.create_task(a.server.app[LIFECYCLE].sweep(grace=0))
    await asyncio.wait_for(holding.wait(), 30)
    assert leases(rgw, bucket) == ["leases/gc"]
    skipped = await b.server.app[LIFECYCLE].sweep(grace=0)
    assert (skipped.sweep_skipped, skipped.blobs) == (True, 0)
    assert blob_key(stray) in rgw.keys(bucket, "blobs/")
    go_on.set()
    done = await sweeping
    assert (done.sweep_skipped, done.blobs) == (False, 1)
    assert blob_key(stray) not in rgw.keys(bucket, "blobs/")
    assert leases(rgw, bucket) == []
    # With the lease free again, B sweeps.
    assert (await b.server.app[LIFECYCLE].sweep(grace=0)).sweep_skipped is False


async def test_a_replica_starting_on_a_used_bucket_deletes_nothing(fake, rgw, bucket, replica):
    fake.add_image("team/app", "1", [os.urandom(3000)])
    a = await replica("a")
    await pull(a, "team/app", "1")
    stray = await orphan(rgw, bucket)  # not referenced by anything, and young: only a sweep may judge it
    before = set(rgw.keys(bucket, "blobs/"))
    late = await replica("late")  # its startup recovery sees objects no row of its own knows
    assert set(rgw.keys(bucket, "blobs/")) == before
    assert blob_key(stray) in before
    # It serves the image from the bucket at once.
    fetched = len(fake.requests)
    await pull(late, "team/app", "1")
    assert [p for m, p, _ in fake.requests[fetched:] if "/blobs/" in p] == []


async def test_rmi_of_one_tag_removes_only_that_tag_record(fake, rgw, bucket, replica):
    layer = os.urandom(3000)
    fake.add_image("team/app", "1", [layer])
    fake.add_image("team/app", "stable", [layer])  # the same manifest under two tags
    a, b = await replica("a"), await replica("b")
    await pull(a, "team/app", "1")
    await pull(a, "team/app", "stable")
    assert [tags for tags, _ in await listed(b)] == [["team/app:1", "team/app:stable"]]
    r = await b.post("/admin/rmi", json={"images": ["team/app:stable"]}, headers=ADMIN)
    assert (await r.json())["results"][0]["lines"] == ["Untagged: team/app:stable"]
    tag_records = [k for k in rgw.keys(bucket, "repositories/") if "/_tags/" in k]
    assert tag_records == ["repositories/fake.test/team/app/_tags/1"]
    assert [tags for tags, _ in await listed(a)] == [["team/app:1"]]
