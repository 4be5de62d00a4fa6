"""The Registry HTTP API v2, pull side.

Each handler parses and validates its input, asks ``PullThrough``, and turns
the answer into a response. Errors are raised as types; ``proxy.errors``
renders them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator
from typing import NoReturn
from urllib.parse import urlencode

from aiohttp import hdrs, web

from proxy.access.gate import ACCESS
from proxy.errors import PaginationInvalid, Unsupported
from proxy.http import filesend, partial, ranges, slowclient, validators
from proxy.http.blobfile import BlobFileResponse
from proxy.http.context import BLOB_LEASE, ERROR, IDENTITY, LOG, ROUTE
from proxy.http.errors import API_HEADERS as API_VERSION
from proxy.http.partial import PartReader
from proxy.http.ranges import ByteRange
from proxy.pull.answers import FillingBlob, LocalBlob, StoredBlob, page
from proxy.resources import METADATA, PULLTHROUGH, REFERRERS, ROUTER, SETTINGS
from storage.backends.base import BlockingBody
from storage.errors import SpoolAborted, StoreUnavailable
from storage.oci.digest import Digest
from storage.oci.manifests import OCI_INDEX, merge_accept
from storage.oci.reference import ManifestReference
from storage.oci.referrers import FILTERS_HEADER, referrers_index
from storage.progress import SpoolFollower

log = logging.getLogger("regcache.registry")

# Spool bytes up to this size go to a client from the loop (a page-cache read of
# microseconds); larger ranges go to a pool thread (proxy.filesend).
INLINE_RANGE = 64 * 1024
# Entries per page of a referrers answer.
REFERRERS_PAGE = 1000


def _pagination(request: web.Request) -> tuple[int | None, str | None]:
    raw = request.query.get("n")
    n = None
    if raw is not None:
        # isascii: str.isdigit() also says yes to '¹' and other digits int() refuses.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            raise PaginationInvalid(f"n must be a non-negative number, got {raw[:20]!r}")
        n = int(raw)
    return n, request.query.get("last")


async def base(request: web.Request) -> web.Response:
    # Answered locally: clients probe /v2/ before every pull, the upstream need not know.
    return web.json_response({}, headers=API_VERSION)


# What clients send for a manifest, parsed once: each sends the same few references and Accept
# headers over and over. Refusals raise and are not kept (a valid reference is short); the
# bounds are for what clients make up.
_reference = functools.lru_cache(maxsize=1024)(ManifestReference.parse)
MAX_KEPT_ACCEPT = 1024


def _accepted(request: web.Request) -> tuple[str, ...]:
    # Several Accept lines say what one comma list of them says.
    accept = ",".join(request.headers.getall(hdrs.ACCEPT, ()))
    return _merged_accept(accept) if len(accept) <= MAX_KEPT_ACCEPT else tuple(merge_accept([accept]))


@functools.lru_cache(maxsize=64)
def _merged_accept(accept: str) -> tuple[str, ...]:
    return tuple(merge_accept([accept]))


async def manifest(request: web.Request) -> web.Response:
    route = request[ROUTE]
    text = request.match_info["reference"]
    reference = _reference(text)
    request[LOG]["reference"] = text
    accept = _accepted(request)
    get = request.method == "GET"
    found = await request.app[PULLTHROUGH].manifest(route, reference, accept, count=get, prefetch=get,
                                                    puller=str(request[IDENTITY]))
    request[LOG]["result"] = found.result
    request[LOG]["digest"] = found.digest
    return web.Response(
        body=found.data,
        headers={
            "Content-Type": found.media_type,
            "Docker-Content-Digest": found.digest,
            "ETag": f'"{found.digest}"',
        },
    )


async def blob(request: web.Request) -> web.StreamResponse:
    route = request[ROUTE]
    digest = Digest.parse(request.match_info["digest"])
    key = str(digest)
    request[LOG]["digest"] = key
    pullthrough = request.app[PULLTHROUGH]
    headers = validators.blob_headers(key)
    status = validators.precondition_status(request, key)
    if request.method == "HEAD" or status is not None:
        # A 304 or 412 says the blob exists: only once this repository may see it.
        info = await pullthrough.blob_info(route, digest)
        return _bodiless(headers, status, info.size)
    wanted = validators.wanted_ranges(request, key)
    answer = await pullthrough.blob(route, digest)
    stall = request.app[SETTINGS].limits.client_timeout
    if isinstance(answer, LocalBlob):
        request[LOG]["result"] = "hit"
        request[BLOB_LEASE] = answer.lease  # released when any response, a 416 too, is prepared
        selected = None if wanted is None else ranges.resolve(wanted, answer.size)
        if selected is not None:
            request[LOG]["ranges"] = len(selected)
        return BlobFileResponse(answer.path, ranges=selected, headers=headers, stall_timeout=stall)
    if isinstance(answer, StoredBlob):
        request[LOG]["result"] = "hit"
        if answer.redirect is not None:
            raise web.HTTPTemporaryRedirect(answer.redirect, headers=headers)
        if wanted is not None:
            return await _send_ranges(request, headers, answer.size, ranges.resolve(wanted, answer.size), answer.read)
        if filesend.possible(request.transport):
            # Opened before the headers go out: a store that fails now is an error answer, not a cut.
            body = await answer.open_body()
            if body is not None:
                return await _send_body(request, headers, answer.size, body)
        return await _stream(request, headers, answer.size, answer.chunks())
    assert isinstance(answer, FillingBlob)
    request[LOG]["result"] = answer.result
    if wanted is not None:
        # The upstream may be asked for the first range before the fill hears from it.
        size = await answer.sized(wanted[0])
        try:
            # Without a size (the upstream did not say) ranges cannot be resolved: the whole blob goes.
            if size is not None:
                return await _send_ranges(request, headers, size, ranges.resolve(wanted, size), answer.read)
        finally:
            await answer.release()
    size = await answer.opened()
    # A follower's bytes go to the socket past aiohttp, so past its chunked framing: only a
    # body whose length is in the headers may take them (an upstream may send none).
    # A small one (its first batch and one more) costs less to send from the loop than to
    # hand to a thread and back.
    if size is not None and size > 2 * INLINE_RANGE and filesend.possible(request.transport):
        spool = answer.follower()
        if spool is not None:
            return await _send_following(request, headers, size, spool, answer)
    return await _stream(request, headers, size, answer.chunks())


def _bodiless(headers: dict[str, str], status: int | None, size: int | None) -> web.StreamResponse:
    """A HEAD's answer, or a 304 or 412 to a GET."""
    response = web.StreamResponse(status=status or 200, headers=headers)
    if status is None:
        if size is not None:
            response.content_length = size
    else:
        del response.headers[hdrs.CONTENT_TYPE]  # describes no body (RFC 9110 15.4.5)
        response.content_length = 0 if status == 412 else None
    return response


async def _send_ranges(
    request: web.Request, headers: dict[str, str], size: int, selected: list[ByteRange], read: PartReader
) -> web.StreamResponse:
    request[LOG]["ranges"] = len(selected)
    response = web.StreamResponse(headers=headers)
    multipart = partial.frame(response, selected, size)
    await response.prepare(request)
    stall = request.app[SETTINGS].limits.client_timeout
    try:
        sender = partial.streamed(request, response, read, stall)
        await partial.send_parts(request, response, selected, multipart, sender, stall)
    except Exception as exc:
        _abort(request, exc)
    await response.write_eof()
    return response


class _HeadersWithBody(web.StreamResponse):
    """Headers that leave with the first bytes of the body, in one write, as aiohttp's own
    ``Response`` sends them: one send and one wake-up of the client fewer per small blob.
    Only for a body that goes through aiohttp's writer (never raw slices on the socket)."""

    _send_headers_immediately = False


def _response(headers: dict[str, str], size: int | None) -> web.StreamResponse:
    """A blob's answer; the headers of a small one wait for its bytes (all of them soon)."""
    small = size is not None and size <= INLINE_RANGE
    response = (_HeadersWithBody if small else web.StreamResponse)(headers=headers)
    if size is not None:
        response.content_length = size
    return response


async def _stream(
    request: web.Request, headers: dict[str, str], size: int | None, chunks: AsyncGenerator[bytes, None]
) -> web.StreamResponse:
    response = _response(headers, size)
    await response.prepare(request)
    try:
        # aclosing: a client that goes away must release its reader at once.
        async with contextlib.aclosing(chunks) as stream:
            stall = request.app[SETTINGS].limits.client_timeout
            async for chunk in stream:
                await slowclient.write(request, response, chunk, stall)
    except Exception as exc:
        _abort(request, exc)
    await response.write_eof()
    return response


async def _send_following(
    request: web.Request, headers: dict[str, str], size: int, spool: SpoolFollower, answer: FillingBlob
) -> web.StreamResponse:
    """A fill's bytes from its spool file as they land, sent from a pool thread that the
    writing thread wakes (proxy.filesend). ``size`` goes out as Content-Length: raw bytes on
    the socket carry no framing of their own."""
    response = _response(headers, size)
    await response.prepare(request)
    stall = request.app[SETTINGS].limits.client_timeout
    transport = request.transport
    assert transport is not None
    sender = filesend.FileSender(transport)
    try:
        try:
            await sender.follow(spool, size, stall)
        except filesend.Stalled:
            raise slowclient.cut(request, stall) from None
        except SpoolAborted as exc:
            raise await answer.failure(exc) from None
        finally:
            sender.close()
    except Exception as exc:
        _abort(request, exc)
    await response.write_eof()
    return response


async def _send_body(
    request: web.Request, headers: dict[str, str], size: int, body: BlockingBody
) -> web.StreamResponse:
    """A stored blob read from its store and written to the client on a pool thread
    (proxy.filesend), past the event loop."""
    try:
        if body.size != size:
            raise StoreUnavailable(f"store answered {body.size} bytes for a blob of {size}")
        response = web.StreamResponse(headers=headers)
        response.content_length = size
        await response.prepare(request)
        stall = request.app[SETTINGS].limits.client_timeout
        assert request.transport is not None
        sender = filesend.FileSender(request.transport)
        try:
            try:
                await sender.send_body(body, size, stall)
            except filesend.Stalled:
                raise slowclient.cut(request, stall) from None
            finally:
                sender.close()
        except Exception as exc:
            _abort(request, exc)
    finally:
        body.close()
    await response.write_eof()
    return response


def _abort(request: web.Request, exc: Exception) -> NoReturn:
    # Headers are out: the only honest signal left is a broken connection,
    # never a clean end of a short or wrong body.
    request[LOG]["result"] = "aborted"
    request[ERROR] = exc
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionResetError("blob stream aborted") from exc


async def tags(request: web.Request) -> web.Response:
    route = request[ROUTE]
    n, last = _pagination(request)
    found, more = await request.app[PULLTHROUGH].tags(route, n, last)
    headers = dict(API_VERSION)
    if more and found:
        # No n from the client: the upstream chose the page size, and will again.
        query = {"last": found[-1]} if n is None else {"n": str(n), "last": found[-1]}
        if "ns" in request.query:
            query["ns"] = request.query["ns"]
        headers["Link"] = f'</v2/{request.match_info["name"]}/tags/list?{urlencode(query)}>; rel="next"'
    return web.json_response({"name": request.match_info["name"], "tags": found}, headers=headers)


async def referrers(request: web.Request) -> web.Response:
    """OCI 1.1 referrers: an image index of the manifests whose ``subject`` is the digest."""
    route = request[ROUTE]
    subject = Digest.parse(request.match_info["digest"])
    request[LOG]["digest"] = str(subject)
    answer = await request.app[REFERRERS].answer(route, subject)
    request[LOG]["result"] = answer.result
    found = answer.referrers
    headers = {**API_VERSION, "Content-Type": OCI_INDEX}
    artifact_type = request.query.get("artifactType")
    if artifact_type is not None:
        found = [r for r in found if r.artifact_type == artifact_type]
        headers[FILTERS_HEADER] = "artifactType"
    n, last = _pagination(request)
    # Pages of at most REFERRERS_PAGE entries, whatever n asks: the spec lets a registry page.
    digests, more = page([r.digest for r in found], min(n or REFERRERS_PAGE, REFERRERS_PAGE), last)
    by_digest = {r.digest: r for r in found}
    if more and digests:
        query = {k: v for k, v in request.query.items() if k in ("ns", "artifactType", "n")}
        query["last"] = digests[-1]
        headers["Link"] = f'</v2/{request.match_info["name"]}/referrers/{subject}?{urlencode(query)}>; rel="next"'
    return web.Response(body=referrers_index(by_digest[d] for d in digests), headers=headers)


async def catalog(request: web.Request) -> web.Response:
    n, last = _pagination(request)
    router = request.app[ROUTER]
    policy, identity = request.app[ACCESS].policy, request[IDENTITY]
    # Only what this client may pull: a repository's name can be a secret of its own.
    names = [
        router.client_name(u, name)
        for u, name in await request.app[METADATA].catalog()
        if policy.visible(identity, u, name)
    ]
    repositories, more = page(names, n, last)
    headers = dict(API_VERSION)
    if more and repositories:
        headers["Link"] = f'</v2/_catalog?{urlencode({"n": str(n), "last": repositories[-1]})}>; rel="next"'
    return web.json_response({"repositories": repositories}, headers=headers)


async def unsupported(request: web.Request) -> web.Response:
    raise Unsupported("this registry is a read-only pull-through cache")


async def _release_blob_lease(request: web.Request, response: web.StreamResponse) -> None:
    # BlobFileResponse opens the file before it prepares: from here on GC may unlink it.
    lease = request.get(BLOB_LEASE)
    if lease is not None:
        lease.release()


def add_routes(app: web.Application) -> None:
    app.on_response_prepare.append(_release_blob_lease)
    r = app.router
    r.add_get("/v2/", base, name="base")
    r.add_get("/v2/_catalog", catalog, name="catalog")
    # aiohttp tries these patterns in this order. The upload ones come first: they also match
    # paths that end like a manifest or a blob (/v2/a/blobs/uploads/b/manifests/c). Then the
    # most frequent requests: no path matches more than one of the last four, whatever their order.
    r.add_route("*", "/v2/{name:.+}/blobs/uploads/{rest:.*}", unsupported, name="upload")
    r.add_route("*", "/v2/{name:.+}/blobs/uploads", unsupported)
    r.add_get("/v2/{name:.+}/manifests/{reference}", manifest, name="manifest")
    r.add_route("*", "/v2/{name:.+}/manifests/{reference}", unsupported)
    r.add_get("/v2/{name:.+}/blobs/{digest}", blob, name="blob")
    r.add_route("*", "/v2/{name:.+}/blobs/{digest}", unsupported)
    r.add_get("/v2/{name:.+}/tags/list", tags, name="tags")
    r.add_get("/v2/{name:.+}/referrers/{digest}", referrers, name="referrers")
