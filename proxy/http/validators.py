"""The headers every blob response carries, and the conditional requests they answer.

A blob is named by its digest and never changes, so its entity tag is the digest
(the same on every replica, for HEAD and GET, cold or cached, whatever backend
holds it) and it may be cached for a year, as the distribution registry says too.
There is no ``Last-Modified``: a blob's file time is when this cache fetched it,
which differs between replicas and after a refetch; like the distribution
registry, date conditions (``If-Modified-Since``, ``If-Unmodified-Since``, an
``If-Range`` date) therefore never match anything.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from proxy.http import ranges

IMMUTABLE = "max-age=31536000"


def blob_headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        hdrs.CONTENT_TYPE: ranges.OCTET_STREAM,
        hdrs.ETAG: f'"{digest}"',
        hdrs.CACHE_CONTROL: IMMUTABLE,
        hdrs.ACCEPT_RANGES: "bytes",
    }


def precondition_status(request: web.BaseRequest, digest: str) -> int | None:
    """412 or 304 when a condition of the request says so (RFC 9110 13.2.2), else None."""
    if_match = request.if_match
    if if_match is not None and not any(
        tag.value == "*" or (tag.value == digest and not tag.is_weak) for tag in if_match
    ):
        return 412
    if_none_match = request.if_none_match
    if if_none_match is not None and any(tag.value in ("*", digest) for tag in if_none_match):
        return 304  # weak comparison, GET and HEAD alike
    return None


def wanted_ranges(request: web.BaseRequest, digest: str) -> tuple[ranges.RangeSpec, ...] | None:
    """The ranges of a GET to honour; None: send the whole blob.

    ``If-Range`` (RFC 9110 13.1.5) lets ``Range`` apply only when it names this blob
    with a strong entity tag; anything else (another tag, a weak one, a date) sends
    the whole blob. Range handling is defined for GET only (14.2)."""
    if request.method != hdrs.METH_GET:
        return None
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is not None and if_range.strip() != f'"{digest}"':
        return None
    return ranges.parse(request.headers.get(hdrs.RANGE))
