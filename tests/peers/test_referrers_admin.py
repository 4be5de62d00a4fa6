"""Referrers and the admin verbs, with a real regcache process in front of the real registry:
``pull`` brings an image's signatures and SBOMs (``--no-referrers`` does not), ``images`` does
not list them as images, and ``images --tree`` shows them under their image by artifact type."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os

import pytest

from proxy.cli.main import main
from tests.support.artifacts import digest_of, push_artifact, push_image

TOKEN = "admin-token-for-referrer-tests-0123"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
_repos = itertools.count()


@pytest.fixture
def cache(upstream, regcache_factory):  # type: ignore[no-untyped-def]
    entry = {"name": "docker.io", "url": upstream.url, "default": True}
    return regcache_factory([entry], settings={"admin": {"token": TOKEN}})


@pytest.fixture
def signed(upstream):  # type: ignore[no-untyped-def]
    repository = f"signed/app{next(_repos)}"
    subject = push_image(upstream, repository, "1", f"layer of {repository}".encode())
    payloads = {SIGNATURE: b"a signature " + repository.encode(), SBOM: b'{"spdxVersion": "SPDX-2.3"}'}
    artifacts = {kind: push_artifact(upstream, repository, subject, kind, data) for kind, data in payloads.items()}
    return repository, subject[0], artifacts, {kind: digest_of(data) for kind, data in payloads.items()}


def cli(server, *args: str) -> str:  # type: ignore[no-untyped-def]
    verb, *rest = args
    out, err = io.StringIO(), io.StringIO()
    os.environ["REGCACHE_ADMIN_TOKEN"] = TOKEN
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([verb, "--server", server.url, *rest])
    finally:
        os.environ.pop("REGCACHE_ADMIN_TOKEN", None)
    assert code == 0, err.getvalue()
    return out.getvalue()


def stored(server) -> set[str]:  # type: ignore[no-untyped-def]
    return {f"sha256:{p.name}" for p in (server.data_dir / "blobs" / "sha256").rglob("*") if p.is_file()}


def test_pull_brings_the_referrers_and_their_blobs_unless_told_not_to(cache, signed, upstream):
    repository, subject, artifacts, payloads = signed
    cli(cache, "pull", "--no-referrers", f"{repository}:1")
    assert subject in stored(cache)
    assert not set(artifacts.values()) & stored(cache)
    output = cli(cache, "pull", f"{repository}:1")
    assert "Referrer" in output
    assert set(artifacts.values()) | set(payloads.values()) <= stored(cache)


def test_images_hides_referrers_and_the_tree_shows_them_by_artifact_type(cache, signed):
    repository, subject, artifacts, _ = signed
    cli(cache, "pull", f"{repository}:1")
    output = cli(cache, "images", "--digests", "--no-trunc", "--format", "{{json .}}")
    listed = [json.loads(line) for line in output.splitlines()]
    digests = {row.get("Digest") for row in listed}
    assert subject in digests
    assert not set(artifacts.values()) & digests
    assert not any(str(row.get("Tag", "")).startswith("sha256-") for row in listed)
    tree = cli(cache, "images", "--tree", f"{repository}:1")
    assert tree.splitlines()[0] == f"{repository}:1  {subject}"
    assert "└── referrers" in tree
    for kind, digest in artifacts.items():
        assert kind in tree and digest in tree
        assert tree.index(kind) < tree.index(digest)
