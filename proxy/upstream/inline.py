"""HTTP/1.1 on the loop for small blob bodies: one request, one answer, few Python steps.

A small layer or a config (``SMALL_BLOB``) arrives in a read or two, so what a
fill of one costs is mostly per request. Through aiohttp's client that is
about 0.7 ms of loop CPU on this kind of machine (a request object, its
headers' several copies, trace hooks, a connector key, a response object, a
payload stream with its timers); a request written in one call and an answer
read with ``readuntil`` and ``read`` costs about 0.3 ms (``bench/fills.py``
measures a whole fill). That is paid per blob, and an image is mostly small
blobs.

Like ``proxy.upstream.transport`` (the blocking transport for big bodies) this
is only the socket work: what to send, auth, redirects, retries and what a
status means stay in ``UpstreamClient``. Bodies are framed by Content-Length,
by chunked encoding, or by the server's close; an answer's head larger than
``HEAD_LIMIT`` is refused. No proxy support, as in the other transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.tracing import client_span
from proxy.upstream.transport import tls_context

# As in proxy.upstream.transport: idle connections older than this are closed, not reused.
KEEPALIVE = 15.0
IDLE_PER_ORIGIN = 16
# An answer's status line and headers; more is not a registry's answer.
HEAD_LIMIT = 64 * 1024
READ_SIZE = 256 * 1024
# Non-2xx answers (a redirect, an error) whose body is at most this are read before they are
# handed over, so that their connection can be reused: nobody reads those bodies.
DRAIN_LIMIT = 64 * 1024
_NO_BODY = frozenset({204, 304})
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")

Origin = tuple[str, str, int, int]  # scheme, host, port, id of the TLS context
_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class LoopAnswer:
    """One answer: status and headers at once, the body through ``chunks()``."""

    def __init__(self, pool: LoopConnections, origin: Origin, stream: _Stream, url: URL, status: int,
                 headers: CIMultiDictProxy[str], keep_alive: bool, read_timeout: float, bodiless: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.url = url
        self._pool = pool
        self._origin = origin
        self._stream: _Stream | None = stream
        self._read_timeout = read_timeout
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isascii() and length.isdigit() else None
        coding = headers.get("Transfer-Encoding", "").lower()
        bodiless = bodiless or status in _NO_BODY or status < 200
        self._chunked = not bodiless and coding.rsplit(",", 1)[-1].strip() == "chunked"
        if bodiless:
            self._left: int | None = 0
        elif coding:  # chunked; anything else ends with the connection (RFC 9112 6.3)
            self._left = None
        else:
            self._left = self.content_length
        # With neither length nor chunks the body ends when the server closes.
        self._keep = keep_alive and (self._left is not None or self._chunked)
        self._done = self._left == 0
        self._started = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body in pieces as they come. A body cut short raises ``ConnectionError``, a
        silent one ``TimeoutError`` after the read timeout; may be iterated once."""
        if self._started:
            raise RuntimeError("the body was read already")
        self._started = True
        if self._stream is None:
            raise ConnectionError("answer already released")
        reader = self._stream[0]
        try:
            if self._chunked:
                async for piece in self._chunked_body(reader):
                    yield piece
            elif self._left is None:
                while piece := await self._read(reader.read(READ_SIZE)):
                    yield piece
            else:
                while self._left:
                    piece = await self._read(reader.read(min(self._left, READ_SIZE)))
                    if not piece:
                        raise ConnectionError(f"body ended {self._left} bytes short")
                    self._left -= len(piece)
                    # Done with the last byte, before the consumer asks past it: the
                    # connection is reusable even if it stops at the length it knew.
                    self._done = self._left == 0
                    yield piece
            self._done = True
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError(f"body ended after {len(exc.partial)} more bytes") from None
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise ConnectionError(f"unreadable chunked body: {exc}") from None

    async def _chunked_body(self, reader: asyncio.StreamReader) -> AsyncGenerator[bytes, None]:
        while True:
            line = await self._read(reader.readuntil(b"\r\n"))
            digits = line.split(b";", 1)[0].strip()  # chunk extensions, ignored
            if _CHUNK_SIZE.fullmatch(digits) is None:
                raise ValueError(f"chunk size {digits[:20]!r}")
            size = int(digits, 16)
            if size == 0:
                while await self._read(reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, ignored
                    pass
                return
            while size:
                piece = await self._read(reader.readexactly(min(size, READ_SIZE)))
                size -= len(piece)
                yield piece
            if await self._read(reader.readexactly(2)) != b"\r\n":
                raise ValueError("chunk without its CRLF")

    async def _read(self, reading: Awaitable[bytes]) -> bytes:
        async with asyncio.timeout(self._read_timeout):
            return await reading

    async def drain(self) -> None:
        """Read a short body nobody wants, so the connection can be reused."""
        if self._left is not None and self._left <= DRAIN_LIMIT and self._keep and not self._done:
            with contextlib.suppress(ConnectionError, TimeoutError):
                async for _ in self.chunks():
                    pass

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if its body was read to
        the end and the server keeps it; else it is closed."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if self._done and self._keep:
            self._pool.put(self._origin, stream)
        else:
            _close(stream)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            _close(stream)


class LoopConnections:
    """Keep-alive connections per origin, for requests made on the loop."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[Origin, list[tuple[float, _Stream]]] = {}
        self._closed = False

    async def fetch(self, method: str, url: URL, headers: Mapping[str, str], tls: ssl.SSLContext | bool) -> LoopAnswer:
        """Send ``method url`` and read the status line and headers, the body left unread. A
        kept-alive connection the server closed meanwhile is replaced once, transparently:
        nothing of the request was answered."""
        context = tls_context(tls) if url.scheme == "https" else None
        origin: Origin = (url.scheme, (url.host or "").lower(), url.port or 0, id(context))
        with client_span(method, url) as trace_headers:
            request = _request(method, url, {**headers, **trace_headers})
            while True:
                stream, reused = self._take(origin), True
                if stream is None:
                    stream, reused = await self._open(url, context), False
                try:
                    stream[1].write(request)
                    status, fields, keep_alive = await self._head(stream[0])
                except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                    _close(stream)
                    if reused and not getattr(exc, "partial", b""):
                        continue
                    raise ConnectionError(f"connection closed before an answer: {type(exc).__name__}") from None
                except BaseException:
                    _close(stream)
                    raise
                answer = LoopAnswer(self, origin, stream, url, status, fields, keep_alive, self._read_timeout,
                                    bodiless=method == "HEAD")
                if not 200 <= status < 300:
                    try:
                        await answer.drain()
                    except BaseException:  # cancelled: the connection is in no state to reuse
                        answer.close()
                        raise
                return answer

    async def _head(self, reader: asyncio.StreamReader) -> tuple[int, CIMultiDictProxy[str], bool]:
        while True:
            try:
                async with asyncio.timeout(self._read_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise ConnectionError(f"answer head larger than {HEAD_LIMIT} bytes") from None
            status, fields, keep_alive = _parse_head(head)
            if status >= 200 or status == 101:
                return status, fields, keep_alive
            # 1xx (100 Continue, 103 Early Hints): the answer follows.

    async def _open(self, url: URL, context: ssl.SSLContext | None) -> _Stream:
        host = url.host or ""
        async with asyncio.timeout(self._connect_timeout):
            return await asyncio.open_connection(
                host, url.port, ssl=context, server_hostname=host if context is not None else None,
                limit=HEAD_LIMIT,
            )

    def put(self, origin: Origin, stream: _Stream) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= IDLE_PER_ORIGIN or stream[0].at_eof():
            _close(stream)
            return
        idle.append((time.monotonic(), stream))

    def idle(self) -> int:
        """Connections kept alive for reuse, over every origin."""
        return sum(len(streams) for streams in self._idle.values())

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for _, stream in streams:
                _close(stream)

    def _take(self, origin: Origin) -> _Stream | None:
        now = time.monotonic()
        idle = self._idle.get(origin)
        while idle:
            since, stream = idle.pop()  # the most recently used: the least likely to be stale
            if now - since < KEEPALIVE and not stream[0].at_eof():
                return stream
            _close(stream)
        return None


def _request(method: str, url: URL, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {url.raw_path_qs or '/'} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _parse_head(head: bytes) -> tuple[int, CIMultiDictProxy[str], bool]:
    """(status, headers, whether the server keeps the connection) from a head ending in CRLF CRLF."""
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isascii() and code.isdigit()):
        raise ConnectionError(f"unreadable status line {status_line[:80]!r}")
    fields: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":  # obs-fold is refused too
            raise ConnectionError(f"unreadable header line {line[:80]!r}")
        fields.add(name, value.strip(" \t"))
    connection = fields.get("Connection", "").lower()
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    lengths = set(fields.getall("Content-Length", []))
    if len(lengths) > 1 or not all(length.isascii() and length.isdigit() for length in lengths):
        raise ConnectionError(f"unusable Content-Length {sorted(lengths)!r}")
    return int(code), CIMultiDictProxy(fields), keep_alive


def _close(stream: _Stream) -> None:
    stream[1].close()

