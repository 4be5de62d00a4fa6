"""A registry in the test process, for the faults a real one cannot produce.

It serves manifests and blobs from memory and can corrupt, truncate, reset,
fail with a status, rate-limit, challenge for a token or redirect to another
host, and send blob bodies without a length (chunked, or ended by closing the
connection). It counts every request it gets. With ``referrers_api`` it answers the
OCI 1.1 referrers API from the manifests it holds that have a ``subject``
(``artifactType`` filtering, pages of ``referrers_page`` entries).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fault:
    """What to do to the next matching requests (``times`` of them; -1 for all)."""

    kind: str  # corrupt, truncate, reset, status, slow, hold, stall (half the body, then nothing until release())
    status: int = 500
    times: int = -1
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # hold: half the blob goes out, the rest once this is set (clients join a fill in flight).
    gate: asyncio.Event | None = None


def make_image(repository_layers: list[bytes], config: bytes | None = None) -> tuple[bytes, dict[str, bytes]]:
    """An OCI manifest over the given layer bytes; returns (manifest, blobs by digest)."""
    config = config or json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    blobs = {digest_of(config): config}
    layers = []
    for layer in repository_layers:
        blobs[digest_of(layer)] = layer
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest_of(layer),
                       "size": len(layer)})
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": layers,
    }).encode()
    return manifest, blobs


class FakeUpstream:
    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}  # (repo, tag or digest) -> (type, bytes)
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.tags: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.faults: dict[str, Fault] = {}  # keyed by digest, "manifest" or "tags"
        self.token: str | None = None  # when set, a Bearer challenge is required
        self.token_requests: list[dict[str, str]] = []
        self.basic: tuple[str, str] | None = None
        self.redirect_to: str | None = None  # base URL of a host blobs redirect to
        self.referrers_api = False  # True: GET /v2/<name>/referrers/<digest> is answered
        self.referrers_page: int | None = None  # entries per page of a referrers answer
        self.framing = "length"  # of blob bodies: length (Content-Length), chunked, or close
        self.tags_page: int | None = None  # tags per page when the client sends no n (as Docker Hub pages)
        # When set and not yet set()-ed, every request is accepted and left unanswered
        # until it is: an upstream that hangs.
        self.silence: asyncio.Event | None = None
        self._released = asyncio.Event()  # ends every "stall" fault
        self.app = web.Application()
        self.app.router.add_get("/v2/", self._base)
        self.app.router.add_get("/token", self._token)
        self.app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        self.app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        self.app.router.add_get("/v2/{name:.+}/tags/list", self._tags)
        self.app.router.add_get("/v2/{name:.+}/referrers/{digest}", self._referrers)
        self.app.router.add_get("/cdn/{digest}", self._cdn)
        self.base_url = ""

    def add_image(self, repository: str, tag: str, layers: list[bytes], config: bytes | None = None) -> str:
        manifest, blobs = make_image(layers, config)
        digest = digest_of(manifest)
        self.manifests[(repository, tag)] = (OCI_MANIFEST, manifest)
        self.manifests[(repository, digest)] = (OCI_MANIFEST, manifest)
        for blob_digest, data in blobs.items():
            self.blobs[(repository, blob_digest)] = data
        self.tags.setdefault(repository, []).append(tag)
        return digest

    def add_artifact(
        self, repository: str, subject: str, artifact_type: str, payload: bytes,
        annotations: dict[str, str] | None = None, tag: str | None = None,
    ) -> str:
        """An OCI 1.1 artifact (empty config, one layer) whose ``subject`` is ``subject``."""
        subject_type, subject_data = self.manifests[(repository, subject)]
        config = b"{}"
        doc: dict = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(payload), "size": len(payload)}],
            "subject": {"mediaType": subject_type, "digest": subject, "size": len(subject_data)},
        }
        if annotations:
            doc["annotations"] = annotations
        manifest = json.dumps(doc).encode()
        digest = digest_of(manifest)
        self.manifests[(repository, digest)] = (OCI_MANIFEST, manifest)
        if tag is not None:
            self.manifests[(repository, tag)] = (OCI_MANIFEST, manifest)
            self.tags.setdefault(repository, []).append(tag)
        self.blobs[(repository, digest_of(config))] = config
        self.blobs[(repository, digest_of(payload))] = payload
        return digest

    def referrers_of(self, repository: str, subject: str) -> list[dict]:
        """The descriptors the referrers API lists for ``subject``, in digest order."""
        out = []
        for (repo, reference), (media_type, data) in sorted(self.manifests.items()):
            if repo != repository or not reference.startswith("sha256:"):
                continue
            doc = json.loads(data)
            if (doc.get("subject") or {}).get("digest") != subject:
                continue
            descriptor = {"mediaType": media_type, "digest": reference, "size": len(data),
                          "artifactType": doc.get("artifactType") or doc["config"]["mediaType"]}
            if doc.get("annotations"):
                descriptor["annotations"] = doc["annotations"]
            out.append(descriptor)
        return out

    def release(self) -> None:
        """Answer everything held back by ``silence`` or a stall."""
        if self.silence is not None:
            self.silence.set()
        self._released.set()

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    async def _record(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path, dict(request.headers)))
        if self.silence is not None:
            await self.silence.wait()

    def _auth(self, request: web.Request) -> web.Response | None:
        if self.token is None:
            return None
        if request.headers.get("Authorization") == f"Bearer {self.token}":
            return None
        realm = f"{self.base_url}/token"
        name = request.match_info.get("name", "")
        challenge = f'Bearer realm="{realm}",service="fake",scope="repository:{name}:pull"'
        return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]}, status=401,
                                 headers={"WWW-Authenticate": challenge})

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append({"scope": request.query.get("scope", ""),
                                    "authorization": request.headers.get("Authorization", "")})
        if self.basic is not None:
            expected = "Basic " + base64.b64encode(f"{self.basic[0]}:{self.basic[1]}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        return web.json_response({"token": self.token, "expires_in": 300})

    async def _base(self, request: web.Request) -> web.Response:
        await self._record(request)
        return self._auth(request) or web.json_response({})

    def _fault(self, key: str) -> Fault | None:
        fault = self.faults.get(key)
        if fault is None or fault.times == 0:
            return None
        if fault.times > 0:
            fault.times -= 1
        return fault

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if denied := self._auth(request):
            return denied
        fault = self._fault("manifest")
        if fault is not None and fault.kind == "status":
            return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "x"}]}, status=fault.status,
                                     headers=fault.headers)
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay)
        found = self.manifests.get((request.match_info["name"], request.match_info["reference"]))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}, status=404)
        media_type, data = found
        if fault is not None and fault.kind == "corrupt":
            data = data.replace(b"schemaVersion", b"schemaversion")
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest_of(found[1])}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        return web.Response(body=data, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if denied := self._auth(request):
            return denied
        digest = request.match_info["digest"]
        data = self.blobs.get((request.match_info["name"], digest))
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data)), "Docker-Content-Digest": digest})
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(f"{self.redirect_to}/cdn/{digest}")
        return await self._send_blob(request, digest, data)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        digest = request.match_info["digest"]
        data = next((d for (_, dg), d in self.blobs.items() if dg == digest), None)
        if data is None:
            raise web.HTTPNotFound()
        return await self._send_blob(request, digest, data)

    async def _send_blob(self, request: web.Request, digest: str, data: bytes) -> web.StreamResponse:
        fault = self._fault(digest)
        if fault is not None and fault.kind == "status":
            return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "x"}]}, status=fault.status,
                                     headers=fault.headers)
        body = data
        if fault is not None and fault.kind == "corrupt":
            body = data[:-1] + bytes([data[-1] ^ 0xFF])
        if self.framing == "close":
            return await self._send_until_close(request, body, fault)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if self.framing == "chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = len(data)
        await response.prepare(request)
        half = len(body) // 2
        await response.write(body[:half])
        await _pause(fault)
        if fault is not None and fault.kind == "stall":
            await self._released.wait()
        if fault is not None and fault.kind in ("truncate", "reset"):
            assert request.transport is not None
            if fault.kind == "reset":
                request.transport.abort()
            else:
                request.transport.close()
            return response
        await response.write(body[half:])
        await response.write_eof()
        return response

    async def _send_until_close(self, request: web.Request, body: bytes, fault: Fault | None) -> web.StreamResponse:
        """A body without Content-Length or chunks, ended by closing the connection (HTTP/1.1
        allows it). aiohttp frames every body it writes, so this one is written by hand."""
        transport = request.transport
        assert transport is not None
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
        half = len(body) // 2
        transport.write(body[:half])
        await _pause(fault)
        transport.write(body[half:])
        transport.close()
        # The response is on the wire already: aiohttp finds the connection closing and writes nothing.
        return web.StreamResponse()

    async def _tags(self, request: web.Request) -> web.Response:
        await self._record(request)
        if denied := self._auth(request):
            return denied
        fault = self._fault("tags")
        if fault is not None and fault.kind == "status":
            return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "x"}]}, status=fault.status)
        name = request.match_info["name"]
        if name not in self.tags:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN", "message": "unknown"}]}, status=404)
        tags = sorted(self.tags[name])
        last = request.query.get("last")
        if last is not None:
            tags = [t for t in tags if t > last]
        n = int(request.query["n"]) if "n" in request.query else self.tags_page
        headers = {}
        if n is not None and len(tags) > n:
            tags = tags[:n]
            headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def _referrers(self, request: web.Request) -> web.Response:
        await self._record(request)
        if not self.referrers_api:
            return web.json_response({"errors": [{"code": "NOT_FOUND", "message": "no such route"}]}, status=404)
        fault = self._fault("referrers")
        if fault is not None and fault.kind == "status":
            return web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "x"}]}, status=fault.status)
        name, subject = request.match_info["name"], request.match_info["digest"]
        found = self.referrers_of(name, subject)
        headers = {"Content-Type": OCI_INDEX}
        wanted = request.query.get("artifactType")
        if wanted is not None:
            found = [d for d in found if d["artifactType"] == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        last = request.query.get("last")
        if last is not None:
            found = [d for d in found if d["digest"] > last]
        if self.referrers_page is not None and len(found) > self.referrers_page:
            found = found[: self.referrers_page]
            headers["Link"] = f'</v2/{name}/referrers/{subject}?last={found[-1]["digest"]}>; rel="next"'
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
        return web.Response(body=json.dumps(body).encode(), headers=headers)


async def _pause(fault: Fault | None) -> None:
    """Between the two halves of a blob body: what a slow or held fault asks for."""
    if fault is not None and fault.kind == "slow":
        await asyncio.sleep(fault.delay)
    if fault is not None and fault.kind == "hold":
        assert fault.gate is not None
        await fault.gate.wait()
