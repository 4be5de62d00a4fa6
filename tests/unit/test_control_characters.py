"""Names, tags, digests and registry hosts with trailing whitespace or control characters are refused.

With ``re.match`` and ``$``, a final newline passed validation: a docker
archive's RepoTag ``t/nl:v1\\n`` loaded and split the ``regcache images`` row.
"""

from __future__ import annotations

import json

import pytest

from config.settings import UpstreamSettings
from proxy.admin.archive import load_targets
from proxy.pull.routing import Router
from storage.archive.load import ArchiveLoader
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from storage.errors import ArchiveInvalid, DigestInvalid, NameInvalid, RegcacheError, TagInvalid
from storage.oci.digest import Digest, is_digest
from storage.oci.reference import ImageReference, is_tag, validate_name, validate_tag
from tests.support.archive import one_chunk, plain_tar

HEX = "a" * 64
# Whitespace and control characters a hostile archive, query or path could carry.
TAILS = ["\n", "\r", "\r\n", " ", "\t", "\x00", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85", "\u2028"]


@pytest.mark.parametrize("tail", TAILS)
def test_name_with_a_trailing_or_leading_control_character_is_invalid(tail):
    for name in (f"team/app{tail}", f"{tail}team/app", f"team{tail}/app"):
        with pytest.raises(NameInvalid):
            validate_name(name)


@pytest.mark.parametrize("tail", TAILS)
def test_tag_with_a_trailing_control_character_is_invalid(tail):
    with pytest.raises(TagInvalid):
        validate_tag(f"v1{tail}")
    assert not is_tag(f"v1{tail}")


@pytest.mark.parametrize("tail", TAILS)
def test_digest_with_a_trailing_control_character_is_invalid(tail):
    # 63 hex digits and the tail: the right length when the tail is one character.
    for text in (f"sha256:{HEX[:-1]}{tail}", f"sha256:{HEX}{tail}", f"sha256{tail}:{HEX}"):
        with pytest.raises(DigestInvalid):
            Digest.parse(text)
        assert not is_digest(text)


@pytest.mark.parametrize("tail", TAILS)
def test_image_reference_with_a_control_character_in_any_part_is_invalid(tail):
    for text in (f"t/nl:v1{tail}", f"t/nl{tail}:v1", f"reg.example{tail}/t/nl:v1", f"t/nl@sha256:{HEX}{tail}"):
        with pytest.raises(RegcacheError):
            ImageReference.parse(text)


def test_registry_hosts_as_clients_spell_them_still_parse():
    for text in ("localhost:5000/a:1", "[::1]:5000/a/b", "ghcr.io/o/r:v1", "docker.io/library/x"):
        assert str(ImageReference.parse(text)) == text


def _docker_archive(repo_tag: str) -> bytes:
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    files = {"c.json": config, "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": [repo_tag],
                                                             "Layers": []}]).encode()}
    return plain_tar(files)


@pytest.mark.parametrize("tail", ["\n", "\r", " ", "\x00"])
async def test_loaded_repo_tag_with_a_trailing_control_character_is_refused(tmp_path, tail):
    store = BlobStore(FilesystemBackend(tmp_path / "data"))
    await store.start()
    loader = ArchiveLoader(store, tmp_path / "data" / "tmp")
    try:
        result = await loader.read(one_chunk(_docker_archive(f"t/nl:v1{tail}")))
    finally:
        await loader.close()
        await store.close()
    upstream = UpstreamSettings(name="reg.test", url="http://127.0.0.1:9", default=True)
    router = Router([upstream], upstream)
    with pytest.raises(ArchiveInvalid, match="image name"):
        load_targets(router, result.images[0], None, None)
