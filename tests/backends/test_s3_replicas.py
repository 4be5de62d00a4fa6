"""Several regcache processes on one bucket of a real Ceph RGW, pulled by real clients.

The upstream is the real distribution registry with request counting (``upstream``/``seeded``
session fixtures) or, for a replica killed mid-fill, the in-process fake that can stall a body.
Every replica is ``python -m proxy.cli serve`` with its own data directory; clients alternate
between them as a round-robin Service would send them.
"""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from config.settings import S3Settings
from tests.conftest import upstream_entry
from tests.support import skopeo
from tests.support.fake_upstream import Fault, digest_of
from tests.support.s3 import blob_key, leases, pull, s3_storage
from tests.support.seed import SeededImage


async def read_blob(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.read()


def all_blobs(seeded: dict[str, SeededImage]) -> set[str]:
    return {d for image in seeded.values() for d in image.blob_digests}


@pytest.mark.parametrize("n", [2, 3])
def test_skopeo_pulls_through_alternating_replicas_fetch_each_blob_once(
    n, rgw, upstream, seeded, regcache_factory, tmp_path
):
    bucket = rgw.make_bucket()
    replicas = [regcache_factory([upstream_entry(upstream)], settings=s3_storage(rgw, bucket)) for _ in range(n)]
    upstream.reset_requests()
    images = list(seeded.values())
    for round_ in range(2):  # the second round sends every image to another replica
        for i, image in enumerate(images):
            pull(image, replicas[(i + round_) % n].host, tmp_path / f"round{round_}-{i}")
    for digest in all_blobs(seeded):
        assert upstream.blob_gets(digest) == 1, digest
    stored = {k.rsplit("/", 1)[1] for k in rgw.keys(bucket, "blobs/")}
    assert {d.split(":")[1] for d in all_blobs(seeded)} <= stored
    for i, image in enumerate(images):
        # Digests as the upstream has them, whichever replica answers.
        raw = skopeo.inspect(image.docker_ref(replicas[(i + 2) % n].host), raw=True, no_tags=True)
        assert skopeo.manifest_digest(raw) == image.digest
    # Manifests too were fetched once in total: the others came from the bucket's records.
    for image in images:
        assert upstream.manifest_requests(image.tag, image.repository) == 1, image.reference
        assert upstream.manifest_requests(image.digest, image.repository) == 0, image.reference


def test_redirect_mode_skopeo_follows_presigned_urls(rgw, upstream, seeded, regcache_factory, tmp_path):
    bucket = rgw.make_bucket()
    settings = s3_storage(rgw, bucket, redirect=True, redirect_ttl=120)
    first, second = (regcache_factory([upstream_entry(upstream)], settings=settings) for _ in range(2))
    image = seeded["library/alpha:1"]
    upstream.reset_requests()
    pull(image, first.host, tmp_path / "cold")  # misses stream through while they fill
    # A client has a blob's last byte once it is verified; its commit to the bucket follows. A blob
    # not committed yet is no hit for the other replica (it waits on the fill lease and streams).
    committed = {blob_key(digest) for digest in image.blob_digests}
    for _ in range(300):
        if committed <= set(rgw.keys(bucket, "blobs/")):
            break
        time.sleep(0.05)
    assert committed <= set(rgw.keys(bucket, "blobs/"))
    pull(image, second.host, tmp_path / "warm")  # hits: 307 to the object store

    def redirected() -> list[dict[str, object]]:
        return [e for e in second.access_log() if e["status"] == 307 and e["route"] == "blob"]

    # Each line is written once its answer is out: the last may follow skopeo's exit.
    for _ in range(100):
        if len(redirected()) >= len(image.blob_digests):
            break
        time.sleep(0.05)
    assert len(redirected()) == len(image.blob_digests)
    for digest in image.blob_digests:
        blob = tmp_path / "warm" / digest.split(":")[1]
        assert digest_of(blob.read_bytes()) == digest
        assert upstream.blob_gets(digest) == 1


def test_tiered_node_cache_over_cluster_cache_fetches_each_blob_once(rgw, upstream, seeded, regcache_factory, tmp_path):
    bucket = rgw.make_bucket()
    cluster = [regcache_factory([upstream_entry(upstream)], settings=s3_storage(rgw, bucket)) for _ in range(2)]
    # Node caches: local disk, their upstream is (one replica of) the cluster cache. Configuration only.
    nodes = [regcache_factory([upstream_entry(upstream, url=c.url)]) for c in cluster]
    upstream.reset_requests()
    for i, image in enumerate(seeded.values()):
        for j, node in enumerate(nodes):
            pull(image, node.host, tmp_path / f"{i}-{j}")
    for digest in all_blobs(seeded):
        assert upstream.blob_gets(digest) == 1, digest


async def test_replica_killed_mid_fill_is_taken_over_within_30s_leaving_no_upload(fake, rgw, regcache_factory):
    """Default settings: the waiting replica's client gets the verified blob within the issue's bound."""
    part = S3Settings.model_fields["part_size"].default
    layer = os.urandom(3 * part + 4321)
    digest = digest_of(layer)
    fake.add_image("team/app", "1", [layer])
    fake.faults[digest] = Fault("slow", delay=60, times=1)  # the first fetch stalls after half the body
    bucket = rgw.make_bucket()
    entry = {"name": "fake.test", "url": fake.base_url, "default": True, "retries": 0}
    # Parts go while the fill runs, as to a store on another host: the kill leaves an upload behind.
    settings = {"storage": {"backend": "s3", "s3": rgw.s3_settings(bucket, part_uploads="during_fill")}}
    doomed, survivor = [await asyncio.to_thread(regcache_factory, [entry], settings=settings) for _ in range(2)]
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{doomed.url}/v2/team/app/blobs/{digest}")
        assert response.status == 200
        await response.content.readexactly(part + 1)  # the fill is well under way
        # A part is on its way into a multipart upload: the kill happens mid-upload.
        for _ in range(100):
            if rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads"):
                break
            await asyncio.sleep(0.05)
        assert rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
        # The other replica's client asks while the fill runs: it waits on the lease.
        waiting = asyncio.create_task(read_blob(session, f"{survivor.url}/v2/team/app/blobs/{digest}"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await asyncio.to_thread(doomed.kill)
        killed_at = time.monotonic()
        response.close()
        assert blob_key(digest) not in rgw.keys(bucket)
        assert leases(rgw, bucket) == [f"leases/{digest}"]  # held by a dead replica now
        # The dead lease lapses, the waiting replica takes the fill over and fetches again.
        body = await waiting
        assert time.monotonic() - killed_at < 30
        assert digest_of(body) == digest
    assert fake.count("GET", f"/blobs/{digest}") == 2  # the killed fill, then the takeover
    # The client had every byte once the digest was verified; the bucket commit follows it.
    for _ in range(300):
        if rgw.keys(bucket, "blobs/"):
            break
        await asyncio.sleep(0.05)
    assert rgw.keys(bucket, "blobs/") == [blob_key(digest)]
    head = rgw.client().head_object(Bucket=bucket, Key=blob_key(digest))
    assert head["ContentLength"] == len(layer)
    # The dead fill's multipart upload was aborted by the takeover, not left for a day.
    assert rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    for _ in range(100):
        if not leases(rgw, bucket):
            break
        await asyncio.sleep(0.05)
    assert leases(rgw, bucket) == []
