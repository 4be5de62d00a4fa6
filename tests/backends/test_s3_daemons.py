"""Real daemons against regcache in S3 mode on a real Ceph RGW.

- dockerd (in a loopback-only network namespace) pulls through a regcache whose hits answer with
  a 307 to a presigned RGW URL: dockerd fetches the blob bytes from RGW itself. The presigned URL
  names ``127.0.0.1:<rgw port>``, so the namespace gets a forwarder on that same port number.
- containerd pulls through node-local regcaches (filesystem) whose upstream is a cluster of two
  S3 replicas on one bucket, whose upstream is the real distribution registry: each blob leaves
  the upstream once, whichever node and replica asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import Containerd, Dockerd, Netns, NetnsForwarder, closed_port, write_hosts_dir
from tests.support.registry import Registry
from tests.support.s3 import pull as skopeo_pull
from tests.support.s3 import s3_storage
from tests.support.seed import ALPHA, BUSYBOX, SeededImage


def hub_entry(upstream: Registry, **extra: object) -> dict[str, object]:
    # Named docker.io: dockerd mirrors only Docker Hub, containerd sends ?ns=docker.io.
    return {"name": "docker.io", "url": upstream.url, "default": True, **extra}


def redirects(server, digests) -> list[str]:  # type: ignore[no-untyped-def]
    """Blob paths regcache answered with a 307 (from its access log)."""
    return [
        e["path"]
        for e in server.access_log()
        if e.get("status") == 307 and any(d in e.get("path", "") for d in digests)
    ]


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    ns = Netns().create()
    try:
        yield ns
    finally:
        ns.delete()


def test_dockerd_pulls_in_redirect_mode_from_presigned_rgw_urls(
    rgw, upstream, seeded: dict[str, SeededImage], regcache_factory, netns: Netns, tmp_path: Path
) -> None:
    bucket = rgw.make_bucket()
    settings = s3_storage(rgw, bucket, redirect=True, redirect_ttl=300)
    first, second = (regcache_factory([hub_entry(upstream)], settings=settings) for _ in range(2))
    images = [seeded[BUSYBOX], seeded[ALPHA]]
    upstream.reset_requests()
    for i, image in enumerate(images):
        skopeo_pull(image, first.host, tmp_path / f"warm-{i}")  # every blob is in the bucket now
    forwarder = NetnsForwarder(netns)
    daemon = None
    try:
        forwarder.forward(second.port)
        forwarder.forward(rgw.rgw_port)  # the presigned URLs' host:port, reachable inside the namespace
        daemon_json = {"registry-mirrors": [second.url], "insecure-registries": [second.host]}
        daemon = Dockerd(tmp_path / "dockerd", netns, daemon_json).start()
        for image in images:
            name = image.repository.removeprefix("library/")
            done = daemon.docker("pull", f"{name}:{image.tag}")
            assert done.returncode == 0, done.stdout + done.stderr + daemon.log_text()
            # The image dockerd built from what it fetched is the upstream's, byte for byte.
            assert daemon.image_id(f"{name}:{image.tag}") == image.item.config_digest
            assert sorted(redirects(second, image.blob_digests)) == sorted(
                f"/v2/{image.repository}/blobs/{d}" for d in image.blob_digests
            )
        done = daemon.docker("run", "--rm", "--network=none", "busybox", "echo", "pulled through rgw")
        assert done.returncode == 0 and "pulled through rgw" in done.stdout, done.stderr
    finally:
        if daemon is not None:
            daemon.stop()
        forwarder.close()
    for image in images:
        for digest in image.blob_digests:
            assert upstream.blob_gets(digest) == 1, digest


def test_containerd_through_node_caches_over_cluster_replicas_fetches_each_blob_once(
    rgw, upstream, seeded: dict[str, SeededImage], regcache_factory, tmp_path: Path
) -> None:
    bucket = rgw.make_bucket()
    cluster = [regcache_factory([hub_entry(upstream)], settings=s3_storage(rgw, bucket)) for _ in range(2)]
    # Node tier: local disk, its only upstream one replica of the cluster tier. Configuration alone.
    nodes = [regcache_factory([hub_entry(upstream, url=replica.url)]) for replica in cluster]
    fallback = f"http://127.0.0.1:{closed_port()}"  # never the internet, never the upstream directly
    hosts = [
        write_hosts_dir(tmp_path / f"certs-{i}", node.url, ["docker.io"], server=fallback)
        for i, node in enumerate(nodes)
    ]
    images = [seeded[ALPHA], seeded[BUSYBOX]]
    upstream.reset_requests()
    containerd = Containerd(tmp_path / "containerd").start()
    try:
        for image in images:
            reference = f"docker.io/{image.repository}:{image.tag}"
            for hosts_dir in hosts:  # one node after the other, as two nodes of a cluster would
                pulled = containerd.pull(reference, hosts_dir)
                assert pulled.returncode == 0, pulled.stdout + pulled.stderr
                assert containerd.image_digest(reference) == image.digest
                containerd.remove_image(reference)  # the next node's pull fetches every byte again
    finally:
        containerd.stop()
    for image in images:
        for digest in image.blob_digests:
            assert upstream.blob_gets(digest) == 1, digest
    # The second node's misses were hits in the bucket: both nodes hold every blob, verified.
    for node in nodes:
        stored = {f"sha256:{p.name}" for p in (node.data_dir / "blobs").rglob("*") if p.is_file()}
        assert {d for image in images for d in image.blob_digests} <= stored
