"""The test-support layer proves itself: deterministic images, honest digests, a counter that counts."""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import http.client
import io
import json
import socket
import subprocess
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import skopeo
from tests.support.images import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    MIB,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Image,
    Index,
    build_big_layer,
    build_busybox_image,
    build_image,
    decompress,
    sha256_digest,
    write_dir_layout,
    write_oci_layout,
)
from tests.support.registry import Registry, RegistryError, make_tls_files
from tests.support.seed import (
    ALPHA,
    BETA,
    BUSYBOX,
    DOCKER_LIST,
    OCI_INDEX,
    ZSTD,
    SeededImage,
    push_item,
    standard_images,
)


def _all_images(item: Image | Index) -> tuple[Image, ...]:
    return item.images if isinstance(item, Index) else (item,)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- images, offline


def test_images_built_twice_are_byte_identical(tmp_path: Path) -> None:
    first, second = standard_images(), standard_images()
    assert first == second  # dataclass equality covers manifest, config and layer bytes
    for key in first:
        write_oci_layout(tmp_path / "a" / key.replace("/", "_"), {"ref": first[key]})
        write_oci_layout(tmp_path / "b" / key.replace("/", "_"), {"ref": second[key]})
        write_dir_layout(tmp_path / "da" / key.replace("/", "_"), first[key])
        write_dir_layout(tmp_path / "db" / key.replace("/", "_"), second[key])
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "da") == _tree(tmp_path / "db")

    big_a = build_big_layer(tmp_path / "big-a", 2, seed=42)
    big_b = build_big_layer(tmp_path / "big-b", 2, seed=42)
    assert (big_a.digest, big_a.diff_id) == (big_b.digest, big_b.diff_id)
    assert filecmp.cmp(big_a.path, big_b.path, shallow=False)  # type: ignore[arg-type]
    assert build_big_layer(tmp_path / "big-c", 2, seed=43).digest != big_a.digest


def test_every_digest_names_exactly_its_bytes() -> None:
    for item in standard_images().values():
        assert sha256_digest(item.manifest) == item.digest
        for image in _all_images(item):
            config = json.loads(image.config)
            assert sha256_digest(image.config) == image.config_digest
            assert {"created", "architecture", "os", "rootfs", "config"} <= config.keys()
            assert (config["os"], config["architecture"]) == (image.platform.os, image.platform.architecture)
            assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
            manifest = image.manifest_json
            assert manifest["config"]["digest"] == image.config_digest
            assert [d["digest"] for d in manifest["layers"]] == list(image.layer_digests)
            for layer in image.layers:
                blob = layer.read_bytes()
                assert (sha256_digest(blob), len(blob)) == (layer.digest, layer.size)
                assert sha256_digest(decompress(blob, layer.compression)) == layer.diff_id


def test_shared_layer_keeps_its_digest_across_media_styles() -> None:
    images = standard_images()
    alpha, beta = images[ALPHA], images[BETA]
    assert isinstance(alpha, Image) and isinstance(beta, Image)
    assert len(alpha.layers) == 3
    assert alpha.layers[0].digest == beta.layers[0].digest
    assert set(alpha.layer_digests) & set(beta.layer_digests) == {alpha.layers[0].digest}
    assert alpha.layer_media_types[0] == OCI_LAYER_GZIP
    assert beta.media_type == DOCKER_MANIFEST and beta.layer_media_types[0] == DOCKER_LAYER_GZIP


def test_zstd_layer_is_zstd_and_docker_style_refuses_it() -> None:
    zstd_app = standard_images()[ZSTD]
    assert isinstance(zstd_app, Image)
    assert OCI_LAYER_ZSTD in zstd_app.layer_media_types
    zstd_layer = zstd_app.layers[zstd_app.layer_media_types.index(OCI_LAYER_ZSTD)]
    assert zstd_layer.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    with pytest.raises(ValueError, match="zstd"):
        build_image(base_layers=[zstd_layer], media_style="docker")


def test_indexes_list_one_manifest_per_platform() -> None:
    images = standard_images()
    for key in (OCI_INDEX, DOCKER_LIST):
        index = images[key]
        assert isinstance(index, Index)
        platforms = [d["platform"] for d in index.manifest_json["manifests"]]
        assert platforms == [
            {"architecture": "amd64", "os": "linux"},
            {"architecture": "arm64", "os": "linux", "variant": "v8"},
        ]
        assert [d["digest"] for d in index.manifest_json["manifests"]] == list(index.child_digests)


def test_big_layer_streams_to_disk_in_bounded_memory(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        layer = build_big_layer(tmp_path / "big.tar.gz", 32, seed=7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"peak Python allocation {peak} bytes for a 32 MiB layer"
    assert layer.path is not None and layer.path.stat().st_size == layer.size > 32 * MIB
    plain, compressed = hashlib.sha256(), hashlib.sha256()
    with layer.path.open("rb") as raw:
        while chunk := raw.read(MIB):
            compressed.update(chunk)
    with gzip.open(layer.path, "rb") as stream:
        while chunk := stream.read(MIB):
            plain.update(chunk)
    assert "sha256:" + compressed.hexdigest() == layer.digest
    assert "sha256:" + plain.hexdigest() == layer.diff_id
    with tarfile.open(layer.path, "r:gz") as tar:
        assert [(m.name, m.size) for m in tar.getmembers()] == [("big.bin", 32 * MIB)]


def test_busybox_rootfs_runs_echo(tmp_path: Path) -> None:
    image = build_busybox_image()
    assert json.loads(image.config)["config"]["Cmd"] == ["sh"]
    rootfs = tmp_path / "rootfs"
    with tarfile.open(fileobj=io.BytesIO(image.layers[0].read_bytes()), mode="r:gz") as tar:
        tar.extractall(rootfs, filter="tar")
    assert (rootfs / "bin" / "sh").readlink() == Path("busybox")
    # The applet symlink resolves inside the unpacked rootfs, as it will inside a container.
    out = subprocess.run([rootfs / "bin" / "echo", "hi"], capture_output=True, check=True, timeout=30)
    assert out.stdout == b"hi\n"


# --------------------------------------------------------------------------- against the real registry


def test_seeded_digests_equal_what_the_registry_reports(upstream: Registry, seeded: dict[str, SeededImage]) -> None:
    assert set(seeded) == {ALPHA, BETA, OCI_INDEX, DOCKER_LIST, ZSTD, BUSYBOX}
    for image in seeded.values():
        raw = skopeo.inspect(image.docker_ref(upstream.host), raw=True)
        assert raw == image.manifest and sha256_digest(raw) == image.digest
        assert skopeo.manifest_digest(raw) == image.digest
        response = upstream.get_manifest(image.repository, image.tag)
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["Content-Type"] == image.media_type
        for child in image.child_digests:
            child_raw = skopeo.inspect(skopeo.docker_ref(upstream.host, image.repository, child), raw=True)
            assert sha256_digest(child_raw) == child
    alpha = seeded[ALPHA]
    parsed = skopeo.inspect(alpha.docker_ref(upstream.host))
    assert parsed["Digest"] == alpha.digest
    assert parsed["Layers"] == list(alpha.blob_digests[1:])


def test_request_counter_sees_a_blob_get(upstream: Registry, seeded: dict[str, SeededImage]) -> None:
    alpha = seeded[ALPHA]
    layer = alpha.blob_digests[1]
    upstream.reset_requests()
    assert upstream.request("HEAD", f"/v2/{alpha.repository}/blobs/{layer}").status == 200
    assert upstream.blob_gets(layer) == 0 and upstream.blob_heads(layer) == 1
    upstream.get_blob(alpha.repository, layer)
    assert upstream.blob_gets(layer) == 1
    assert upstream.blob_gets(layer, alpha.repository) == 1
    assert upstream.blob_gets(layer, "library/beta") == 0
    assert upstream.requests() == [
        ("HEAD", f"/v2/{alpha.repository}/blobs/{layer}"),
        ("GET", f"/v2/{alpha.repository}/blobs/{layer}"),
    ]


def test_request_counter_sees_each_blob_of_a_skopeo_pull_once(
    upstream: Registry, seeded: dict[str, SeededImage], tmp_path: Path
) -> None:
    beta = seeded[BETA]
    upstream.reset_requests()
    skopeo.copy(beta.docker_ref(upstream.host), f"dir:{tmp_path / 'pulled'}")
    assert [upstream.blob_gets(digest, beta.repository) for digest in beta.blob_digests] == [1] * len(beta.blob_digests)
    assert upstream.manifest_requests(beta.tag, beta.repository) == 1
    get_manifest = next(r for r in upstream.request_log() if r.method == "GET" and "/manifests/" in r.path)
    assert DOCKER_MANIFEST in ", ".join(get_manifest.header_values("Accept"))


def test_relay_keeps_request_framing_on_one_connection(upstream: Registry) -> None:
    """A chunked upload then a GET on the same keep-alive connection: both arrive, in order."""
    data = b"chunked upload through the relay\n" * 1000
    digest = sha256_digest(data)
    upstream.reset_requests()
    conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=30)
    try:
        conn.request("POST", "/v2/relay/check/blobs/uploads/")
        start = conn.getresponse()
        start.read()
        assert start.status == 202
        location = start.headers["Location"]
        path = location.split(upstream.host, 1)[1]
        conn.request("PUT", f"{path}&digest={digest}", body=iter([data[:1000], data[1000:]]), encode_chunked=True)
        put = conn.getresponse()
        put.read()
        assert put.status == 201
        conn.request("GET", f"/v2/relay/check/blobs/{digest}")
        got = conn.getresponse()
        assert got.read() == data
    finally:
        conn.close()
    assert [m for m, _ in upstream.requests()] == ["POST", "PUT", "GET"]
    assert upstream.blob_gets(digest, "relay/check") == 1


def test_restarted_registry_keeps_storage_and_port(registry_factory: Callable[..., Registry], tmp_path: Path) -> None:
    registry = registry_factory()
    alpha = standard_images()[ALPHA]
    pushed = push_item(alpha, registry, "library/alpha", "1", tmp_path / "work")
    port = registry.port
    registry.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    registry.start()
    assert registry.port == port
    layer = pushed.blob_digests[1]
    assert sha256_digest(registry.get_blob("library/alpha", layer)) == layer
    assert registry.blob_gets(layer) == 1


def test_tls_and_htpasswd_registry(registry_factory: Callable[..., Registry], tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    registry = registry_factory(tls=tls, htpasswd={"alice": "wonderland"})
    assert registry.url.startswith("https://")
    assert registry.request("GET", "/v2/", auth=False).status == 401
    assert registry.request("GET", "/v2/").status == 200
    # The relay terminates TLS; the registry must still hand out https upload URLs.
    assert (
        registry.request("POST", "/v2/x/y/blobs/uploads/").headers["Location"].startswith(f"https://{registry.host}/")
    )
    beta = standard_images()[BETA]
    with pytest.raises(skopeo.SkopeoError, match=r"unauthorized|authentication required"):
        skopeo.push_dir(write_dir_layout(tmp_path / "anon", beta), registry.host, "library/beta", "1")
    pushed = push_item(beta, registry, "library/beta", "1", tmp_path / "work")
    raw = skopeo.inspect(
        pushed.docker_ref(registry.host), raw=True, creds=registry.credentials, tls_verify=True, cert_dir=tls.ca_dir
    )
    assert sha256_digest(raw) == pushed.digest


def test_distribution_in_proxy_mode_pulls_through(
    upstream: Registry, seeded: dict[str, SeededImage], registry_factory: Callable[..., Registry]
) -> None:
    mirror = registry_factory(proxy_remote_url=upstream.url)
    alpha = seeded[ALPHA]
    upstream.reset_requests()
    raw = skopeo.inspect(alpha.docker_ref(mirror.host), raw=True)
    assert sha256_digest(raw) == alpha.digest
    assert upstream.count("GET", f"/v2/{alpha.repository}/manifests/{alpha.tag}") >= 1


def test_uncounted_registry_refuses_to_pretend(registry_factory: Callable[..., Registry]) -> None:
    registry = registry_factory(count_requests=False)
    assert registry.request("GET", "/v2/").status == 200
    with pytest.raises(RegistryError, match="count_requests=False"):
        registry.requests()


def test_skopeo_errors_carry_stderr(upstream: Registry) -> None:
    with pytest.raises(skopeo.SkopeoError) as excinfo:
        skopeo.inspect(skopeo.docker_ref(upstream.host, "no/such-repo", "1"), raw=True)
    assert excinfo.value.returncode not in (0, None)
    assert excinfo.value.stderr and excinfo.value.stderr.strip() in str(excinfo.value)
    assert "manifest unknown" in excinfo.value.stderr.lower()
