"""The S3 backend against a real Ceph RADOS Gateway, with replicas as in-process apps.

The upstream is the in-process fake (tests/support/fake_upstream.py) so faults can be injected and every
upstream request counted; the object store is real (the session ``rgw`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest
from aiohttp import ClientPayloadError, ServerDisconnectedError

from config.settings import S3Settings, Settings, StorageSettings, UpstreamSettings
from proxy.app import create_app
from proxy.resources import PULLTHROUGH
from storage.backends.s3 import S3Backend
from tests.support.fake_upstream import Fault, digest_of
from tests.support.s3 import PART, blob_key, leases

BIG = os.urandom(2 * PART + 12345)  # three multipart parts
SMALL = os.urandom(70_000)  # one PUT


@pytest.fixture
def bucket(rgw) -> str:
    return rgw.make_bucket()


@pytest.fixture
def replicas(fake, rgw, bucket, aiohttp_client, tmp_path):
    """``await replicas(n, **s3)``: n regcache apps on one bucket, each with its own data dir."""

    async def make(n: int, **s3: object) -> list:
        clients = []
        for i in range(n):
            settings = Settings(
                data_dir=tmp_path / f"replica-{i}",
                upstreams=[UpstreamSettings(name="fake.test", url=fake.base_url, default=True, retries=1)],
                storage=StorageSettings(backend="s3", s3=S3Settings(**rgw.s3_settings(bucket, part_size=PART, **s3))),
            )
            clients.append(await aiohttp_client(create_app(settings)))
        return clients

    return make


async def settled(check, attempts: int = 100) -> bool:
    """Whether ``check()`` holds once the fill task's own clean-up (after the client's last byte) ran."""
    for _ in range(attempts):
        if check():
            return True
        await asyncio.sleep(0.05)
    return False


async def get_blob(client, repository: str, digest: str) -> bytes:
    r = await client.get(f"/v2/{repository}/blobs/{digest}")
    assert r.status == 200, await r.text()
    assert r.headers["Docker-Content-Digest"] == digest
    return await r.read()


async def test_blobs_are_committed_to_the_bucket_and_served_by_every_replica(fake, rgw, bucket, replicas):
    fake.add_image("team/app", "1", [BIG, SMALL])
    first, second = await replicas(2)
    for data in (BIG, SMALL):
        assert await get_blob(first, "team/app", digest_of(data)) == data
    # The last byte goes out once the digest is verified; the commit to the bucket follows.
    wanted = {blob_key(digest_of(data)) for data in (BIG, SMALL)}
    assert await settled(lambda: wanted <= set(rgw.keys(bucket, "blobs/")), attempts=600)
    for data in (BIG, SMALL):
        head = rgw.client().head_object(Bucket=bucket, Key=blob_key(digest_of(data)))
        assert head["ContentLength"] == len(data)
    # The other replica finds them in the bucket: a hit, no second upstream fetch.
    for data in (BIG, SMALL):
        assert await get_blob(second, "team/app", digest_of(data)) == data
        assert fake.count("GET", f"/blobs/{digest_of(data)}") == 1


@pytest.mark.parametrize(("size", "part_uploads"), [("multipart", "during_fill"), ("multipart", "after_fill"),
                                                     ("single-put", "auto")])
async def test_corrupt_upstream_blob_never_becomes_readable_in_the_bucket(
    fake, rgw, bucket, replicas, size, part_uploads
):
    data = BIG if size == "multipart" else SMALL
    fake.add_image("team/app", "1", [data])
    digest = digest_of(data)
    fake.faults[digest] = Fault("corrupt", times=1)
    (proxy,) = await replicas(1, part_uploads=part_uploads)
    with pytest.raises((ClientPayloadError, ServerDisconnectedError, ConnectionError)):
        r = await proxy.get(f"/v2/team/app/blobs/{digest}")
        await r.read()
    # The abort runs in the fill task, after the client saw the cut.
    assert await settled(lambda: not rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads"))
    assert await settled(lambda: leases(rgw, bucket) == [])
    assert blob_key(digest) not in rgw.keys(bucket)
    # The next request fetches again and commits the right bytes.
    assert await get_blob(proxy, "team/app", digest) == data
    assert await settled(lambda: blob_key(digest) in rgw.keys(bucket), attempts=600)  # committed after the last byte


@pytest.mark.parametrize("part_uploads", ["during_fill", "after_fill"])
async def test_parts_go_to_the_store_during_the_fill_or_after_it_as_configured(
    fake, rgw, bucket, replicas, part_uploads
):
    # Half of it (then a pause) is more than a part plus the batch the writer may still hold back.
    data = os.urandom(3 * PART + 12345)
    fake.add_image("team/app", "1", [data])
    digest = digest_of(data)
    gate = asyncio.Event()
    fake.faults[digest] = Fault("hold", gate=gate, times=1)
    (proxy,) = await replicas(1, part_uploads=part_uploads)
    response = await proxy.get(f"/v2/team/app/blobs/{digest}")
    assert await response.content.readexactly(PART) == data[:PART]  # a whole part is in the spool
    during = part_uploads == "during_fill"
    uploading = await settled(lambda: bool(rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads")),
                              attempts=100 if during else 20)
    assert uploading is during
    gate.set()
    assert await response.read() == data[PART:]
    assert await settled(lambda: blob_key(digest) in rgw.keys(bucket), attempts=600)
    assert rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_a_store_on_this_host_gets_the_parts_after_the_fill_by_default(rgw, bucket, tmp_path):
    backend = S3Backend(S3Settings(**rgw.s3_settings(bucket)), tmp_path / "data")
    await backend.start()
    try:
        assert backend.parts_after_fill  # RGW answers on 127.0.0.1
    finally:
        await backend.close()


async def test_twenty_concurrent_cold_requests_over_three_replicas_fetch_once(fake, rgw, bucket, replicas):
    fake.add_image("team/app", "1", [BIG])
    digest = digest_of(BIG)
    # The upstream pauses mid-body so that every request arrives while the first fill runs.
    fake.faults[digest] = Fault("slow", delay=1.0, times=-1)
    proxies = await replicas(3)
    bodies = await asyncio.gather(*(get_blob(proxies[i % 3], "team/app", digest) for i in range(20)))
    assert all(body == BIG for body in bodies)
    assert fake.count("GET", f"/blobs/{digest}") == 1
    assert await settled(lambda: leases(rgw, bucket) == [])


async def test_expired_lease_of_a_dead_holder_is_taken_over_and_its_upload_aborted(fake, rgw, bucket, replicas):
    fake.add_image("team/app", "1", [SMALL])
    digest = digest_of(SMALL)
    # A replica that died mid-fill left its lease and its multipart upload behind.
    s3 = rgw.client()
    dead = s3.create_multipart_upload(Bucket=bucket, Key=blob_key(digest))
    s3.upload_part(Bucket=bucket, Key=blob_key(digest), UploadId=dead["UploadId"], PartNumber=1, Body=SMALL[:1000])
    s3.put_object(Bucket=bucket, Key=f"leases/{digest}",
                  Body=json.dumps({"owner": "dead/1", "token": "x", "ttl": 1}).encode())
    (proxy,) = await replicas(1, lease_ttl=1)
    assert await get_blob(proxy, "team/app", digest) == SMALL
    assert fake.count("GET", f"/blobs/{digest}") == 1
    assert await settled(lambda: leases(rgw, bucket) == [])
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def test_tags_and_manifests_recorded_by_one_replica_are_served_by_another(fake, rgw, bucket, replicas):
    manifest_digest = fake.add_image("team/app", "1", [SMALL])
    first, second = await replicas(2)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    r = await first.get("/v2/team/app/manifests/1", headers=accept)
    assert r.status == 200
    body = await r.read()
    for reference in ("1", manifest_digest):
        r = await second.get(f"/v2/team/app/manifests/{reference}", headers=accept)
        assert r.status == 200
        assert await r.read() == body
        assert r.headers["Docker-Content-Digest"] == manifest_digest
    assert fake.count("GET", "/manifests/") == 1
    assert "repositories/fake.test/team/app/_tags/1" in rgw.keys(bucket)
    assert f"repositories/fake.test/team/app/_images/{manifest_digest}" in rgw.keys(bucket)
    # Records are per repository: another repository's name gets no access through them.
    fake.add_image("other/app", "1", [b"other"])
    r = await second.get(f"/v2/other/app/manifests/{manifest_digest}", headers=accept)
    assert r.status == 404


async def test_redirect_mode_answers_with_a_presigned_url_that_serves_the_blob(fake, rgw, bucket, replicas):
    fake.add_image("team/app", "1", [SMALL])
    digest = digest_of(SMALL)
    (proxy,) = await replicas(1, redirect=True, redirect_ttl=60)
    assert await get_blob(proxy, "team/app", digest) == SMALL  # the miss streams while it fills
    await proxy.server.app[PULLTHROUGH].fills.settle()  # committed to the bucket: now a hit
    r = await proxy.get(f"/v2/team/app/blobs/{digest}", allow_redirects=False)
    assert r.status == 307
    location = r.headers["Location"]
    assert location.startswith(rgw.endpoint) and "Signature" in location
    async with aiohttp.ClientSession() as session, session.get(location) as direct:
        assert direct.status == 200
        assert await direct.read() == SMALL
    # The signature covers the key: the same URL for another object is refused.
    other = location.replace(digest.split(":")[1], "0" * 64)
    async with aiohttp.ClientSession() as session, session.get(other) as forged:
        assert forged.status == 403
