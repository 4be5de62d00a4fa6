"""``POST /admin/rmi``: docker's ``rmi`` for a cache, with docker's rules and lines.

- ``name:tag`` removes that tag (``Untagged: name:tag``); when no other tag
  of the repository points at the image, the image leaves the repository too
  (``Untagged: name@digest``).
- ``name@digest`` removes the image from that repository with its tags there.
- an image ID (prefix) or bare digest removes every name of the image, but
  only with ``force`` when several tags or repositories use it, as dockerd
  refuses ("must be forced").

When no repository holds the image any more it is deleted: the rows go in one
transaction and the lifecycle (``storage.lifecycle``) unlinks exactly the
blobs nothing else references (``Deleted:`` lines); layers another image
uses stay. A pinned image needs ``force`` too.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from proxy.admin.body import image_names
from proxy.admin.query import Ref, Resolver, refs_of
from proxy.errors import AdminConflict
from proxy.http.context import LOG
from proxy.pull.routing import Router
from proxy.resources import LIFECYCLE, METADATA, PULLTHROUGH, ROUTER, STORE
from storage.blobs import BlobStore
from storage.errors import RegcacheError
from storage.index.listing import CachedImage, list_images
from storage.index.metadata import Metadata
from storage.index.rows import ImageKey
from storage.lifecycle.service import Lifecycle
from storage.oci.digest import Digest

log = logging.getLogger("regcache.admin.rmi")


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


class Remover:
    def __init__(self, metadata: Metadata, store: BlobStore, lifecycle: Lifecycle, router: Router) -> None:
        self.metadata = metadata
        self.store = store
        self.lifecycle = lifecycle
        self.router = router

    async def remove(self, text: str, force: bool) -> list[str]:
        images = await list_images(self.metadata)
        image, ref = Resolver(images, self.router).find(text)
        refs = refs_of(image, self.router)
        if ref is None:
            tags = [r for r in refs if r.tag]
            repos = {(r.upstream, r.repository) for r in refs}
            if (len(tags) > 1 or len(repos) > 1) and not force:
                raise AdminConflict(
                    f"conflict: unable to delete {_short(image.image_id)} (must be forced) - "
                    "image is referenced in multiple repositories"
                )
            return await self._drop(image, refs, sorted(repos), force)
        if ref.tag is not None:
            lines = [f"Untagged: {ref}"]
            still_tagged = [
                r
                for r in refs
                if r.tag and r != ref and r.repository == ref.repository and r.upstream == ref.upstream
            ]
            if still_tagged:
                await self._untag(ref)
                return lines
            repo = [(ref.upstream, ref.repository)]
            return lines + await self._drop(image, self._digest_refs(refs, ref), repo, force)
        in_repo = [r for r in refs if (r.upstream, r.repository) == (ref.upstream, ref.repository)]
        return await self._drop(image, in_repo, [(ref.upstream, ref.repository)], force)

    @staticmethod
    def _digest_refs(refs: list[Ref], ref: Ref) -> list[Ref]:
        return [r for r in refs if r.digest and (r.upstream, r.repository) == (ref.upstream, ref.repository)]

    async def _untag(self, ref: Ref) -> None:
        repo_id = await self.metadata.repository_id(ref.upstream, ref.repository)
        if repo_id is not None and ref.tag is not None:
            await self.metadata.untag(repo_id, ref.tag)
        shared = self.store.backend.shared
        if shared is not None and ref.tag is not None:
            await shared.delete_tag(ref.upstream, ref.repository, ref.tag)

    async def _drop(self, image: CachedImage, untag: list[Ref], repos: list[tuple[str, str]], force: bool) -> list[str]:
        """Take the image (with an index's platform images) out of ``repos``; delete what nothing else uses."""
        remaining = [r for r in image.repositories if r not in repos]
        # The manifest and everything it references: the blobs that may go with it.
        candidates = [] if remaining else await self.metadata.collect.reachable(image.digest)
        for upstream, repository in repos:
            repo_id = await self.metadata.repository_id(upstream, repository)
            if repo_id is None:
                continue
            # The lifecycle reports what the removal freed (metrics, events) itself.
            await self.lifecycle.remove_image(ImageKey(repo_id, image.digest), force=force)
        lines = [f"Untagged: {r}" for r in untag if r.tag] + [f"Untagged: {r}" for r in untag if r.digest]
        if remaining:
            return lines
        deleted = [d for d in candidates if await self.store.stat(Digest.parse(d)) is None]
        first = image.image_id if image.image_id in deleted or image.is_index else None
        if first is not None:
            lines.append(f"Deleted: {first}")
        return lines + [f"Deleted: {d}" for d in deleted if d != first]


async def rmi(request: web.Request) -> web.Response:
    names, body = await image_names(request, '{"images": ["IMAGE", ...], "force": false}')
    metadata = request.config_dict[METADATA]
    await request.config_dict[LIFECYCLE].sync_shared()  # a name another replica recorded is removable here
    remover = Remover(metadata, request.config_dict[STORE], request.config_dict[LIFECYCLE], request.config_dict[ROUTER])
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            results.append({"image": name, "lines": await remover.remove(name, bool(body.get("force")))})
        except RegcacheError as exc:
            results.append({"image": name, "error": exc.message})
    # Cached manifests and links may name what is gone (the lifecycle forgets after a removal).
    await request.config_dict[PULLTHROUGH].store_changed()
    request[LOG]["result"] = f"{sum('lines' in r for r in results)} removed"
    return web.json_response({"results": results})


def add_routes(admin: web.Application) -> None:
    admin.router.add_post("/rmi", rmi, name="admin_rmi")
