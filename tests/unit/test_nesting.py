"""Deeply nested JSON from any untrusted source is a typed error, never a RecursionError (a 500).

Sources: admin request bodies, archive indexes and manifests, manifests and
other JSON answers from upstreams.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from aiohttp import web

from proxy.admin.body import json_object
from proxy.errors import UpstreamError
from proxy.http.accesslog import request_context
from proxy.http.errors import error_middleware
from proxy.upstream.responses import embedded_media_type, json_body
from storage.archive.load import ArchiveLoader
from storage.backends.filesystem import FilesystemBackend
from storage.blobs import BlobStore
from storage.errors import ArchiveInvalid, ManifestInvalid
from storage.oci.jsonlimits import MAX_DEPTH, JSONTooDeep, depth, loads
from storage.oci.manifests import OCI_INDEX, parse_manifest
from tests.support.archive import one_chunk, plain_tar

HOSTILE_DEPTH = 50_000


def nested(levels: int, inner: str = "1") -> bytes:
    return ("[" * levels + inner + "]" * levels).encode()


def test_nesting_is_measured_outside_strings_escapes_included():
    assert depth(b'{"a": [1, {"b": "[[[{{\\"[["}]}') == 3
    assert depth(b'"\\\\"') == 0
    assert depth(nested(HOSTILE_DEPTH)) == HOSTILE_DEPTH


def test_documents_up_to_the_limit_load_and_deeper_ones_are_a_value_error():
    assert loads(nested(MAX_DEPTH)) is not None
    with pytest.raises(JSONTooDeep):
        loads(nested(MAX_DEPTH + 1))
    with pytest.raises(ValueError):  # so every "except ValueError" around JSON covers it
        loads(nested(HOSTILE_DEPTH).decode())


def test_deep_manifest_from_an_upstream_is_manifest_invalid():
    deep = b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'", "annotations": ' + nested(1500) + b"}"
    with pytest.raises(ManifestInvalid, match="deeper"):
        parse_manifest(deep)


def test_deep_json_answers_from_an_upstream_are_upstream_errors():
    with pytest.raises(UpstreamError, match="deeper"):
        json_body(nested(HOSTILE_DEPTH), "hub")
    assert embedded_media_type(nested(HOSTILE_DEPTH)) == ""


async def test_deep_admin_body_is_400_invalid(aiohttp_client):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(await json_object(request))

    app = web.Application(middlewares=[request_context, error_middleware], client_max_size=1 << 20)
    app.router.add_post("/admin/x", handler)
    client = await aiohttp_client(app)
    r = await client.post("/admin/x", data=nested(HOSTILE_DEPTH), headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert (await r.json())["errors"][0]["code"] == "INVALID"



async def _load(tmp_path, archive: bytes) -> None:  # type: ignore[no-untyped-def]
    store = BlobStore(FilesystemBackend(tmp_path / "data"))
    await store.start()
    loader = ArchiveLoader(store, tmp_path / "data" / "tmp")
    try:
        await loader.read(one_chunk(archive))
    finally:
        await loader.close()
        await store.close()


async def test_archive_whose_index_json_nests_deep_is_archive_invalid(tmp_path):
    with pytest.raises(ArchiveInvalid, match=r"index\.json.*deeper"):
        await _load(tmp_path, plain_tar({"index.json": b'{"manifests": ' + nested(1500) + b"}"}))


async def test_archive_whose_oci_index_blob_nests_deep_is_archive_invalid(tmp_path):
    index = b'{"schemaVersion": 2, "mediaType": "' + OCI_INDEX.encode() + b'", "manifests": ' + nested(1500) + b"}"
    digest = hashlib.sha256(index).hexdigest()
    top = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": f"sha256:{digest}",
                                              "size": len(index)}]}
    archive = plain_tar({f"blobs/sha256/{digest}": index, "index.json": json.dumps(top).encode()})
    with pytest.raises(ArchiveInvalid, match="deeper"):
        await _load(tmp_path, archive)


async def test_docker_archive_whose_manifest_json_nests_deep_is_archive_invalid(tmp_path):
    with pytest.raises(ArchiveInvalid, match=r"manifest\.json.*deeper"):
        await _load(tmp_path, plain_tar({"manifest.json": nested(1500)}))
