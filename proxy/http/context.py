"""What each request carries through the middlewares and handlers (``web.RequestKey``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.access.policy import Identity
    from proxy.pull.routing import Route
    from storage.lifecycle.gc import Lease

# The access log's fields, filled in by whoever learns them (route, result, identity).
LOG: web.RequestKey[dict[str, object]] = web.RequestKey("log")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
# The error answered, for the access log and the metrics.
ERROR: web.RequestKey[BaseException] = web.RequestKey("error")
# The response whose headers went out, and whether the request's access-log line is written:
# a request cancelled by its client's disconnect is logged from these (proxy.http.accesslog).
RESPONSE: web.RequestKey[web.StreamResponse] = web.RequestKey("response")
LOGGED: web.RequestKey[bool] = web.RequestKey("logged")
# The GC lease a blob hit holds until its file is open.
BLOB_LEASE: web.RequestKey[Lease | None] = web.RequestKey("blob_lease")
# Who the request comes from, and for repository routes where it goes: set by proxy.access
# before any handler runs, so every handler serves exactly the route that was judged.
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
ROUTE: web.RequestKey[Route] = web.RequestKey("route")
