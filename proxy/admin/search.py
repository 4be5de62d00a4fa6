"""``GET /admin/search``: cached repositories matching a term, then the upstreams' own search.

Cached repositories come first (they pull without the upstream); where an
upstream offers Docker Hub's search API its results follow, marked as not
cached. An upstream whose search fails is left out and named in ``warnings``:
a search should not fail because one registry is down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from proxy.admin.query import familiar_name
from proxy.errors import AdminInvalid, UpstreamError
from proxy.http.context import LOG
from proxy.pull.routing import Router
from proxy.resources import METADATA, ROUTER, UPSTREAMS

log = logging.getLogger("regcache.admin.search")

DEFAULT_LIMIT = 25
MAX_LIMIT = 100


def _filters(values: list[str]) -> tuple[int, bool | None, bool | None]:
    stars, official, automated = 0, None, None
    for value in values:
        key, sep, arg = value.partition("=")
        if not sep:
            raise AdminInvalid(f"invalid filter '{value}'")
        if key == "stars":
            if not (arg.isascii() and arg.isdigit()):
                raise AdminInvalid(f"invalid filter 'stars={arg}'")
            stars = int(arg)
        elif key in ("is-official", "is-automated"):
            if arg not in ("true", "false"):
                raise AdminInvalid(f"invalid filter '{key}={arg}'")
            if key == "is-official":
                official = arg == "true"
            else:
                automated = arg == "true"
        else:
            raise AdminInvalid(f"invalid filter '{key}'")
    return stars, official, automated


def _upstream_result(router: Router, upstream: str, found: dict[str, Any]) -> dict[str, Any]:
    name = str(found.get("name") or found.get("repo_name") or "")
    if "/" not in name and router.upstream(upstream).is_docker_hub:
        name = f"library/{name}"
    return {
        "name": familiar_name(router, upstream, name) if name else name,
        "description": str(found.get("description") or found.get("short_description") or ""),
        "star_count": int(found.get("star_count") or 0),
        "is_official": bool(found.get("is_official")),
        "is_automated": bool(found.get("is_automated")),
        "cached": False,
        "upstream": upstream,
    }


async def search(request: web.Request) -> web.Response:
    term = request.query.get("term", "").strip()
    if not term:
        raise AdminInvalid("a search term is needed")
    raw_limit = request.query.get("limit", str(DEFAULT_LIMIT))
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise AdminInvalid(f"limit {raw_limit[:10]!r} is outside the range [1, {MAX_LIMIT}]")
    limit = int(raw_limit)
    stars, official, automated = _filters(request.query.getall("filter", []))
    router = request.config_dict[ROUTER]
    results: dict[str, dict[str, Any]] = {}
    lowered = term.lower()
    for upstream, repository in await request.config_dict[METADATA].catalog():
        name = familiar_name(router, upstream, repository)
        if lowered in name.lower():
            results[name] = {
                "name": name,
                "description": "",
                "star_count": 0,
                "is_official": False,
                "is_automated": False,
                "cached": True,
                "upstream": upstream,
            }
    warnings: list[str] = []
    upstreams = request.config_dict[UPSTREAMS]
    answers = await asyncio.gather(
        *(client.search(term, limit) for client in upstreams.values()), return_exceptions=True
    )
    for upstream, answer in zip(upstreams, answers, strict=True):
        if isinstance(answer, UpstreamError | TimeoutError):
            warnings.append(f"{upstream}: search failed ({getattr(answer, 'kind', 'timeout')})")
            continue
        if isinstance(answer, BaseException):
            raise answer
        for found in answer:
            item = _upstream_result(router, upstream, found)
            known = results.get(item["name"])
            if known is not None:  # cached: the upstream tells its stars and description
                known.update({k: item[k] for k in ("description", "star_count", "is_official", "is_automated")})
            elif item["name"]:
                results[item["name"]] = item
    chosen = [
        r
        for r in results.values()
        if r["star_count"] >= stars
        and (official is None or r["is_official"] == official)
        and (automated is None or r["is_automated"] == automated)
    ]
    request[LOG]["result"] = f"{len(chosen[:limit])} results"
    return web.json_response({"results": chosen[:limit], "warnings": warnings})


def add_routes(admin: web.Application) -> None:
    admin.router.add_get("/search", search, name="admin_search")
