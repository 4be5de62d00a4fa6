"""Client for one upstream registry (Registry HTTP API v2), used by pullthrough.

Auth is lazy: a request goes out anonymously (or with what the upstream asked
for last time), a 401 is answered once from its ``WWW-Authenticate`` challenge,
and tokens are cached per scope. Redirects are followed here, not by aiohttp, so
``Authorization`` is only ever attached to the upstream's own origin. Failures
become the ``Upstream*`` errors of ``proxy.errors``; their messages name the
upstream and the operation, never a credential, token or signed URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import aiohttp
from yarl import URL

from config.settings import UpstreamSettings
from proxy.errors import (
    ManifestTooLarge,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamTooManyRequests,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from proxy.tracing import client_span, client_trace_configs
from proxy.upstream.auth import Credentials, UpstreamAuth
from proxy.upstream.breaker import Breaker
from proxy.upstream.inline import LoopAnswer, LoopConnections
from proxy.upstream.responses import (
    BlobPart,
    BlobStream,
    FetchedManifest,
    ManifestHead,
    NullObserver,
    RateLimit,
    Reply,
    UpstreamObserver,
    content_range,
    digest_header,
    embedded_media_type,
    json_body,
    leading_int,
    link_next,
    media_type,
    nothing,
    read_limited,
    retry_after,
    unsatisfied_size,
    window,
)
from proxy.upstream.transport import Answer, Connections
from storage.errors import ManifestInvalid
from storage.oci.digest import Digest, is_digest
from storage.oci.manifests import OCI_INDEX
from storage.oci.reference import validate_name, validate_tag
from storage.oci.referrers import Referrer, referrers_in_index

log = logging.getLogger("regcache.upstream")

T = TypeVar("T")
R = TypeVar("R", bound=Reply)
# One HTTP request, whichever transport: (method, url, headers) -> its answer, body unread.
Fetch = Callable[[str, URL, dict[str, str]], Awaitable[R]]

CHUNK_SIZE = 256 * 1024
# Blobs up to this size are read on the loop (``open_blob``): a config or a small layer
# arrives in a few reads, and the threads' hand-offs would cost more than the reads.
SMALL_BLOB = 256 * 1024
READ_BUFSIZE = 1024 * 1024
MAX_REDIRECTS = 5
BACKOFF_BASE = 0.2
BACKOFF_CAP = 1.0
# Total backoff per operation: a dead upstream must fail fast so pullthrough can
# serve a stale copy, not keep the client waiting through a retry storm.
RETRY_BUDGET = 3.0
# A 429 is only waited out when the upstream asks for a short pause.
SHORT_RETRY_AFTER = 2.0
# A probe of an unreachable upstream gives up after this (or connect + read timeout, if shorter),
# so a recovery is noticed soon even when the probe met a silent connection.
PROBE_TIMEOUT = 5.0
MAX_TOKEN_BODY = 64 * 1024
MAX_JSON_BODY = 8 * 1024 * 1024
# Pages of a referrers answer followed; an image with more signatures than this is an attack.
MAX_REFERRER_PAGES = 20
DOCKER_HUB_INDEX = "https://index.docker.io"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# A range no byte of the blob falls in: an answer (the blob's size), not an error.
RANGE_NOT_SATISFIABLE = frozenset({416})


class UpstreamClient:
    """One upstream registry. ``start()`` before use, ``close()`` after."""

    def __init__(
        self,
        settings: UpstreamSettings,
        observer: UpstreamObserver | None = None,
        user_agent: str = "regcache/0.1",
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        small_blob: int = SMALL_BLOB,
    ) -> None:
        self.name = settings.name
        self._small_blob = small_blob
        self._settings = settings
        self._base = URL(settings.base_url)
        self._observer: UpstreamObserver = observer or NullObserver()
        self._user_agent = user_agent
        self._sleep = sleep
        self._auth = UpstreamAuth(settings, self._get_token_body, clock)
        self._slots = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
        self.breaker = Breaker(settings.name, settings.breaker_failures, self._probe, self._observer, clock=clock)
        self.rate_limit: RateLimit | None = None  # for admin stats; metrics get it through the observer
        self._session: aiohttp.ClientSession | None = None
        # Blob bodies: read on the fill's thread, not through the loop (``proxy.upstream.transport``).
        self._connections: Connections | None = None
        # Small blob bodies: on the loop, without aiohttp's per-request machinery (``proxy.upstream.inline``).
        self._inline: LoopConnections | None = None
        self._ssl_own: ssl.SSLContext | None = None
        self._ssl_other: ssl.SSLContext | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        s = self._settings
        self._ssl_own, self._ssl_other = _ssl_contexts(s)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=s.connect_timeout, sock_connect=s.connect_timeout, sock_read=s.read_timeout
        )
        self._session = aiohttp.ClientSession(
            # max_concurrency (the semaphore) is the only limit: a pool limit would
            # add a hidden queue whose wait counts against the connect timeout.
            connector=aiohttp.TCPConnector(limit=0),
            timeout=timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            # Blobs and manifests must reach the digest check byte for byte.
            auto_decompress=False,
            # A deep receive buffer: with aiohttp's 64 KiB default a fast upstream
            # pauses and resumes the socket every few hundred KiB of a blob.
            read_bufsize=READ_BUFSIZE,
            # With tracing on: a client span per request, and the W3C traceparent sent upstream.
            trace_configs=client_trace_configs(),
        )
        self._connections = Connections(s.connect_timeout, s.read_timeout)
        self._inline = LoopConnections(s.connect_timeout, s.read_timeout)

    async def close(self) -> None:
        await self.breaker.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._connections is not None:
            self._connections.close()
            self._connections = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- registry operations ------------------------------------------------

    async def head_manifest(self, repository: str, reference: str, accept: Sequence[str]) -> ManifestHead:
        url = self._v2(repository, "manifests", _checked_reference(reference))

        async def read(resp: aiohttp.ClientResponse) -> ManifestHead:
            return ManifestHead(digest_header(resp), media_type(resp), resp.content_length)

        async with self._slot():
            return await self._call("HEAD", url, "manifest_head", _pull_scope(repository), read, accept)

    async def get_manifest(
        self, repository: str, reference: str, accept: Sequence[str], max_size: int
    ) -> FetchedManifest:
        url = self._v2(repository, "manifests", _checked_reference(reference))

        def too_large() -> ManifestTooLarge:
            return ManifestTooLarge(f"manifest {repository}:{reference} on {self.name} exceeds {max_size} bytes")

        async def read(resp: aiohttp.ClientResponse) -> FetchedManifest:
            data = await read_limited(resp, max_size, too_large)
            return FetchedManifest(data, media_type(resp) or embedded_media_type(data), digest_header(resp))

        async with self._slot():
            return await self._call("GET", url, "manifest", _pull_scope(repository), read, accept)

    async def head_blob(self, repository: str, digest: str) -> int | None:
        url = self._v2(repository, "blobs", str(Digest.parse(digest)))

        async def read(resp: aiohttp.ClientResponse) -> int | None:
            return resp.content_length

        async with self._slot():
            return await self._call("HEAD", url, "blob_head", _pull_scope(repository), read)

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: str, digest: str, size: int | None = None) -> AsyncIterator[BlobStream]:
        """Stream a blob; retries happen only before the first byte is handed out.

        The body is meant for a reader on a thread (``BlobStream.body``); ``chunks``
        reads the same body from the loop, for consumers that want pieces. A blob whose
        ``size`` (from its descriptor) is at most ``small_blob`` comes through the loop
        only (``body`` None), by ``proxy.upstream.inline``: its few reads cost less there
        than two hand-offs to threads, and that request less than one through aiohttp.
        """
        url = self._v2(repository, "blobs", str(Digest.parse(digest)))
        # The slot is held until the stream is closed: an open body is an
        # upstream connection in use.
        async with self._slot():
            if size is not None and size <= self._small_blob:
                small = await self._open(url, "blob", _pull_scope(repository), fetch=self._fetch_inline)
                chunks = self._chunks(small.chunks())
                try:
                    yield BlobStream(small.content_length, chunks)
                finally:
                    await chunks.aclose()
                    small.release()
                return
            answer = await self._open(url, "blob", _pull_scope(repository), fetch=self._fetch_blocking)
            try:
                yield BlobStream(answer.content_length, _answer_chunks(answer), answer)
            except (ConnectionError, TimeoutError) as exc:  # the body, read on a thread, failed
                error = self._translate(exc, "blob body")
                self.breaker.failed(error)
                self._observer.error(self.name, error.kind)
                raise error from exc
            finally:
                # Draining a short rest or closing: no network wait worth a thread.
                answer.release()

    @contextlib.asynccontextmanager
    async def open_blob_range(self, repository: str, digest: str, spec: str) -> AsyncIterator[BlobPart | None]:
        """The upstream's own answer to ``Range: bytes=<spec>`` (one range: ``a-b``, ``a-`` or
        ``-n``, so a suffix needs no size); None when it ignores ``Range`` (a 200 with the whole
        blob, left unread) or does not say which bytes it sent. The bytes cannot be checked
        against the digest: only the whole blob can."""
        url = self._v2(repository, "blobs", str(Digest.parse(digest)))
        async with self._slot():
            resp = await self._open(url, "blob_range", _pull_scope(repository), {"Range": f"bytes={spec}"},
                                    also_ok=RANGE_NOT_SATISFIABLE, fetch=self._fetch_aiohttp)
            try:
                answered = content_range(resp.headers.get("Content-Range"))
                if resp.status == 416:
                    # ``bytes */<size>`` (RFC 9110 14.4): the size, and no byte of the range.
                    size = unsatisfied_size(resp.headers.get("Content-Range"))
                    yield None if size is None else BlobPart(size, 0, size, nothing())
                    return
                start, stop, size = answered or (0, 0, None)
                if resp.status != 206 or size is None:
                    yield None
                    return
                if stop > size or resp.content_length not in (None, stop - start):
                    raise UpstreamError(f"upstream {self.name}: blob_range answered {start}-{stop - 1}/{size} "
                                        f"with {resp.content_length} bytes", upstream=self.name)
                chunks = self._chunks(_pieces(resp))
                try:
                    yield BlobPart(start, stop - start, size, chunks)
                finally:
                    await chunks.aclose()
            finally:
                _done_with(resp)

    async def list_tags(self, repository: str, n: int | None, last: str | None) -> tuple[list[str], str | None]:
        query = {k: v for k, v in (("n", None if n is None else str(n)), ("last", last)) if v is not None}
        url = self._v2(repository, "tags", "list").with_query(query)

        async def read(resp: aiohttp.ClientResponse) -> tuple[list[str], str | None]:
            data = json_body(await read_limited(resp, MAX_JSON_BODY, self._too_big("tags list")), self.name)
            tags = data.get("tags") if isinstance(data, dict) else None
            return [t for t in tags or [] if isinstance(t, str)], link_next(resp.headers.get("Link", ""))

        async with self._slot():
            return await self._call("GET", url, "tags", _pull_scope(repository), read, ("application/json",))

    async def referrers(self, repository: str, subject: str) -> list[Referrer]:
        """The upstream's referrers of ``subject`` (OCI 1.1 API), every page up to a bound.

        ``UpstreamNotFound`` means the upstream lacks the API (one that has it answers an
        unknown subject with an empty index); the caller falls back to the tag schema.
        """
        url: URL | None = self._v2(repository, "referrers", str(Digest.parse(subject)))
        found: list[Referrer] = []
        for _ in range(MAX_REFERRER_PAGES):
            if url is None:
                break
            page_url = url

            async def read(resp: aiohttp.ClientResponse) -> tuple[list[Referrer], str | None]:
                data = await read_limited(resp, MAX_JSON_BODY, self._too_big("referrers index"))
                try:
                    return referrers_in_index(data), link_next(resp.headers.get("Link", ""))
                except ManifestInvalid as exc:
                    raise UpstreamError(f"upstream {self.name}: {exc.message}", upstream=self.name) from None

            async with self._slot():
                listed, next_link = await self._call(
                    "GET", page_url, "referrers", _pull_scope(repository), read, (OCI_INDEX,)
                )
            found += listed
            # A next page elsewhere would get this upstream's credentials: only the same origin.
            url = page_url.join(URL(next_link)) if next_link else None
            if url is not None and not self._is_upstream(url):
                break
        return found

    async def may_read(self, repository: str, credentials: Credentials) -> bool:
        """Whether ``credentials`` (a client's, not the cache's) may pull ``repository`` here.

        Asked with a one-entry tags list: it needs the same pull right as a manifest and,
        unlike a manifest, names no tag the client may not have asked for. Token realm and
        registry are asked with those credentials alone, through an auth of their own, so
        no token of another client (or of the cache) answers for them. True also for a
        404: the credentials passed, the repository is just not there. A refusal is
        False; any other failure raises, and is not an answer to remember.
        """
        url = self._v2(repository, "tags", "list").with_query(n="1")

        async def own() -> Credentials:
            return credentials

        auth = UpstreamAuth(self._settings, self._get_token_body, credentials=own)

        async def read(resp: aiohttp.ClientResponse) -> None:
            return None

        try:
            async with self._slot():
                await self._call("GET", url, "access_check", _pull_scope(repository), read, auth=auth)
        except UpstreamNotFound:
            return True
        except (UpstreamUnauthorized, UpstreamDenied):
            return False
        return True

    async def search(self, term: str, limit: int) -> list[dict[str, Any]]:
        base = self._settings.search_url or (DOCKER_HUB_INDEX if self._settings.is_docker_hub else None)
        if base is None:
            return []
        limit = max(1, min(limit, 100))
        url = URL(base.rstrip("/") + "/v1/search").with_query(q=term, n=str(limit))

        async def read(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
            data = json_body(await read_limited(resp, MAX_JSON_BODY, self._too_big("search result")), self.name)
            results = data.get("results") if isinstance(data, dict) else None
            return [r for r in results or [] if isinstance(r, dict)][:limit]

        # Search is public on Docker Hub and may live on another host: no credentials.
        async with self._slot():
            return await self._call("GET", url, "search", None, read, ("application/json",), auth=None)

    async def ping(self) -> None:
        async def read(resp: aiohttp.ClientResponse) -> None:
            return None

        async with self._slot():
            await self._call("GET", URL(f"{self._settings.base_url}/v2/"), "ping", None, read)

    async def _probe(self) -> None:
        """For the breaker: returns if the upstream answers ``/v2/`` at all (any status).

        No retries, no credentials, no concurrency slot: open requests may hold them all.
        """
        s = self._settings
        started = time.monotonic()
        headers = {"User-Agent": self._user_agent, "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(min(PROBE_TIMEOUT, s.connect_timeout + s.read_timeout)):
                resp = await self._send("GET", URL(f"{s.base_url}/v2/"), headers, None, self._fetch_aiohttp)
                resp.release()
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            error = self._translate(exc, "probe")
            self._observer.request_done(self.name, "probe", error.kind, time.monotonic() - started)
            raise error from exc
        except UpstreamError:
            pass  # a redirect it would not follow: an answer all the same
        self._observer.request_done(self.name, "probe", "answered", time.monotonic() - started)

    # -- request machinery --------------------------------------------------

    async def _call(
        self,
        method: str,
        url: URL,
        operation: str,
        scope: str | None,
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        accept: Sequence[str] = (),
        *,
        auth: UpstreamAuth | Literal["own"] | None = "own",
    ) -> T:
        """A request whose body (if any) is read inside the retry loop; ``auth`` None: anonymous."""
        chosen = self._auth if auth == "own" else auth

        async def once() -> tuple[int, T]:
            resp = await self._attempt(method, url, accept, scope, chosen, self._fetch_aiohttp)
            try:
                self._check(resp, operation)
                return resp.status, await read(resp)
            finally:
                resp.release()

        return await self._retrying(operation, once)

    async def _open(
        self, url: URL, operation: str, scope: str | None, extra: Mapping[str, str] | None = None,
        also_ok: frozenset[int] = frozenset(), *, fetch: Fetch[R],
    ) -> R:
        """A GET whose successful response (or one with a status in ``also_ok``) is handed over unread."""

        async def once() -> tuple[int, R]:
            resp = await self._attempt("GET", url, (), scope, self._auth, fetch, extra)
            try:
                if resp.status not in also_ok:
                    self._check(resp, operation)
            except BaseException:
                resp.release()
                raise
            return resp.status, resp

        return await self._retrying(operation, once)

    async def _retrying(self, operation: str, once: Callable[[], Awaitable[tuple[int, T]]]) -> T:
        started = time.monotonic()
        attempt = timeouts = 0
        slept = 0.0
        self.breaker.check()
        while True:
            try:
                try:
                    status, value = await once()
                except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
                    raise self._translate(exc, operation) from exc
            except UpstreamError as exc:
                self.breaker.failed(exc)
                timeouts += isinstance(exc, UpstreamTimeout)
                # Once the breaker is open, retrying only waits longer for the same silence.
                delay = None if self.breaker.is_open else self._retry_delay(exc, attempt, slept, timeouts)
                if delay is None:
                    self._observer.request_done(self.name, operation, exc.kind, time.monotonic() - started)
                    self._observer.error(self.name, exc.kind)
                    raise
                log.debug("upstream %s: %s failed (%s), retrying in %.1fs", self.name, operation, exc.kind, delay)
                await self._sleep(delay)
                slept += delay
                attempt += 1
                continue
            self.breaker.answered()
            self._observer.request_done(self.name, operation, str(status), time.monotonic() - started)
            return value

    def _retry_delay(self, exc: UpstreamError, attempt: int, slept: float, timeouts: int) -> float | None:
        if attempt >= self._settings.retries:
            return None
        if isinstance(exc, UpstreamTooManyRequests):
            if exc.retry_after is None or exc.retry_after > SHORT_RETRY_AFTER:
                return None
            delay = exc.retry_after
        elif isinstance(exc, UpstreamUnavailable):
            # A bad certificate will not get better; a second timeout means each
            # further try costs another full timeout.
            if isinstance(exc.__cause__, aiohttp.ClientSSLError | ssl.SSLError) or timeouts > 1:
                return None
            delay = min(BACKOFF_BASE * 2**attempt, BACKOFF_CAP)
        else:
            return None
        return delay if slept + delay <= RETRY_BUDGET else None

    def _translate(self, exc: BaseException, operation: str) -> UpstreamError:
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"upstream {self.name}: {operation} timed out", upstream=self.name)
        reason = getattr(getattr(exc, "os_error", None), "strerror", None) or type(exc).__name__
        return UpstreamUnavailable(f"upstream {self.name}: {operation} failed: {reason}", upstream=self.name)

    async def _attempt(
        self,
        method: str,
        url: URL,
        accept: Sequence[str],
        scope: str | None,
        authority: UpstreamAuth | None,
        fetch: Fetch[R],
        extra: Mapping[str, str] | None = None,
    ) -> R:
        """One try: known credentials first, then at most one answered 401."""
        headers = {"User-Agent": self._user_agent, "Accept-Encoding": "identity", **(extra or {})}
        if accept:
            headers["Accept"] = ", ".join(accept)
        auth = await authority.known(scope) if authority is not None else None
        resp = await self._send(method, url, headers, auth, fetch)
        if authority is None or resp.status != 401 or not self._is_upstream(resp.url):
            return resp
        challenge = resp.headers.get("WWW-Authenticate", "")
        resp.release()
        authority.forget(auth, scope)
        auth = await authority.answer(challenge, scope)
        if auth is None:
            raise UpstreamUnauthorized(f"upstream {self.name}: authentication required", upstream=self.name)
        return await self._send(method, url, headers, auth, fetch)

    async def _send(self, method: str, url: URL, headers: dict[str, str], auth: str | None, fetch: Fetch[R]) -> R:
        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = dict(headers)
            if auth is not None and self._is_upstream(url):
                hop_headers["Authorization"] = auth
            resp = await fetch(method, url, hop_headers)
            if resp.status not in _REDIRECT_STATUSES:
                return resp
            location = resp.headers.get("Location")
            resp.release()
            target = url.join(URL(location)) if location else None
            if target is None or target.scheme not in ("http", "https"):
                raise UpstreamError(f"upstream {self.name}: unusable redirect", upstream=self.name)
            url = target
        raise UpstreamError(f"upstream {self.name}: more than {MAX_REDIRECTS} redirects", upstream=self.name)

    async def _fetch_aiohttp(self, method: str, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return await self._session.request(method, url, headers=headers, allow_redirects=False, ssl=self._ssl_for(url))

    async def _fetch_inline(self, method: str, url: URL, headers: dict[str, str]) -> LoopAnswer:
        if self._inline is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return await self._inline.fetch(method, url, headers, self._ssl_for(url))

    async def _fetch_blocking(self, method: str, url: URL, headers: dict[str, str]) -> Answer:
        connections = self._connections
        if connections is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        with client_span(method, url) as trace_headers:
            return await connections.fetch(method, url, headers | trace_headers, self._ssl_for(url))

    def _check(self, resp: Reply, operation: str) -> None:
        self._note_rate_limit(resp)
        status = resp.status
        if 200 <= status < 300:
            return
        message = f"upstream {self.name}: {operation} answered {status}"
        if status == 404:
            raise UpstreamNotFound(message, upstream=self.name)
        if status == 401:
            raise UpstreamUnauthorized(message, upstream=self.name)
        if status == 403:
            raise UpstreamDenied(message, upstream=self.name)
        if status == 429:
            wait = retry_after(resp.headers.get("Retry-After"))
            raise UpstreamTooManyRequests(message, upstream=self.name, retry_after=wait)
        if status >= 500:
            raise UpstreamServerError(message, upstream=self.name)
        raise UpstreamError(message, upstream=self.name)

    def _note_rate_limit(self, resp: Reply) -> None:
        limit, remaining = resp.headers.get("RateLimit-Limit"), resp.headers.get("RateLimit-Remaining")
        if limit is None and remaining is None:
            return
        previous = self.rate_limit
        self.rate_limit = RateLimit(leading_int(limit), leading_int(remaining), window(limit), time.time())
        self._observer.rate_limit(self.name, self.rate_limit.limit, self.rate_limit.remaining)
        if self.rate_limit.remaining == 0 and (previous is None or previous.remaining != 0):
            log.warning(
                "upstream %s: rate limit exhausted (limit %s per %ss); cached tags are served stale",
                self.name,
                self.rate_limit.limit,
                self.rate_limit.window,
            )

    async def _chunks(self, pieces: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """A body's ``pieces``, its failures as the upstream errors they are."""
        try:
            async with contextlib.aclosing(pieces):
                async for chunk in pieces:
                    yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            error = self._translate(exc, "blob body")
            self.breaker.failed(error)
            self._observer.error(self.name, error.kind)
            raise error from exc

    # -- auth -----------------------------------------------------------------

    async def _get_token_body(self, url: URL, authorization: str | None) -> bytes:
        """GET a token realm; what to send and what the answer means is UpstreamAuth's business."""
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        headers = {"User-Agent": self._user_agent, "Accept": "application/json", "Accept-Encoding": "identity"}
        if authorization is not None:
            headers["Authorization"] = authorization
        started = time.monotonic()
        async with self._session.get(url, headers=headers, allow_redirects=False, ssl=self._ssl_for(url)) as resp:
            self._observer.request_done(self.name, "token", str(resp.status), time.monotonic() - started)
            if resp.status in (401, 403):
                who = "anonymous access" if authorization is None else "the credentials"
                raise UpstreamUnauthorized(f"upstream {self.name}: token realm refused {who}", upstream=self.name)
            self._check(resp, "token")
            return await read_limited(resp, MAX_TOKEN_BODY, self._too_big("token response"))

    # -- helpers --------------------------------------------------------------

    def _v2(self, repository: str, *parts: str) -> URL:
        validate_name(repository)
        return URL(f"{self._settings.base_url}/v2/{repository}/{'/'.join(parts)}")

    def _is_upstream(self, url: URL) -> bool:
        base = self._base
        return (url.scheme, (url.host or "").lower(), url.port) == (base.scheme, (base.host or "").lower(), base.port)

    def _ssl_for(self, url: URL) -> ssl.SSLContext | bool:
        # ca_bundle, client cert and `insecure` are about the upstream's own host;
        # CDNs and realms elsewhere get full verification and no client cert.
        if url.scheme != "https":
            return True
        own = (url.host or "").lower() == (self._base.host or "").lower()
        return (self._ssl_own if own else self._ssl_other) or True

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._slots is None:
            yield
            return
        async with self._slots:
            yield

    def _too_big(self, what: str) -> Callable[[], UpstreamError]:
        return lambda: UpstreamError(f"upstream {self.name}: {what} is too large", upstream=self.name)


def _ssl_contexts(settings: UpstreamSettings) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    own, other = ssl.create_default_context(), ssl.create_default_context()
    if settings.ca_bundle is not None:
        # Added to the system roots: the realm or a CDN may use a public CA.
        for context in (own, other):
            context.load_verify_locations(cafile=str(settings.ca_bundle))
    if settings.insecure:
        own.check_hostname = False
        own.verify_mode = ssl.CERT_NONE
    if settings.client_cert is not None:
        key = str(settings.client_key) if settings.client_key is not None else None
        own.load_cert_chain(str(settings.client_cert), key)
    return own, other


def _done_with(resp: aiohttp.ClientResponse) -> None:
    """A body read to its end keeps its connection for the next request; one left unread loses it."""
    if resp.content.at_eof():
        resp.release()
    else:
        resp.close()


def _pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def _checked_reference(reference: str) -> str:
    return reference if is_digest(reference) else validate_tag(reference)


async def _pieces(resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
    # Each piece as it arrived: no joining or re-slicing copies.
    async for chunk, _ in resp.content.iter_chunks():
        yield chunk


async def _answer_chunks(answer: Answer) -> AsyncGenerator[bytes, None]:
    """A blocking body as pieces for the loop: a trip to a thread per piece."""
    buffer = memoryview(bytearray(CHUNK_SIZE))
    while count := await asyncio.to_thread(answer.readinto, buffer):
        yield bytes(buffer[:count])
