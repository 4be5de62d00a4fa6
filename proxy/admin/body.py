"""Reading the JSON bodies of admin requests; bad ones (deep nesting too) are AdminInvalid, never a 500."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.errors import AdminInvalid
from storage.oci.jsonlimits import JSONTooDeep, loads


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=loads)
    except JSONTooDeep as exc:
        raise AdminInvalid(f"request body: {exc}") from None
    except ValueError:
        raise AdminInvalid("request body is not JSON") from None
    if not isinstance(body, dict):
        raise AdminInvalid("request body must be a JSON object")
    return body


async def image_names(
    request: web.Request, shape: str = '{"images": ["IMAGE", ...]}'
) -> tuple[list[str], dict[str, Any]]:
    """``{"images": [...], ...}``: the names, and the whole body for the other fields."""
    try:
        body = await json_object(request)
    except AdminInvalid:
        raise AdminInvalid(f"expected {shape}") from None
    names = body.get("images")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise AdminInvalid(f"expected {shape}")
    return names, body
