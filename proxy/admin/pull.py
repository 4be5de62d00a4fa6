"""``POST /admin/pull``: warm the cache through the normal pull-through path.

The handler pulls as a client would (manifest, then for each image the config
and layers) through ``PullThrough``, so single flight, verification and
linking are exactly those of a real pull. It reads every fill to its end, and
streams docker's progress messages (``jsonmessage``: ``status``, ``id``,
``progressDetail``, ``error``) as JSON lines while it goes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.access.gate import ACCESS
from proxy.admin.body import json_object
from proxy.errors import AdminInvalid
from proxy.http.context import ERROR, IDENTITY, LOG
from proxy.pull.answers import FillingBlob
from proxy.pull.referrers import Referrers
from proxy.pull.routing import Route
from proxy.pull.service import PullThrough
from proxy.resources import PULLTHROUGH, REFERRERS, ROUTER
from storage.errors import RegcacheError
from storage.oci.digest import Digest
from storage.oci.manifests import parse_manifest
from storage.oci.platforms import host_platform, platform_matches
from storage.oci.reference import ImageReference, ManifestReference

log = logging.getLogger("regcache.admin.pull")

# docker pulls three layers at a time.
CONCURRENT_LAYERS = 3
Emit = Callable[[dict[str, Any]], Awaitable[None]]


def short(digest: str) -> str:
    return digest.partition(":")[2][:12]


class Puller:
    def __init__(self, pullthrough: PullThrough, route: Route, emit: Emit, identity: str) -> None:
        self.pullthrough = pullthrough
        self.route = route
        self.emit = emit
        self.identity = identity  # the admin token's name: the image's last puller
        self.fetched = False  # anything came from the upstream

    async def manifest(self, reference: ManifestReference) -> tuple[str, bytes, str]:
        found = await self.pullthrough.manifest(self.route, reference, [], puller=self.identity)
        if found.result in ("miss", "coalesced"):
            self.fetched = True
        return found.digest, found.data, found.media_type

    async def image(self, data: bytes, media_type: str) -> None:
        parsed = parse_manifest(data, media_type)
        if parsed.config is not None:
            await self.blob(parsed.config.digest, None)
        layers = parsed.layers
        for layer in layers:
            await self.emit({"status": "Pulling fs layer", "id": short(str(layer.digest))})
        slots = asyncio.Semaphore(CONCURRENT_LAYERS)

        async def one(digest: Digest) -> None:
            async with slots:
                await self.blob(digest, short(str(digest)))

        await asyncio.gather(*(one(layer.digest) for layer in layers))

    async def blob(self, digest: Digest, progress_id: str | None) -> None:
        answer = await self.pullthrough.blob(self.route, digest)
        if not isinstance(answer, FillingBlob):
            await answer.stored()
            if progress_id:
                await self.emit({"status": "Already exists", "id": progress_id})
            return
        self.fetched = True
        size = await answer.opened()
        current = 0
        last_sent = -1
        async for chunk in answer.chunks():
            current += len(chunk)
            if progress_id and (current - last_sent >= 512 * 1024 or current == size):
                last_sent = current
                await self.emit(
                    {
                        "status": "Downloading",
                        "id": progress_id,
                        "progressDetail": {"current": current, "total": size or 0},
                    }
                )
        # The bytes end once the digest is verified; the pull is done once the store has the blob.
        await answer.stored()
        if progress_id:
            await self.emit({"status": "Verifying Checksum", "id": progress_id})
            await self.emit({"status": "Download complete", "id": progress_id})
            await self.emit({"status": "Pull complete", "id": progress_id})


def _parse_request(body: Any) -> tuple[str, str | None, bool, bool]:
    """(image, platform, all platforms, with referrers: on unless ``"referrers": false``)."""
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise AdminInvalid('expected {"image": "NAME[:TAG|@DIGEST]"}')
    platform = body.get("platform")
    if platform is not None and (not isinstance(platform, str) or platform.count("/") not in (1, 2)):
        raise AdminInvalid(f"invalid platform {platform!r}: expected os/arch[/variant]")
    return body["image"], platform, bool(body.get("all_platforms")), body.get("referrers", True) is not False


async def _pull_referrers(puller: Puller, referrers: Referrers, subjects: list[str]) -> None:
    """Signatures, SBOMs and attestations of what was pulled (and theirs), with their blobs:
    admission checks then pass from the cache alone."""
    seen = set(subjects)
    while subjects:
        answer = await referrers.answer(puller.route, Digest.parse(subjects.pop()))
        for referrer in answer.referrers:
            if referrer.digest in seen:
                continue
            seen.add(referrer.digest)
            subjects.append(referrer.digest)
            await puller.emit({"status": f"Referrer {referrer.artifact_type or referrer.media_type}",
                               "id": short(referrer.digest)})
            _, data, media_type = await puller.manifest(ManifestReference(digest=Digest.parse(referrer.digest)))
            if not parse_manifest(data, media_type).is_index:
                await puller.image(data, media_type)


async def pull(request: web.Request) -> web.StreamResponse:
    body = await json_object(request)
    text, wanted_platform, all_platforms, with_referrers = _parse_request(body)
    ref = ImageReference.parse(text)
    name = f"{ref.registry}/{ref.name}" if ref.registry else ref.name
    route = request.config_dict[ROUTER].resolve(name)
    # The upstream's allow and deny lists bind admins too: a repository nobody may pull is not warmed.
    request.config_dict[ACCESS].judge(request, request[IDENTITY], route)
    reference = ManifestReference(digest=ref.digest) if ref.digest else ManifestReference(tag=ref.tag or "latest")
    shown = str(ref) if (ref.tag or ref.digest) else f"{ref}:latest"
    request[LOG].update(upstream=route.upstream_name, repository=route.repository, reference=str(reference))

    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    async def emit(message: dict[str, Any]) -> None:
        await response.write(json.dumps(message).encode() + b"\n")

    puller = Puller(request.config_dict[PULLTHROUGH], route, emit, str(request[IDENTITY]))
    try:
        await emit({"status": f"Pulling from {route.repository}", "id": str(reference)})
        digest, data, media_type = await puller.manifest(reference)
        parsed = parse_manifest(data, media_type)
        pulled = [digest]
        if parsed.is_index:
            wanted = wanted_platform or host_platform()
            children = [c for c in parsed.children if all_platforms or platform_matches(wanted, c.platform)]
            if not children:
                offered = ", ".join(c.platform or "?" for c in parsed.children)
                raise AdminInvalid(f"no matching manifest for {wanted} in the manifest list entries ({offered})")
            for child in children:
                if all_platforms:
                    await emit({"status": f"Platform {child.platform}", "id": short(str(child.digest))})
                _, child_data, child_type = await puller.manifest(ManifestReference(digest=child.digest))
                await puller.image(child_data, child_type)
                pulled.append(str(child.digest))
        else:
            await puller.image(data, media_type)
        if with_referrers:
            await _pull_referrers(puller, request.config_dict[REFERRERS], pulled)
        await emit({"status": f"Digest: {digest}"})
        verdict = "Downloaded newer image for" if puller.fetched else "Image is up to date for"
        await emit({"status": f"Status: {verdict} {shown}"})
        request[LOG]["result"] = "fetched" if puller.fetched else "cached"
    except RegcacheError as exc:
        # Headers are out: the error travels as docker's error message.
        request[ERROR] = exc
        await emit({"error": exc.message, "errorDetail": {"message": exc.message}})
    except (TimeoutError, OSError) as exc:
        request[ERROR] = exc
        log.warning("pull of %s failed: %r", shown, exc)
        message = f"pull failed: {type(exc).__name__}: {exc}".rstrip(": ")
        await emit({"error": message, "errorDetail": {"message": message}})
    await response.write_eof()
    return response


def add_routes(admin: web.Application) -> None:
    admin.router.add_post("/pull", pull, name="admin_pull")
