"""What upstream registries send back: the answers' shapes and how headers and bodies are read.

Kept apart from ``proxy.upstream`` so the client reads as request logic.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import UpstreamError
from storage.oci.digest import is_digest
from storage.oci.jsonlimits import JSONTooDeep, loads
from storage.pump import BodySource

READ_CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)", re.ASCII)
_UNSATISFIED = re.compile(r"bytes \*/([0-9]{1,19})", re.ASCII)
_LINK_NEXT = re.compile(r'<([^>]*)>[^,]*;\s*rel="?next"?', re.IGNORECASE)


@dataclass(frozen=True)
class ManifestHead:
    digest: str | None
    media_type: str  # "" when the upstream did not say
    size: int | None


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str | None  # the upstream's Docker-Content-Digest, if well formed


@dataclass(frozen=True)
class RateLimit:
    """What the upstream last said in ``RateLimit-*`` headers (Docker Hub: pulls per window)."""

    limit: int | None
    remaining: int | None
    window: int | None  # seconds, from ``;w=`` when given
    seen_at: float  # wall clock


class Reply(Protocol):
    """What the request machinery reads of an answer, whichever transport brought it."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def url(self) -> URL: ...
    def release(self) -> Any: ...


@dataclass
class BlobStream:
    size: int | None
    chunks: AsyncIterator[bytes]  # the body, in pieces as they come
    body: BodySource | None = None  # the same body for a reader on a thread (storage.pump), when the transport has one


@dataclass
class BlobPart:
    """The upstream's own answer to one range of a blob: ``length`` bytes from ``start`` of a
    blob of ``size`` bytes. ``length`` is 0 (and ``chunks`` yields nothing) when the upstream
    said that no byte of the range exists (a 416 naming the size)."""

    start: int
    length: int
    size: int
    chunks: AsyncIterator[bytes]


class UpstreamObserver(Protocol):
    def request_done(self, upstream: str, operation: str, status: str, seconds: float) -> None: ...
    def error(self, upstream: str, kind: str) -> None: ...
    def rate_limit(self, upstream: str, limit: int | None, remaining: int | None) -> None: ...
    def breaker(self, upstream: str, state: str) -> None: ...


class NullObserver:
    def request_done(self, upstream: str, operation: str, status: str, seconds: float) -> None:
        pass

    def error(self, upstream: str, kind: str) -> None:
        pass

    def rate_limit(self, upstream: str, limit: int | None, remaining: int | None) -> None:
        pass

    def breaker(self, upstream: str, state: str) -> None:
        pass


def digest_header(resp: aiohttp.ClientResponse) -> str | None:
    value = resp.headers.get("Docker-Content-Digest", "").strip()
    return value if is_digest(value) else None


def media_type(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Content-Type", "").split(";", 1)[0].strip()


def embedded_media_type(data: bytes) -> str:
    try:
        value = loads(data).get("mediaType")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def json_body(body: bytes, upstream: str) -> Any:
    try:
        return loads(body)
    except JSONTooDeep as exc:
        raise UpstreamError(f"upstream {upstream}: answered with {exc}", upstream=upstream) from None
    except ValueError:
        raise UpstreamError(f"upstream {upstream}: answered with invalid JSON", upstream=upstream) from None


async def read_limited(resp: aiohttp.ClientResponse, limit: int, too_large: Callable[[], Exception]) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large()
    body = bytearray()
    async for chunk in resp.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise too_large()
    return bytes(body)


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes <first>-<last>/<size>`` as (start, stop, size); size None for ``*``."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None
    first, last, size = match.groups()
    return int(first), int(last) + 1, None if size == "*" else int(size)


def unsatisfied_size(value: str | None) -> int | None:
    """The size in a 416's ``bytes */<size>``."""
    match = _UNSATISFIED.fullmatch((value or "").strip())
    return None if match is None else int(match.group(1))


async def nothing() -> AsyncIterator[bytes]:
    """No bytes: the body of a range that has none."""
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk


def link_next(header: str) -> str | None:
    match = _LINK_NEXT.search(header)
    return match.group(1) if match else None


def leading_int(value: str | None) -> int | None:
    """Docker Hub sends ``100;w=21600``: the count, then the window."""
    try:
        return int(value.split(";", 1)[0].strip()) if value else None
    except ValueError:
        return None


def window(value: str | None) -> int | None:
    """The ``w=`` parameter of a RateLimit header (``100;w=21600``), in seconds."""
    for part in (value or "").split(";")[1:]:
        key, _, number = part.partition("=")
        if key.strip() == "w" and number.strip().isascii() and number.strip().isdigit():
            return int(number.strip())
    return None


def retry_after(value: str | None) -> float | None:
    """Retry-After is seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "inf" or "nan" would later break the Retry-After we send to clients
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
