"""Blocking HTTP/1.1 for blob bodies: read on a fill's own thread, straight into its buffers.

A blob body read through aiohttp passes the event loop once per socket read
(a quarter MiB): the parser copies each piece, a read timer is rescheduled, the
fill wakes, hands a batch to a thread and back. For a big layer that is about
a second of loop CPU per GiB, on the core that also serves every other client.
Here the fill's thread ``readinto``s its own buffer (one kernel copy, the GIL
released while it waits) and the loop only hears when a batch has landed.

Only the socket work is here: requests go out and their answers come back as
``Answer``s, pooled per origin like aiohttp's connector. What to send, auth,
redirects, retries and what a status means stay in ``UpstreamClient``, the same
code for both transports. Every call but ``interrupt`` blocks: run it on a
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# An idle connection older than this is closed rather than reused: servers drop
# idle keep-alive connections after a while (aiohttp's default is 15 s as well).
KEEPALIVE = 15.0
IDLE_PER_ORIGIN = 16
# Requests waiting for their answers at once; more queue for a thread.
THREADS = 64
# What is left of a body not read to its end is read (and the connection kept)
# only up to this; beyond it closing is cheaper than draining.
DRAIN_LIMIT = 64 * 1024

Origin = tuple[str, str, int, int]  # scheme, host, port, id of the TLS context


class Answer:
    """One response: status and headers at once, the body through ``readinto`` (on a thread)."""

    def __init__(self, pool: Connections, origin: Origin, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, url: URL) -> None:
        self.status = response.status
        self.headers = CIMultiDictProxy(CIMultiDict(response.getheaders()))
        self.url = url
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._pool = pool
        self._origin = origin
        self._conn: http.client.HTTPConnection | None = conn
        self._response = response
        self._broken = False  # a read failed or was interrupted: the connection is not reused

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the body; fewer bytes only at its end, 0 after it.

        A body cut short (a reset, a close before Content-Length bytes) raises
        ``ConnectionError``; a silent one ``TimeoutError`` after the read timeout.
        """
        try:
            count = self._response.readinto(buffer)
        except TimeoutError:
            self._broken = True
            raise
        except http.client.IncompleteRead as exc:
            self._broken = True
            raise ConnectionError(f"body ended after {len(exc.partial)} more bytes") from None
        except (http.client.HTTPException, OSError, ValueError) as exc:  # ValueError: closed by ``interrupt``
            self._broken = True
            raise ConnectionError(f"body unreadable: {type(exc).__name__}") from None
        # http.client ends a body the server closed before Content-Length bytes as if it
        # were complete (0, and the response closed); ``length`` is then what never came.
        missing = self._response.length
        if count == 0 and len(buffer) and missing:
            self._broken = True
            raise ConnectionError(f"body ended {missing} bytes short")
        return count

    def interrupt(self) -> None:
        """From any thread: makes a ``readinto`` blocked on this body return or raise now."""
        self._broken = True
        _shut(self._conn)

    def close(self) -> None:
        """Done with the answer, its body unwanted: the connection is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def release(self) -> None:
        """Done with the answer, without waiting: the connection goes back to the pool if
        its body was read to the end, or once a short rest has been read on the pool's
        threads (a redirect's or an error's few bytes); else it is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        response = self._response
        if self._broken or response.will_close:
            conn.close()
        elif response.isclosed():
            self._pool.put(self._origin, conn)
        elif response.length is not None and response.length <= DRAIN_LIMIT:
            self._pool.drain(self._origin, conn, response)
        else:
            conn.close()


class _Asking:
    """A request on a thread, as the loop sees it: ``interrupt`` cuts its connection."""

    def __init__(self) -> None:
        self.conn: http.client.HTTPConnection | None = None
        self.interrupted = False

    def interrupt(self) -> None:
        self.interrupted = True
        _shut(self.conn)


class Connections:
    """Keep-alive connections per origin, for requests made on threads."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[Origin, list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="regcache-upstream")
        self._asking: set[_Asking] = set()

    async def fetch(self, method: str, url: URL, headers: Mapping[str, str], tls: ssl.SSLContext | bool) -> Answer:
        """``request`` on this pool's own threads: a silent upstream holds one of them for
        up to the read timeout, never one of the loop's default workers. Cancelled (a
        fill given up, shutdown), the request's connection is cut so its thread is free
        at once, and an answer that still comes is closed."""
        asking = _Asking()
        self._asking.add(asking)
        future = self._threads.submit(self.request, method, url, headers, tls, asking)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            asking.interrupt()
            future.add_done_callback(_close_unwanted)
            raise
        finally:
            self._asking.discard(asking)

    def request(self, method: str, url: URL, headers: Mapping[str, str], tls: ssl.SSLContext | bool,
                asking: _Asking | None = None) -> Answer:
        """Send ``method url`` and read the status line and headers, the body left unread.
        A kept-alive connection the server has closed meanwhile is replaced once,
        transparently: nothing of the request was answered."""
        context = tls_context(tls) if url.scheme == "https" else None
        origin: Origin = (url.scheme, (url.host or "").lower(), url.port or 0, id(context))
        target = url.raw_path_qs or "/"
        while True:
            conn, reused = self._take(origin), True
            if conn is None:
                conn, reused = self._open(url, context), False
            if asking is not None:
                asking.conn = conn
                if asking.interrupted:
                    conn.close()
                    raise ConnectionError("request interrupted")
            try:
                conn.request(method, target, headers=dict(headers))
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                if reused:
                    continue
                raise ConnectionError(f"connection closed before an answer: {type(exc).__name__}") from None
            except http.client.HTTPException as exc:
                conn.close()
                raise ConnectionError(f"unreadable answer: {type(exc).__name__}") from None
            except BaseException:
                conn.close()
                raise
            return Answer(self, origin, conn, response, url)

    def drain(self, origin: Origin, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Read the short rest of ``response`` on a pool thread, then pool ``conn``."""

        def rest() -> None:
            try:
                response.read()
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                return
            self.put(origin, conn)

        try:
            self._threads.submit(rest)
        except RuntimeError:  # shut down
            conn.close()

    def put(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if self._closed or len(idle) >= IDLE_PER_ORIGIN:
                conn.close()
                return
            idle.append((time.monotonic(), conn))

    def idle(self) -> int:
        """Connections kept alive for reuse, over every origin."""
        with self._lock:
            return sum(len(conns) for conns in self._idle.values())

    def close(self) -> None:
        for asking in list(self._asking):
            asking.interrupt()
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                conn.close()
        self._threads.shutdown(wait=False)

    def _take(self, origin: Origin) -> http.client.HTTPConnection | None:
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(origin)
            while idle:
                since, conn = idle.pop()  # the most recently used: the least likely to be stale
                if now - since < KEEPALIVE:
                    return conn
                conn.close()
        return None

    def _open(self, url: URL, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
        host, port = url.host or "", url.port
        if context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        conn.connect()
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # From here on each wait (for the answer, for more of the body) may last this long.
            conn.sock.settimeout(self._read_timeout)
        return conn


def _shut(conn: http.client.HTTPConnection | None) -> None:
    """Any thread: a read or write blocked on ``conn`` returns or fails now."""
    sock = conn.sock if conn is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _close_unwanted(future: Future[Answer]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


_DEFAULT_CONTEXT: ssl.SSLContext | None = None


def tls_context(tls: ssl.SSLContext | bool) -> ssl.SSLContext:
    global _DEFAULT_CONTEXT
    if isinstance(tls, ssl.SSLContext):
        return tls
    if _DEFAULT_CONTEXT is None:
        _DEFAULT_CONTEXT = ssl.create_default_context()
    return _DEFAULT_CONTEXT
