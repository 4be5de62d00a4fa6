"""``pin``, ``unpin``, ``gc`` and ``stats``: the lifecycle verbs of the admin API.

Pinning marks every row of an image (in each repository that holds it, with
an index's platform images) so eviction passes it by. ``gc`` sweeps what
nothing references; ``stats`` reports the store and the hit ratio since the
process started.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin.body import image_names
from proxy.admin.query import Resolver, refs_of
from proxy.errors import AdminInvalid
from proxy.metrics.events import Events
from proxy.metrics.prometheus import metrics_of
from proxy.resources import EVENTS, LIFECYCLE, METADATA, ROUTER, UPSTREAMS
from storage.errors import RegcacheError
from storage.index.listing import list_images
from storage.index.rows import ImageKey


async def _set_pinned(request: web.Request, pinned: bool) -> web.Response:
    metadata = request.config_dict[METADATA]
    router = request.config_dict[ROUTER]
    await request.config_dict[LIFECYCLE].sync_shared()
    images = await list_images(metadata)
    resolver = Resolver(images, router)
    verb = "Pinned" if pinned else "Unpinned"
    results: list[dict[str, Any]] = []
    names, _ = await image_names(request)
    for name in names:
        try:
            image, ref = resolver.find(name)
        except RegcacheError as exc:
            results.append({"image": name, "error": exc.message})
            continue
        lifecycle = request.config_dict[LIFECYCLE]
        # Every repository holding it; a unit (index with its platform images) is pinned by any of its rows.
        for upstream, repository in image.repositories:
            repo_id = await metadata.repository_id(upstream, repository)
            if repo_id is not None:
                key = ImageKey(repo_id, image.digest)
                await (lifecycle.pin(key) if pinned else lifecycle.unpin(key))
        shown = str(ref) if ref is not None else next((str(r) for r in refs_of(image, router)), image.digest)
        results.append({"image": name, "lines": [f"{verb}: {shown}"]})
    return web.json_response({"results": results})


async def pin(request: web.Request) -> web.Response:
    return await _set_pinned(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _set_pinned(request, False)


async def gc(request: web.Request) -> web.Response:
    """A whole lifecycle pass (expire, evict to the budget, sweep); ``grace`` sweeps with that grace."""
    raw = request.query.get("grace")
    lifecycle = request.config_dict[LIFECYCLE]
    if raw is None:
        report = await lifecycle.gc("manual")
    else:
        try:
            grace = float(raw)
        except ValueError:
            raise AdminInvalid(f"grace must be a number of seconds, got {raw[:20]!r}") from None
        if grace < 0:
            raise AdminInvalid("grace must not be negative")
        report = await lifecycle.sweep(grace)
    # Lifecycle reports every pass to the metrics itself (on_report).
    return web.json_response(report.to_dict())


def _hit_ratio(events: Events) -> tuple[float | None, dict[str, float]]:
    """Hits over requests for blobs and manifests, from the metrics when they are on."""
    metrics = metrics_of(events)
    if metrics is None:
        return None, {}
    registry = metrics.registry
    counts: dict[str, float] = {}
    for kind in ("blob", "manifest"):
        for what in ("requests", "hits"):
            value = registry.get_sample_value(f"registry_proxy_{what}_total", {"type": kind})
            counts[f"{kind}_{what}"] = value or 0.0
    requests = counts["blob_requests"] + counts["manifest_requests"]
    hits = counts["blob_hits"] + counts["manifest_hits"]
    return (hits / requests if requests else None), counts


async def stats(request: web.Request) -> web.Response:
    metadata = request.config_dict[METADATA]
    await metadata.flush()
    answer = await request.config_dict[LIFECYCLE].stats()
    answer["pulls"] = await metadata.pull_count()
    answer["hit_ratio"], answer["requests"] = _hit_ratio(request.config_dict[EVENTS])
    answer["upstreams"] = {name: client.breaker.stats() for name, client in request.config_dict[UPSTREAMS].items()}
    return web.json_response(answer)


def add_routes(admin: web.Application) -> None:
    admin.router.add_post("/pin", pin, name="admin_pin")
    admin.router.add_post("/unpin", unpin, name="admin_unpin")
    admin.router.add_post("/gc", gc, name="admin_gc")
    admin.router.add_get("/stats", stats, name="admin_stats")
