"""``GET /admin/images``: the cached images as docker's image summaries.

Query parameters mirror ``docker images``: ``reference`` (the positional
argument), ``filter`` (repeatable ``key=value``), ``all`` (also the platform
images of cached indexes). Formatting is the client's job, as with docker.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin.query import parse_filters, select
from proxy.http.context import LOG
from proxy.resources import LIFECYCLE, METADATA, ROUTER, STORE
from storage.index.listing import list_images


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


async def images(request: web.Request) -> web.Response:
    filters = parse_filters(request.query.getall("filter", []))
    reference = request.query.get("reference")
    if reference:
        filters.setdefault("reference", []).append(reference)
    metadata = request.config_dict[METADATA]
    await metadata.flush()  # pull counts and times are batched: show the current ones
    await request.config_dict[LIFECYCLE].sync_shared()  # replicas on one bucket list alike
    cached = await list_images(metadata, request.config_dict[STORE])
    found = select(cached, request.config_dict[ROUTER], filters, _flag(request, "all"))
    request[LOG]["result"] = f"{len(found)} images"
    return web.json_response({"images": found})


def add_routes(admin: web.Application) -> None:
    admin.router.add_get("/images", images, name="admin_images")
