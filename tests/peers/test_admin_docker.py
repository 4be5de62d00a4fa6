"""``regcache images`` and ``rmi`` answer as the real ``docker images`` / ``docker rmi`` do.

A private dockerd (in a loopback-only network namespace) pulls a set of images through regcache
as its registry mirror; then the same listing commands run against dockerd and against regcache,
for the same images, and their output is compared where the two can agree: rows and their order,
IMAGE ID (docker's ID is the config digest), digests, CREATED, filters, ``-q``, ``--format``
templates and table alignment. SIZE cannot agree (docker counts unpacked bytes, a cache the
compressed bytes a pull transfers) and is left out.

The images have distinct creation times (docker orders by them) and names chosen to exercise
docker's rules: a short Docker Hub name (``box``, which ``*x:*`` matches), an image with two
tags, a Docker-media-type image, and a tag that moves upstream, leaving a dangling image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemons import Dockerd, Netns, NetnsForwarder, RegcacheServer
from tests.support.images import build_image, host_platform
from tests.support.registry import Registry
from tests.support.seed import push_item

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "docker-compare-token-0123456789"

# name:tag -> (created, media style); "cmp/z:2" is pushed twice: the first image becomes dangling.
IMAGES = {
    "cmp/x:1": ("2021-01-01T00:00:00Z", "oci"),
    "library/box:1": ("2022-06-01T12:00:00Z", "oci"),
    "cmp/y:1": ("2023-03-01T00:00:00Z", "docker"),
    "cmp/z:2": ("2020-05-01T00:00:00Z", "oci"),
}
MOVED = ("cmp/z:2", "2023-09-01T00:00:00Z")


def _image(key: str, created: str, style: str):  # type: ignore[no-untyped-def]
    return build_image(
        {f"srv/{key.replace(':', '_')}": f"{key} {created}\n".encode()},
        platform=host_platform(),
        created=created,
        media_style=style,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admin-docker")


@pytest.fixture(scope="module")
def hub(work: Path) -> Iterator[Registry]:
    with Registry(work / "hub") as registry:
        yield registry


@pytest.fixture(scope="module")
def regcache(work: Path, hub: Registry) -> Iterator[RegcacheServer]:
    upstreams = [{"name": "docker.io", "url": hub.url, "default": True, "tag_ttl": "0s", "retries": 1}]
    server = RegcacheServer(work / "regcache", upstreams, admin={"token": TOKEN}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dockerd(work: Path, regcache: RegcacheServer) -> Iterator[Dockerd]:
    netns = Netns().create()
    forwarder = NetnsForwarder(netns)
    try:
        forwarder.forward(regcache.port)
        daemon = Dockerd(work / "dockerd", netns, {"registry-mirrors": [regcache.url]}).start()
        try:
            yield daemon
        finally:
            daemon.stop()
    finally:
        forwarder.close()
        netns.delete()


def familiar(key: str) -> str:
    return key.removeprefix("library/")


@pytest.fixture(scope="module")
def pulled(work: Path, hub: Registry, dockerd: Dockerd) -> dict[str, object]:
    """Everything pushed upstream and pulled by dockerd through regcache; the tag then moves."""
    built = {}
    for key, (created, style) in IMAGES.items():
        built[key] = image = _image(key, created, style)
        repository, _, tag = key.partition(":")
        push_item(image, hub, repository, tag, work / "push")
    push_item(built["cmp/x:1"], hub, "cmp/x", "latest", work / "push")
    for name in ("cmp/x:1", "cmp/x:latest", "box:1", "cmp/y:1", "cmp/z:2"):
        _docker(dockerd, "pull", name)
    built["moved"] = _image(MOVED[0], MOVED[1], "oci")
    push_item(built["moved"], hub, "cmp/z", "2", work / "push")
    _docker(dockerd, "pull", "cmp/z:2")
    return built


def _docker(dockerd: Dockerd, *args: str) -> str:
    done = dockerd.docker(*args)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
    return done.stdout


def regcache_cli(server: RegcacheServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
    env.update(PYTHONPATH=str(ROOT), REGCACHE_ADMIN_TOKEN=TOKEN)
    verb, *rest = args
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", verb, "--server", server.url, *rest],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def both(dockerd: Dockerd, regcache: RegcacheServer, *args: str) -> tuple[str, str]:
    theirs = _docker(dockerd, *args)
    ours = regcache_cli(regcache, *args)
    assert ours.returncode == 0, ours.stderr
    return theirs, ours.stdout


FMT = "{{.ID}} {{.Repository}} {{.Tag}} {{.CreatedSince}} {{.CreatedAt}}"

LISTINGS = [
    pytest.param(["--format", FMT], id="rows-and-order"),
    pytest.param(["-q"], id="quiet"),
    pytest.param(["-q", "--no-trunc"], id="quiet-no-trunc"),
    pytest.param(["--digests", "--format", "{{.Repository}} {{.Tag}} {{.Digest}} {{.ID}}"], id="digests"),
    pytest.param(["--no-trunc", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"], id="no-trunc"),
    pytest.param(["-f", "dangling=true", "--format", FMT], id="dangling"),
    pytest.param(["-f", "dangling=true", "-q"], id="dangling-quiet"),
    pytest.param(["-f", "dangling=false", "-q"], id="not-dangling"),
    pytest.param(["-f", "before=cmp/y:1", "--format", FMT], id="before"),
    pytest.param(["-f", "since=cmp/x:1", "--format", FMT], id="since"),
    pytest.param(["-f", "before=cmp/z:2", "-f", "dangling=true", "-q"], id="before-and-dangling"),
    pytest.param(["-f", "since=box:1", "-f", "reference=cmp/*", "-q"], id="since-and-reference"),
    pytest.param(["-f", "reference=*x:*", "--format", FMT], id="reference-star-x"),
    pytest.param(["-f", "reference=cmp/*", "--format", FMT], id="reference-namespace"),
    pytest.param(["-f", "reference=*/x:*", "--format", FMT], id="reference-star-slash"),
    pytest.param(["-f", "reference=cmp/x:lat*", "--format", FMT], id="reference-tag-glob"),
    pytest.param(["-f", "reference=cmp/[xy]", "-f", "reference=box", "--format", FMT], id="reference-class"),
    pytest.param(["cmp/x", "--format", FMT], id="positional-name"),
    pytest.param(["box:1", "-q"], id="positional-tag"),
    pytest.param(["--format", "table {{.ID}}: {{.Repository}}"], id="table-template"),
    pytest.param(["--format", "table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}\\t{{.CreatedSince}}"], id="table-columns"),
    pytest.param(["--digests", "--format", "table {{.Repository}}\\t{{.Digest}}\\t{{.ID}}"], id="table-digests"),
    pytest.param(["--format", "{{.Repository}}\\t{{.Tag}}"], id="tab-escape"),
]


@pytest.mark.parametrize("args", LISTINGS)
def test_images_listing_matches_docker(dockerd, regcache, pulled, args):
    theirs, ours = both(dockerd, regcache, "images", *args)
    assert theirs, "the comparison needs rows on docker's side"
    assert ours == theirs


def test_empty_results_match_docker(dockerd, regcache, pulled):
    for args in (["-f", "reference=nothing*", "-q"], ["-f", "since=cmp/z:2", "-q"]):
        theirs, ours = both(dockerd, regcache, "images", *args)
        assert ours == theirs == ""


def test_json_rows_agree_with_docker_on_the_shared_keys(dockerd, regcache, pulled):
    import json

    theirs, ours = both(dockerd, regcache, "images", "--digests", "--format", "{{json .}}")
    keys = ("ID", "Repository", "Tag", "Digest", "CreatedSince", "CreatedAt")
    mine = [json.loads(line) for line in ours.splitlines()]
    assert [{k: r[k] for k in keys} for r in mine] == [
        {k: json.loads(line)[k] for k in keys} for line in theirs.splitlines()
    ]
    assert all({"LastPulled", "Pulls", "Size"} <= row.keys() for row in mine)


def test_default_table_matches_docker_but_for_size(dockerd, regcache, pulled):
    theirs, ours = both(dockerd, regcache, "images")

    def columns(text: str) -> list[list[str]]:
        return [re.split(r"\s{2,}", line.strip())[:4] for line in text.splitlines()]

    assert columns(ours) == columns(theirs)
    assert ours.splitlines()[0].startswith("REPOSITORY   TAG       IMAGE ID       CREATED")


def test_ids_are_config_digests_as_docker_has_them(dockerd, regcache, pulled):
    for key, image in pulled.items():
        name = "cmp/z:2" if key == "moved" else familiar(key)
        if key == "cmp/z:2":
            continue  # dangling now
        assert dockerd.image_id(name) == image.config_digest  # type: ignore[attr-defined]
    ours = set(regcache_cli(regcache, "images", "-q", "--no-trunc").stdout.split())
    assert {pulled[k].config_digest for k in pulled} == ours  # type: ignore[attr-defined]


def test_rmi_lines_and_refusal_match_docker(dockerd, regcache, pulled):
    image_id = pulled["cmp/x:1"].config_digest.split(":")[1][:12]  # type: ignore[attr-defined]
    theirs = dockerd.docker("rmi", image_id)
    ours = regcache_cli(regcache, "rmi", image_id)
    assert theirs.returncode == ours.returncode == 1
    assert ours.stderr == theirs.stderr
    theirs_out, ours_out = both(dockerd, regcache, "rmi", "cmp/x:latest")
    assert ours_out == theirs_out == "Untagged: cmp/x:latest\n"
    theirs_out, ours_out = both(dockerd, regcache, "rmi", "cmp/x:1")
    # docker goes on with its layer chain IDs, regcache with the blobs it unlinked.
    assert ours_out.splitlines()[:3] == theirs_out.splitlines()[:3]
    assert theirs_out.splitlines()[2] == f"Deleted: {pulled['cmp/x:1'].config_digest}"  # type: ignore[attr-defined]
    theirs_q, ours_q = both(dockerd, regcache, "images", "-q")
    assert ours_q == theirs_q
