"""The one table that maps every error to its OCI error body and HTTP status.

Handlers raise typed errors (``storage.errors``, ``proxy.errors``);
``error_middleware`` turns them into the OCI error body
``{"errors": [{"code", "message", "detail"}]}`` with the right status. Nothing
else in the code base chooses an error code.
"""

from __future__ import annotations

import json
import math

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.errors import (
    AdminConflict,
    AdminInvalid,
    AdminNotFound,
    Denied,
    LoginThrottled,
    ManifestTooLarge,
    PaginationInvalid,
    RangeNotSatisfiable,
    RegistryUnknown,
    RequestTooLarge,
    Unauthorized,
    Unsupported,
    UpstreamCircuitOpen,
    UpstreamDenied,
    UpstreamDigestMismatch,
    UpstreamError,
    UpstreamNotFound,
    UpstreamTooManyRequests,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from proxy.http.context import ERROR
from storage.errors import (
    ArchiveInvalid,
    BlobUnknown,
    DigestInvalid,
    DigestMismatch,
    ImagePinned,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RegcacheError,
    SizeMismatch,
    StoreFull,
    StoreUnavailable,
    TagInvalid,
)

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}


# (OCI code, HTTP status), most specific class first: lookups walk the MRO.
_OCI: dict[type[BaseException], tuple[str, int]] = {
    DigestInvalid: ("DIGEST_INVALID", 400),
    DigestMismatch: ("DIGEST_INVALID", 400),
    SizeMismatch: ("SIZE_INVALID", 400),
    NameInvalid: ("NAME_INVALID", 400),
    TagInvalid: ("MANIFEST_INVALID", 400),
    ManifestInvalid: ("MANIFEST_INVALID", 400),
    BlobUnknown: ("BLOB_UNKNOWN", 404),
    ManifestUnknown: ("MANIFEST_UNKNOWN", 404),
    NameUnknown: ("NAME_UNKNOWN", 404),
    RegistryUnknown: ("NAME_UNKNOWN", 404),
    UpstreamNotFound: ("MANIFEST_UNKNOWN", 404),
    Unsupported: ("UNSUPPORTED", 405),
    Unauthorized: ("UNAUTHORIZED", 401),
    LoginThrottled: ("TOOMANYREQUESTS", 429),
    Denied: ("DENIED", 403),
    UpstreamUnauthorized: ("UNAUTHORIZED", 502),
    UpstreamDenied: ("DENIED", 403),
    RangeNotSatisfiable: ("RANGE_INVALID", 416),
    PaginationInvalid: ("PAGINATION_NUMBER_INVALID", 400),
    ManifestTooLarge: ("SIZE_INVALID", 413),
    RequestTooLarge: ("SIZE_INVALID", 413),
    UpstreamTooManyRequests: ("TOOMANYREQUESTS", 429),
    UpstreamUnavailable: ("UNAVAILABLE", 503),
    UpstreamDigestMismatch: ("UNAVAILABLE", 502),
    UpstreamError: ("UNAVAILABLE", 502),
    StoreFull: ("UNAVAILABLE", 507),
    StoreUnavailable: ("UNAVAILABLE", 503),
    ArchiveInvalid: ("ARCHIVE_INVALID", 400),
    AdminInvalid: ("INVALID", 400),
    AdminNotFound: ("NOT_FOUND", 404),
    AdminConflict: ("CONFLICT", 409),
    ImagePinned: ("CONFLICT", 409),
}


def oci_code(error: BaseException) -> tuple[str, int]:
    for cls in type(error).__mro__:
        if cls in _OCI:
            return _OCI[cls]
    return ("UNKNOWN", 500)


def error_body(code: str, message: str, detail: object | None = None) -> bytes:
    entry: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode()


def error_response(error: RegcacheError) -> web.Response:
    code, status = oci_code(error)
    headers = {"Content-Type": "application/json", **API_HEADERS}
    if isinstance(error, Unauthorized) and error.challenge:
        headers["WWW-Authenticate"] = error.challenge
    waits = UpstreamTooManyRequests | UpstreamCircuitOpen | LoginThrottled
    if isinstance(error, waits) and error.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(error.retry_after))
    if isinstance(error, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{error.size}"
    return web.Response(status=status, body=error_body(code, error.message, error.detail), headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegcacheError as error:
        request[ERROR] = error
        return error_response(error)
    except web.HTTPException as exc:
        # aiohttp's own 404/405 for unmatched routes: give them OCI bodies too.
        if exc.status >= 400 and exc.status != 401:
            code = {404: "NOT_FOUND", 405: "UNSUPPORTED", 413: "SIZE_INVALID"}.get(exc.status, "UNKNOWN")
            if request.path.startswith("/v2/") and exc.status == 404:
                code = "NAME_UNKNOWN"
            return web.Response(
                status=exc.status,
                body=error_body(code, exc.reason or "error"),
                headers={"Content-Type": "application/json"},
            )
        raise
