"""A private upstream behind a shared cache: the real distribution registry with htpasswd auth.

The registry knows one user, ``alice``; ``bob``'s credentials are not valid there until the test
grants them (his line is added to the registry's htpasswd and the registry restarted on the same
storage). distribution's htpasswd auth gives every valid user every repository, so "may not read"
is "credentials the upstream refuses" here; the per-repository case (valid credentials, no grant
for that repository) is proven against the in-process upstream in tests/app/test_client_credentials.py.

regcache has no credentials of its own for the registry (``client_credentials: verify``): alice's
pull warms the cache with her credentials; bob, through skopeo and through dockerd after
``docker login`` to regcache, is refused the cached manifest, the cached blobs and the tag list,
and is let in once the upstream accepts him and ``access_ttl`` has passed.
"""

from __future__ import annotations

import base64
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import skopeo
from tests.support.daemons import Dockerd, Netns, NetnsForwarder, RegcacheServer
from tests.support.images import build_image
from tests.support.registry import Registry
from tests.support.seed import SeededImage, seed_upstream

ALICE, BOB = ("alice", "alice-upstream-pw"), ("bob", "bob-upstream-pw")
CAROL = ("carol", "carol-upstream-pw")  # dockerd's refused user: bob's answers belong to the skopeo test
REPO, TAG = "team/private", "1"
ACCESS_TTL = 3.0


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("private-upstream")


@pytest.fixture(scope="module")
def private(work: Path) -> Iterator[tuple[Registry, SeededImage]]:
    registry = Registry(work / "registry", htpasswd=dict([ALICE]))
    with registry:
        seeded = seed_upstream(registry, work / "seed", {f"{REPO}:{TAG}": build_image({"secret.txt": b"private\n"})})
        yield registry, seeded[f"{REPO}:{TAG}"]


@pytest.fixture(scope="module")
def cache(work: Path, private: tuple[Registry, SeededImage]) -> Iterator[RegcacheServer]:
    registry, _ = private
    upstream = {"name": "private.test", "url": registry.url, "default": True,
                "client_credentials": "verify", "access_ttl": f"{ACCESS_TTL}s"}
    server = RegcacheServer(work / "regcache", [upstream]).start()
    yield server
    server.stop()


def _get(cache: RegcacheServer, path: str, creds: tuple[str, str]) -> int:
    token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    connection = http.client.HTTPConnection(cache.host.split(":")[0], int(cache.host.split(":")[1]), timeout=30)
    try:
        connection.request("GET", path, headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _statuses(cache: RegcacheServer, image: SeededImage, creds: tuple[str, str]) -> set[int]:
    """What ``creds`` get for the cached manifest (by tag and digest), every cached blob and the tag list."""
    paths = [f"/v2/{REPO}/manifests/{TAG}", f"/v2/{REPO}/manifests/{image.digest}", f"/v2/{REPO}/tags/list"]
    paths += [f"/v2/{REPO}/blobs/{digest}" for digest in image.blob_digests]
    return {_get(cache, path, creds) for path in paths}


def _wait_until(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Polls a condition that turns true once access_ttl has passed; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.5)


def test_only_credentials_the_upstream_accepts_get_the_cached_image_through_skopeo(
    cache: RegcacheServer, private: tuple[Registry, SeededImage], work: Path
) -> None:
    registry, image = private
    ref = skopeo.docker_ref(cache.host, REPO, TAG)
    skopeo.copy(ref, f"oci:{work / 'alice'}:x", src_creds=ALICE)  # alice warms the cache
    registry.reset_requests()

    with pytest.raises(skopeo.SkopeoError):
        skopeo.copy(ref, f"oci:{work / 'bob'}:x", src_creds=BOB)
    with pytest.raises(skopeo.SkopeoError):
        skopeo.inspect(ref, creds=BOB)
    with pytest.raises(skopeo.SkopeoError):
        skopeo.inspect(ref, creds=None)  # no credentials at all
    assert _statuses(cache, image, BOB) <= {401, 403}
    # Nothing but the access checks reached the registry for bob: no manifest, no blob.
    assert not [path for _, path in registry.requests() if "/manifests/" in path or "/blobs/" in path]

    # Naming tricks route to the same judged name or are refused as names.
    for path in (f"/v2/{REPO.upper()}/manifests/{TAG}", f"/v2/team%2Fprivate/manifests/{TAG}",
                 f"/v2/team//private/manifests/{TAG}", f"/v2/other/../{REPO}/manifests/{TAG}",
                 f"/v2/{REPO}/manifests/{TAG}?ns=private.test", f"/v2/private.test/{REPO}/manifests/{TAG}"):
        assert _get(cache, path, BOB) in (400, 401, 403, 404), path

    registry.users[BOB[0]] = BOB[1]
    registry.restart()  # rewrites its htpasswd: bob is a valid user upstream from now on
    _wait_until(lambda: _statuses(cache, image, BOB) == {200}, "bob let in after access_ttl")
    skopeo.copy(ref, f"oci:{work / 'bob-granted'}:x", src_creds=BOB)
    assert skopeo.inspect(ref, creds=BOB)["Digest"] == image.digest


@pytest.fixture(scope="module")
def dockerd(work: Path, cache: RegcacheServer) -> Iterator[Dockerd]:
    ns = Netns().create()
    forwarder = NetnsForwarder(ns)
    daemon = None
    try:
        forwarder.forward(cache.port)
        daemon = Dockerd(work / "dockerd", ns, {"insecure-registries": [cache.host]}).start()
        yield daemon
    finally:
        if daemon is not None:
            daemon.stop()
        forwarder.close()
        ns.delete()


def test_docker_login_to_the_cache_with_upstream_credentials_decides_who_pulls(
    cache: RegcacheServer, private: tuple[Registry, SeededImage], dockerd: Dockerd
) -> None:
    registry, image = private
    ref = f"{cache.host}/{REPO}:{TAG}"
    for who in (ALICE, CAROL):
        done = dockerd.docker("login", cache.host, "-u", who[0], "-p", who[1], timeout=60)
        assert done.returncode == 0, done.stderr
        if who is ALICE:
            pulled = dockerd.docker("pull", ref, timeout=180)
            assert pulled.returncode == 0, pulled.stderr
            assert dockerd.docker("rmi", ref).returncode == 0
            continue
        # carol: the upstream does not accept her; the image is cached, and she is refused it.
        refused = dockerd.docker("pull", ref, timeout=180)
        assert refused.returncode != 0
        assert "denied" in refused.stderr.lower() or "unauthorized" in refused.stderr.lower(), refused.stderr
    assert _statuses(cache, image, CAROL) <= {401, 403}

    registry.users[CAROL[0]] = CAROL[1]
    registry.restart()
    _wait_until(lambda: _statuses(cache, image, CAROL) == {200}, "carol let in after access_ttl")
    pulled = dockerd.docker("pull", ref, timeout=180)
    assert pulled.returncode == 0, pulled.stderr
    assert image.digest in pulled.stdout
