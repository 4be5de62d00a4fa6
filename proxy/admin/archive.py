"""``POST /admin/save`` and ``POST /admin/load``: images out of and into the cache as one tar.

save: the body names images (``{"images": [...], "platform", "docker_platform",
"compress"}``); everything they need is pulled through first, so a failure
is a clean JSON error before any byte of the archive goes out; then the tar
streams from the store (``storage.archive_write``) with its exact length when
uncompressed.

load: the body is the archive (plain, gzip or zstd); query ``upstream`` and
``repository_prefix`` choose where the images land. ``storage.archive_read``
verifies and stores the blobs; names are routed here; then the pull service
records every manifest, image (pinned) and tag in one transaction and tells
the other replicas. A rejected archive
leaves the metadata as it was and its new blobs are removed.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from proxy.admin.body import image_names
from proxy.errors import AdminInvalid, RegistryUnknown, Unsupported
from proxy.http.context import LOG
from proxy.pull.referrers import Referrers
from proxy.pull.routing import Route, Router
from proxy.pull.service import PullThrough, RecordedManifest
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH, REFERRERS, ROUTER, SETTINGS, STORE
from storage import paths
from storage.archive.load import ArchiveLoader, LoadedImage
from storage.archive.save import ArchivePlan, DockerImage, SavedImage, write_archive
from storage.archive.tar import CHUNK, compressed
from storage.errors import ArchiveInvalid, RegcacheError, SizeMismatch
from storage.index.metadata import Metadata
from storage.oci.digest import Digest
from storage.oci.manifests import IMAGE_TYPES, Descriptor, parse_manifest
from storage.oci.platforms import host_platform, platform_matches
from storage.oci.reference import ImageReference, ManifestReference, validate_name

log = logging.getLogger("regcache.archive")

CONTENT_TYPES = {None: "application/x-tar", "gzip": "application/gzip", "zstd": "application/zstd"}
# Blobs pulled through at the same time while preparing a save.
FETCH_CONCURRENCY = 4
# Where a load puts images the archive gives no name.
UNNAMED_REPOSITORY = "loaded"


def pick_platform(children: list[Descriptor], want: str) -> Descriptor | None:
    return next((c for c in children if c.media_type in IMAGE_TYPES and platform_matches(want, c.platform)), None)


def archive_names(route: Route, tag: str | None, digest: str) -> tuple[str, str | None]:
    """(containerd's full name, docker's RepoTags name) of a saved image."""
    if route.upstream.is_docker_hub:
        full = f"docker.io/{route.repository}"
        familiar = route.repository.removeprefix("library/")
    else:
        full = familiar = f"{route.upstream_name}/{route.repository}"
    if tag is None:
        return f"{full}@{digest}", None
    return f"{full}:{tag}", f"{familiar}:{tag}"


# --------------------------------------------------------------------------- save


class SavePlanner:
    """Resolves names, pulls through what is missing, and lays out the archive."""

    def __init__(self, pullthrough: PullThrough, router: Router, referrers: Referrers) -> None:
        self.pullthrough = pullthrough
        self.router = router
        self.referrers = referrers
        self.plan = ArchivePlan()
        self._fetch = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def add(self, text: str, platform: str | None, docker_platform: str) -> None:
        ref = ImageReference.parse(text)
        route = self.router.resolve(f"{ref.registry}/{ref.name}" if ref.registry else ref.name)
        tag = ref.tag if ref.tag or ref.digest else "latest"
        reference = ManifestReference(digest=ref.digest) if ref.digest else ManifestReference(tag=tag)
        top = await self.pullthrough.manifest(route, reference, [], count=False)
        parsed = parse_manifest(top.data, top.media_type)
        descriptor = {"mediaType": parsed.media_type, "digest": top.digest, "size": len(top.data)}
        docker_child: str | None = top.digest
        included = [top.digest]
        if parsed.is_index:
            chosen = pick_platform(parsed.children, platform) if platform else None
            if platform and chosen is None:
                raise AdminInvalid(f"{text} has no {platform} image")
            if chosen is not None:
                # One platform asked for: the archive holds that image, under the upstream's digest.
                descriptor = {"mediaType": chosen.media_type, "digest": str(chosen.digest), "size": chosen.size}
                included = [str(chosen.digest)]
            else:
                self.plan.add_blob(Digest.parse(top.digest), len(top.data))
                included = [str(c.digest) for c in parsed.children]
            fallback = next((c for c in parsed.children if c.media_type in IMAGE_TYPES), None)
            docker = chosen or pick_platform(parsed.children, docker_platform) or fallback
            docker_child = str(docker.digest) if docker else None
        elif parsed.media_type not in IMAGE_TYPES:
            raise Unsupported(f"{text} is a {parsed.media_type} manifest, which cannot be saved")
        images = await asyncio.gather(*(self._image(route, digest) for digest in included))
        docker_image = dict(zip(included, images, strict=True)).get(docker_child) if docker_child else None
        full, docker_tag = archive_names(route, tag if not ref.digest else ref.tag, top.digest)
        self.plan.images.append(SavedImage(descriptor, full, docker_tag, docker_image))
        await self._referrers(route, [top.digest, *included])

    async def _referrers(self, route: Route, subjects: list[str]) -> None:
        """Signatures, SBOMs and attestations of what is saved (and theirs: a signed SBOM), each as
        an untagged entry of the same repository, so a load puts them where their subject lands."""
        seen = set(subjects)
        while subjects:
            answer = await self.referrers.answer(route, Digest.parse(subjects.pop()))
            for referrer in answer.referrers:
                if referrer.digest in seen:
                    continue
                seen.add(referrer.digest)
                subjects.append(referrer.digest)
                await self._image(route, referrer.digest)
                full, _ = archive_names(route, None, referrer.digest)
                self.plan.images.append(SavedImage(referrer.descriptor(), full, None, None))

    async def _image(self, route: Route, digest: str) -> DockerImage | None:
        found = await self.pullthrough.manifest(route, ManifestReference(digest=Digest.parse(digest)), [], count=False)
        parsed = parse_manifest(found.data, found.media_type)
        self.plan.add_blob(Digest.parse(found.digest), len(found.data))
        if parsed.media_type not in IMAGE_TYPES:
            return None  # a nested index: saved as it is, nothing docker can load
        refs = [r for r in parsed.references if r.kind in ("config", "layer")]
        for ref in refs:
            self.plan.add_blob(ref.digest, ref.size)
        await asyncio.gather(*(self._ensure_blob(route, r.digest, r.size) for r in refs))
        if parsed.config is None:
            return None
        return DockerImage(parsed.config.digest, tuple(layer.digest for layer in parsed.layers))

    async def _ensure_blob(self, route: Route, digest: Digest, size: int) -> None:
        async with self._fetch:
            answer = await self.pullthrough.blob(route, digest)
            stored = await answer.stored()
        if stored != size:
            raise SizeMismatch(f"blob {digest} is {stored} bytes, its descriptor says {size}")


async def save(request: web.Request) -> web.StreamResponse:
    names, body = await image_names(request, '{"images": ["IMAGE", ...], "compress": "gzip"|"zstd"}')
    compress = body.get("compress")
    if compress not in CONTENT_TYPES:
        raise AdminInvalid('save: "compress" must be "gzip", "zstd" or absent')
    platform = body.get("platform") or None
    docker_platform = body.get("docker_platform") or platform or host_platform()
    for value in (platform, docker_platform):
        if value is not None and (not isinstance(value, str) or value.count("/") not in (1, 2)):
            raise AdminInvalid(f"save: platform {value!r} is not os/arch[/variant]")
    await request.config_dict[LIFECYCLE].sync_shared()  # not an image another replica removed
    planner = SavePlanner(request.config_dict[PULLTHROUGH], request.config_dict[ROUTER],
                          request.config_dict[REFERRERS])
    for name in names:
        await planner.add(name, platform, docker_platform)
    plan = planner.plan
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[compress]})
    if compress is None:
        response.content_length = plan.size()
    request[LOG]["result"] = f"{len(plan.images)} images, {len(plan.blobs)} blobs"
    await response.prepare(request)
    store = request.config_dict[STORE]
    async for chunk in compressed(write_archive(plan, store.read), compress):
        await response.write(chunk)
    await response.write_eof()
    return response


# --------------------------------------------------------------------------- load


def _familiar(name: str) -> str:
    return name.removeprefix("library/")


def load_targets(
    router: Router, image: LoadedImage, upstream: str | None, prefix: str | None
) -> list[tuple[Route, str | None]]:
    """Where a loaded image's names land: (route, tag or None)."""
    if not image.names:
        name = f"{prefix}/{UNNAMED_REPOSITORY}" if prefix else UNNAMED_REPOSITORY
        return [(router.resolve(name, ns=upstream), None)]
    out = []
    for text in image.names:
        try:
            ref = ImageReference.parse(text)
        except RegcacheError as exc:
            raise ArchiveInvalid(f"image name {text[:200]!r} in the archive: {exc.message}") from None
        registry, name = ref.registry, ref.name
        if registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
            name = _familiar(name)
            try:
                router.upstream(registry)
            except RegistryUnknown:
                registry = None  # docker's default registry: the same as no registry at all
        if registry is None:
            name = _familiar(name) if prefix else name
        if prefix:
            name = f"{prefix}/{name}"
        if upstream:
            route = router.resolve(name, ns=upstream)
        elif registry:
            try:
                router.upstream(registry)
            except RegistryUnknown:
                raise AdminInvalid(
                    f"the archive names registry {registry!r}, which is not configured here: choose one with --upstream"
                ) from None
            route = router.resolve(f"{registry}/{name}")
        else:
            route = router.resolve(name)
        out.append((route, ref.tag or (None if ref.digest else "latest")))
    return out


def shown_name(route: Route, tag: str | None) -> str:
    name = _familiar(route.repository) if route.upstream.is_docker_hub else route.repository
    if route.upstream.is_docker_hub or route.upstream.default:
        return f"{name}:{tag}"
    return f"{route.upstream_name}/{name}:{tag}"


async def _known(metadata: Metadata, digests: set[str]) -> set[str]:
    return {d for d in digests if await metadata.blob_size(d) is not None}


async def load(request: web.Request) -> web.Response:
    router, metadata = request.config_dict[ROUTER], request.config_dict[METADATA]
    upstream = request.query.get("upstream") or None
    prefix = (request.query.get("repository_prefix") or "").strip("/") or None
    if upstream is not None:
        router.upstream(upstream)
    if prefix is not None:
        validate_name(prefix)
    settings = request.config_dict[SETTINGS]
    loader = ArchiveLoader(
        request.config_dict[STORE], paths.tmp_dir(settings.data_dir), max_metadata=settings.limits.max_manifest_size
    )
    pullthrough = request.config_dict[PULLTHROUGH]
    try:
        result = await loader.read(request.content.iter_chunked(CHUNK))
        manifests: list[RecordedManifest] = []
        loaded: list[dict] = []
        for image in result.images:
            for route, tag in load_targets(router, image, upstream, prefix):
                last = len(image.manifests) - 1
                manifests += [
                    RecordedManifest(route, m.digest, m.size, m.parsed, tag if i == last else None)
                    for i, m in enumerate(image.manifests)
                ]
                loaded.append(
                    {
                        "name": shown_name(route, tag) if tag else None,
                        "upstream": route.upstream_name,
                        "repository": route.repository,
                        "tag": tag,
                        "digest": image.digest,
                        "id": image.image_id,
                    }
                )
        await pullthrough.store_changed(result.blobs, manifests)
    except BaseException as exc:
        await loader.remove(loader.written - await _known(metadata, loader.written))
        if isinstance(exc, Exception):
            await _drain(request)
        raise
    finally:
        await loader.close()
    # Members no image referenced (junk in the archive) do not stay in the store.
    junk = loader.unreferenced()
    await loader.remove(junk - await _known(metadata, junk))
    request[LOG]["result"] = f"{len(loaded)} images, {result.written} blobs written, {result.skipped} skipped"
    return web.json_response({"loaded": loaded, "blobs_written": result.written, "blobs_skipped": result.skipped})


async def _drain(request: web.Request) -> None:
    """Read the rest of a refused upload, so the client gets the error instead of a reset."""
    try:
        while await request.content.readany():
            pass
    except (OSError, RuntimeError):
        pass


def add_routes(admin: web.Application) -> None:
    admin.router.add_post("/save", save, name="admin_save")
    admin.router.add_post("/load", load, name="admin_load")


def add_archive_routes(app: web.Application) -> None:
    """For an application without the admin sub-application (tests)."""
    app.router.add_post("/admin/save", save)
    app.router.add_post("/admin/load", load)
