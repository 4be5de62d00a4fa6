"""What a finished request tells the ``Events`` seam about content a client pulled.

A pull is reported when the response is done, not when the cache decided where
to answer from: only a manifest or blob that reached the client (no error, no
aborted body) counts, as in the distribution registry. Everything comes from
what the handler put in ``request[LOG]`` and from the response's own headers.
"""

from __future__ import annotations

from aiohttp import web

from proxy.metrics.events import Content, Events

KINDS = {"manifest": "manifests", "blob": "blobs"}  # route name -> path segment


def report_pull(events: Events, request: web.BaseRequest, response: web.StreamResponse, route: str,
                fields: dict[str, object]) -> None:
    if not events.listens("pulled"):
        return
    segment = KINDS.get(route)
    result, upstream, repository, digest = (fields.get(k) for k in ("result", "upstream", "repository", "digest"))
    if segment is None or response.status >= 400 or result in (None, "aborted"):
        return
    if not isinstance(request, web.Request):  # a request that never reached routing
        return
    if not (isinstance(upstream, str) and isinstance(repository, str) and isinstance(digest, str)):
        return
    reference = fields.get("reference")
    tag = reference if isinstance(reference, str) and ":" not in reference else None
    url = f"{request.scheme}://{request.host}/v2/{request.match_info['name']}/{segment}/{digest}"
    if "ns" in request.query:
        url += f"?ns={request.query['ns']}"
    content = Content(upstream, repository, digest, response.headers.get("Content-Type"),
                      _size(response), tag, url)
    events.pulled(route, content, str(result))


def _size(response: web.StreamResponse) -> int | None:
    """The whole content's size: a range answer (206) gives it after the slash of Content-Range."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return response.content_length
