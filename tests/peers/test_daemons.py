"""regcache as the mirror of real daemons: dockerd, containerd (``ctr``) and podman.

One regcache serves three configured upstreams: ``docker.io`` (the default; a local distribution
registry plays Docker Hub), ``ghcr.io`` (a second local registry) and ``quay.io`` (a port that
accepts connections and never answers). dockerd and podman run in a network namespace that has
only loopback, so their fallback to the real Docker Hub fails at once; containerd's hosts.toml
``server`` is a closed loopback port. Every test counts what reached which upstream.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import (
    Containerd,
    Dockerd,
    Netns,
    NetnsForwarder,
    Podman,
    RegcacheServer,
    closed_port,
    write_hosts_dir,
)
from tests.support.images import Image, Index, host_platform
from tests.support.registry import Registry
from tests.support.seed import ALPHA, BETA, BUSYBOX, DOCKER_LIST, OCI_INDEX, SeededImage, seed_upstream, standard_images

TOOL = "org/tool:1"  # on ghcr.io: beta's image, which shares alpha's base layer
UNREACHABLE_TIMEOUT = 2.0  # read timeout of the quay.io upstream, which never answers


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("daemons")


@pytest.fixture(scope="module")
def hub(work: Path) -> Iterator[Registry]:
    with Registry(work / "hub") as registry:
        yield registry


@pytest.fixture(scope="module")
def ghcr(work: Path) -> Iterator[Registry]:
    with Registry(work / "ghcr") as registry:
        yield registry


@pytest.fixture(scope="module")
def seeded(hub: Registry, ghcr: Registry, work: Path) -> dict[str, dict[str, SeededImage]]:
    images = standard_images()
    return {
        "docker.io": seed_upstream(hub, work / "seed-hub", {k: images[k] for k in (BUSYBOX, ALPHA, DOCKER_LIST)}),
        "ghcr.io": seed_upstream(ghcr, work / "seed-ghcr", {TOOL: images[BETA], OCI_INDEX: images[OCI_INDEX]}),
    }


@pytest.fixture(scope="module")
def black_hole() -> Iterator[int]:
    """A port whose connections are accepted by the kernel and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def regcache(work: Path, hub: Registry, ghcr: Registry, black_hole: int, seeded) -> Iterator[RegcacheServer]:
    upstreams = [
        # tag_ttl 0: every pull by tag revalidates with a HEAD, so the tests see it happen.
        {"name": "docker.io", "url": hub.url, "default": True, "tag_ttl": "0s", "retries": 1},
        {"name": "ghcr.io", "url": ghcr.url, "retries": 1},
        {"name": "quay.io", "url": f"http://127.0.0.1:{black_hole}", "retries": 0,
         "connect_timeout": UNREACHABLE_TIMEOUT, "read_timeout": UNREACHABLE_TIMEOUT},
    ]
    server = RegcacheServer(work / "regcache", upstreams).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def netns(regcache: RegcacheServer, hub: Registry) -> Iterator[Netns]:
    ns = Netns().create()
    forwarder = NetnsForwarder(ns)
    try:
        forwarder.forward(regcache.port)
        forwarder.forward(hub.port)  # for the direct pulls that give the reference image IDs
        yield ns
    finally:
        forwarder.close()
        ns.delete()


@pytest.fixture(scope="module")
def dockerd(work: Path, netns: Netns, regcache: RegcacheServer, hub: Registry) -> Iterator[Dockerd]:
    daemon_json = {"registry-mirrors": [regcache.url], "insecure-registries": [hub.host, regcache.host]}
    daemon = Dockerd(work / "dockerd", netns, daemon_json).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def containerd(work: Path) -> Iterator[Containerd]:
    daemon = Containerd(work / "containerd").start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def hosts_dir(work: Path, regcache: RegcacheServer) -> Path:
    """hosts.toml for each registry: regcache first, then a closed port (never the internet)."""
    server = f"http://127.0.0.1:{closed_port()}"
    return write_hosts_dir(work / "certs.d", regcache.url, ["docker.io", "ghcr.io", "quay.io"], server=server)


@pytest.fixture(scope="module")
def podman(work: Path, netns: Netns, regcache: RegcacheServer) -> Iterator[Podman]:
    # ghcr.io's mirror carries a path: regcache routes /v2/ghcr.io/... by that first component.
    client = Podman(work / "podman", netns, {"docker.io": regcache.host, "ghcr.io": f"{regcache.host}/ghcr.io"})
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _fresh_counts(hub: Registry, ghcr: Registry) -> None:
    hub.reset_requests()
    ghcr.reset_requests()


def _ok(done, what: str) -> str:  # type: ignore[no-untyped-def]
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return str(done.stdout)


def _from_regcache(registry: Registry) -> list[tuple[str, str]]:
    """``(method, path)`` of the requests regcache (not a client directly) sent to ``registry``."""
    return [(r.method, r.path) for r in registry.request_log() if (r.header("User-Agent") or "").startswith("regcache")]


def _served(regcache: RegcacheServer, path: str) -> list[dict]:  # type: ignore[type-arg]
    """The access-log entries of ``path``; a line is written once its answer is out, so the one
    of a client's last request may trail the client's exit a little."""
    for _ in range(100):
        served = [e for e in regcache.access_log() if e.get("path") == path]
        if served:
            return served
        time.sleep(0.05)
    return served


# --------------------------------------------------------------------------- dockerd


def test_docker_pulls_through_mirror_by_digest_and_tag_with_the_direct_image_id(dockerd, regcache, hub, seeded):
    busybox = seeded["docker.io"][BUSYBOX]
    _ok(dockerd.docker("pull", f"busybox@{busybox.digest}"), "docker pull by digest")
    assert ("GET", f"/v2/library/busybox/manifests/{busybox.digest}") in _from_regcache(hub)
    assert [e["status"] for e in _served(regcache, f"/v2/library/busybox/manifests/{busybox.digest}")] == [200]

    _ok(dockerd.docker("pull", "busybox"), "docker pull busybox")
    assert ("GET", "/v2/library/busybox/manifests/latest") in _from_regcache(hub)
    # Layers came once, through regcache, whichever pull asked first.
    for digest in busybox.blob_digests:
        assert hub.blob_gets(digest) == 1
    through_mirror = dockerd.image_id("busybox")

    _ok(dockerd.docker("pull", f"{hub.host}/library/busybox:latest"), "direct docker pull")
    assert through_mirror == dockerd.image_id(f"{hub.host}/library/busybox:latest") == busybox.item.config_digest


def test_docker_pull_of_a_known_tag_revalidates_with_head_only(dockerd, regcache, hub, seeded):
    _ok(dockerd.docker("pull", "busybox"), "first pull")
    hub.reset_requests()
    _ok(dockerd.docker("pull", "busybox"), "second pull")
    # Tag TTL 0: regcache asks the upstream with a HEAD (free on Docker Hub), never a GET.
    assert _from_regcache(hub) == [("HEAD", "/v2/library/busybox/manifests/latest")]
    assert _served(regcache, "/v2/library/busybox/manifests/latest")[-1]["result"] == "revalidated"


def test_docker_runs_the_busybox_it_pulled_through_the_mirror(dockerd):
    _ok(dockerd.docker("pull", "busybox"), "docker pull")
    out = _ok(dockerd.docker("run", "--rm", "--network", "none", "busybox", "echo", "hello from regcache"), "run")
    assert out.strip() == "hello from regcache"


def test_docker_unknown_image(dockerd, regcache, hub):
    done = dockerd.docker("pull", "no-such-image")
    assert done.returncode != 0
    # The mirror answered MANIFEST_UNKNOWN (docker then tries Docker Hub, unreachable in the namespace).
    assert [e["status"] for e in _served(regcache, "/v2/library/no-such-image/manifests/latest")][-1] == 404
    assert "manifest unknown" in dockerd.log_text()
    # Used as a registry rather than a mirror, docker gives its usual message.
    done = dockerd.docker("pull", f"{regcache.host}/library/no-such-image:1")
    assert done.returncode != 0
    assert f"manifest for {regcache.host}/library/no-such-image:1 not found" in done.stderr


def test_docker_unreachable_upstream_fails_clearly_within_the_timeout(dockerd, regcache):
    started = time.monotonic()
    done = dockerd.docker("pull", f"{regcache.host}/quay.io/team/app:1", timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "503" in done.stderr or "Service Unavailable" in done.stderr, done.stderr
    entry = _served(regcache, "/v2/quay.io/team/app/manifests/1")[-1]
    assert entry["status"] == 503
    assert entry["error"] == "upstream quay.io: manifest timed out"
    # A bound, not a measurement: one attempt of the configured timeout plus slack, not a hang.
    assert elapsed < UNREACHABLE_TIMEOUT * 2 + 20


# --------------------------------------------------------------------------- containerd


def test_ctr_pulls_each_registry_from_its_own_upstream(containerd, hosts_dir, regcache, hub, ghcr, seeded):
    alpha = seeded["docker.io"][ALPHA]
    index = seeded["ghcr.io"][OCI_INDEX]
    _ok(containerd.pull("docker.io/library/alpha:1", hosts_dir), "ctr pull alpha")
    _ok(containerd.pull("ghcr.io/multi/oci-index:1", hosts_dir, "--all-platforms"), "ctr pull --all-platforms")

    assert containerd.image_digest("docker.io/library/alpha:1") == alpha.digest
    assert containerd.image_digest("ghcr.io/multi/oci-index:1") == index.digest
    hub_paths = {p for _, p in _from_regcache(hub)}
    ghcr_paths = {p for _, p in _from_regcache(ghcr)}
    assert "/v2/library/alpha/manifests/1" in hub_paths
    assert not any("alpha" in p for p in ghcr_paths)
    assert not any("oci-index" in p for p in hub_paths)
    # --all-platforms: the index and every platform's manifest came from ghcr.io's upstream.
    for child in index.child_digests:
        assert f"/v2/multi/oci-index/manifests/{child}" in ghcr_paths
    routed = {e["upstream"] for e in regcache.access_log() if "/oci-index/" in e.get("path", "")}
    assert routed == {"ghcr.io"}


def test_ctr_pull_of_an_index_fetches_only_this_platform(containerd, hosts_dir, hub, seeded):
    listed = seeded["docker.io"][DOCKER_LIST]
    item = listed.item
    assert isinstance(item, Index)
    mine = item.for_platform(host_platform())
    others = [image for image in item.images if image.digest != mine.digest]
    _ok(containerd.pull("docker.io/multi/docker-list:1", hosts_dir), "ctr pull docker-list")

    assert hub.manifest_requests(mine.digest, "multi/docker-list") == 1
    for other in others:
        assert isinstance(other, Image)
        assert hub.manifest_requests(other.digest, "multi/docker-list") == 0
        assert hub.blob_gets(other.config_digest) == 0


def test_ctr_unknown_image_is_not_found(containerd, work, regcache):
    # With the real registry as `server`, a 404 from the mirror ends in containerd's usual message;
    # regcache stands in for that server here so nothing leaves the machine.
    hosts = write_hosts_dir(work / "certs-notfound", regcache.url, ["docker.io"], server=regcache.url)
    done = containerd.pull("docker.io/library/no-such-image:1", hosts)
    assert done.returncode != 0
    assert "docker.io/library/no-such-image:1: not found" in done.stderr


def test_ctr_unreachable_upstream_fails_clearly_within_the_timeout(containerd, hosts_dir, regcache):
    started = time.monotonic()
    done = containerd.pull("quay.io/team/app:1", hosts_dir, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "503 Service Unavailable" in done.stderr
    entries = [e for e in regcache.access_log() if e.get("path") == "/v2/team/app/manifests/1"]
    assert entries and entries[-1]["upstream"] == "quay.io"
    assert entries[-1]["error"] == "upstream quay.io: manifest timed out"
    assert elapsed < UNREACHABLE_TIMEOUT * 2 + 20


# --------------------------------------------------------------------------- podman


def test_podman_pulls_through_mirror_entries(podman, regcache, hub, seeded):
    busybox = seeded["docker.io"][BUSYBOX]
    _ok(podman.podman("pull", "docker.io/library/busybox:latest"), "podman pull busybox")
    assert podman.image_id("docker.io/library/busybox:latest") == busybox.item.config_digest.removeprefix("sha256:")
    assert _served(regcache, "/v2/library/busybox/manifests/latest")[-1]["status"] == 200
    assert ("HEAD", "/v2/library/busybox/manifests/latest") in _from_regcache(hub) or (
        "GET", "/v2/library/busybox/manifests/latest") in _from_regcache(hub)


def test_same_blob_via_two_upstreams_is_fetched_and_stored_once(podman, regcache, hub, ghcr, seeded):
    alpha = seeded["docker.io"][ALPHA]
    tool = seeded["ghcr.io"][TOOL]
    base = alpha.item.layer_digests[0]
    assert isinstance(tool.item, Image) and tool.item.layer_digests[0] == base
    _ok(podman.podman("pull", "docker.io/library/alpha:1"), "podman pull alpha")
    # Without its local copy podman must ask regcache for every layer of the next image.
    _ok(podman.podman("rmi", "docker.io/library/alpha:1"), "podman rmi alpha")
    _ok(podman.podman("pull", "ghcr.io/org/tool:1"), "podman pull ghcr.io/org/tool (path-prefix mirror)")

    assert base in regcache.stored_blobs()
    assert ghcr.manifest_requests("1", "org/tool") == 1
    # ghcr.io's manifest lists the blob, which vouches for it; the bytes came from disk.
    assert ghcr.blob_gets(base) == 0
    assert ghcr.blob_gets(tool.item.layer_digests[1], "org/tool") == 1
    served = _served(regcache, f"/v2/ghcr.io/org/tool/blobs/{base}")
    assert served and served[-1]["upstream"] == "ghcr.io" and served[-1]["result"] == "hit"


def test_podman_unknown_image_reports_manifest_unknown(podman):
    done = podman.podman("pull", "docker.io/library/no-such-image:1")
    assert done.returncode != 0
    assert "manifest unknown" in done.stderr


def test_client_probes_leave_no_traceback_in_the_log(regcache, podman):
    # podman tries TLS first on an insecure mirror; regcache must answer it as a bad request quietly.
    _ok(podman.podman("pull", "docker.io/library/busybox:latest"), "podman pull")
    assert "Traceback" not in regcache.log_text()


# --------------------------------------------------------------------------- upstream outage (last)


def test_all_clients_pull_cached_images_while_upstreams_are_down(
    dockerd, containerd, podman, hosts_dir, regcache, hub, ghcr
):
    warm = {
        "docker": dockerd.docker("pull", "busybox"),
        "ctr alpha": containerd.pull("docker.io/library/alpha:1", hosts_dir),
        "ctr index": containerd.pull("ghcr.io/multi/oci-index:1", hosts_dir, "--all-platforms"),
        "podman": podman.podman("pull", "docker.io/library/busybox:latest"),
    }
    for what, done in warm.items():
        _ok(done, f"warm-up {what}")
    # Forget every local copy, so each client must ask regcache again.
    _ok(dockerd.docker("rmi", "busybox"), "docker rmi")
    containerd.remove_image("docker.io/library/alpha:1")
    containerd.remove_image("ghcr.io/multi/oci-index:1")
    _ok(podman.podman("rmi", "docker.io/library/busybox:latest"), "podman rmi")

    hub.stop()
    ghcr.stop()
    try:
        seen = len(regcache.access_log())
        _ok(dockerd.docker("pull", "busybox"), "docker pull with upstream down")
        _ok(dockerd.docker("run", "--rm", "--network", "none", "busybox", "true"), "docker run after outage pull")
        _ok(containerd.pull("docker.io/library/alpha:1", hosts_dir), "ctr pull with upstream down")
        _ok(containerd.pull("ghcr.io/multi/oci-index:1", hosts_dir, "--all-platforms"), "ctr index, upstream down")
        _ok(podman.podman("pull", "docker.io/library/busybox:latest"), "podman pull with upstream down")
        results = {e.get("result") for e in regcache.access_log()[seen:] if e.get("route") == "manifest"}
        assert "stale" in results  # docker.io tags (TTL 0) were served stale, and said so
    finally:
        hub.start()
        ghcr.start()


def test_cached_images_pull_completely_while_the_upstreams_hang(dockerd, containerd, hosts_dir, regcache, hub, ghcr):
    """A registry behind a broken load balancer: connections accepted, nothing answered."""
    warm = {
        "docker": dockerd.docker("pull", "busybox"),
        "ctr alpha": containerd.pull("docker.io/library/alpha:1", hosts_dir),
        "ctr index": containerd.pull("ghcr.io/multi/oci-index:1", hosts_dir, "--all-platforms"),
    }
    for what, done in warm.items():
        _ok(done, f"warm-up {what}")
    _ok(dockerd.docker("rmi", "busybox"), "docker rmi")
    containerd.remove_image("docker.io/library/alpha:1")
    containerd.remove_image("ghcr.io/multi/oci-index:1")

    hub.hang()
    ghcr.hang()
    try:
        seen = len(regcache.access_log())
        # docker.io tags have TTL 0: each pull by tag is past it, and the revalidation never
        # returns; the default upstream read timeout (60 s, twice) is longer than docker's and
        # containerd's patience would allow if they waited on it.
        _ok(dockerd.docker("pull", "busybox", timeout=60), "docker pull while the upstream hangs")
        _ok(dockerd.docker("run", "--rm", "--network", "none", "busybox", "true"), "docker run")
        _ok(containerd.pull("docker.io/library/alpha:1", hosts_dir, timeout=60), "ctr pull while hanging")
        _ok(containerd.pull("ghcr.io/multi/oci-index:1", hosts_dir, "--all-platforms", timeout=60), "ctr index")
        entries = regcache.access_log()[seen:]
        assert {e["status"] for e in entries if e.get("route") in ("manifest", "blob")} <= {200}
        assert "stale" in {e.get("result") for e in entries if e.get("route") == "manifest"}
    finally:
        hub.answer_again()
        ghcr.answer_again()
