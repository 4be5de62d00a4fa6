"""Blob bodies to and from the bucket on worker threads, past aiohttp.

botocore presigns each request (``S3Client.presign``); this module moves the
bytes with ``http.client`` on a thread. A part goes from the spool file to a
store on another host with sendfile(2), nothing copied in this process and no
part held in memory; to a store on this host or over TLS through one reused
1 MiB buffer. A stored blob's body is read into the caller's buffer (one
copy), and ``proxy.http.filesend`` writes it on to the client's socket from the
same thread.

Why not aiobotocore for these: every byte it moves passes through the event
loop, and more than once: aiohttp's parser makes a bytes object of every read
and a read of n bytes joins them again; a part is read whole into memory to be
sent. On RGW on this host, measured per GiB: a warm GET cost regcache 1.3-1.6
CPU s through aiobotocore and 0.7 s here; a cold fill 4.8-6.7 s (2.3-2.7 on the
event loop) and 3.7-4.3 s (1.4-1.5 on the loop).

Used only where botocore would connect directly too (``S3Client.direct_tls``:
no proxy for the endpoint); otherwise the backend keeps to aiobotocore.
Errors become regcache's as everywhere in this package (``client.answer_error``).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from storage.backends.s3.client import answer_error
from storage.errors import RegcacheError, StoreUnavailable

# Bytes per sendfile(2) call: it returns early when the socket buffer is full anyway.
_SENDFILE_SLICE = 8 * 1024 * 1024
# Where the bytes pass through this process (TLS, a store on this host): read and sent in slices.
_COPY_SLICE = 1024 * 1024
# A request that fails on the connection or with a 5xx is sent again, on a new connection
# (a pooled one the store closed meanwhile fails on first use): as botocore's standard mode.
ATTEMPTS = 3
_BACKOFF = 0.2
_IDLE_CONNECTIONS = 16
_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
T = TypeVar("T")


class Transfers:
    """Keep-alive connections to the store's one endpoint, used by one thread at a time each."""

    def __init__(self, tls: ssl.SSLContext | None, connect_timeout: float, read_timeout: float) -> None:
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    # Blocking: every method below runs on a worker thread.

    def put_part(self, url: str, fd: int, offset: int, length: int, what: str) -> str:
        """Sends ``length`` bytes of the file ``fd`` from ``offset`` as the body of the presigned
        PUT ``url`` (an UploadPart); its ETag."""

        def send(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
            conn.putrequest("PUT", _target(url), skip_accept_encoding=True)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
            _send_range(conn, fd, offset, length)
            return conn.getresponse()

        def stored(conn: http.client.HTTPConnection, answer: http.client.HTTPResponse) -> str:
            answer.read()
            self.give_back(conn, answer)
            return answer.getheader("ETag") or ""

        return self._attempts(url, what, send, stored)

    def get(self, url: str, what: str) -> StoreBody:
        """The body of the presigned GET ``url``, once the store has answered 200."""

        def send(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
            conn.request("GET", _target(url))
            return conn.getresponse()

        def body(conn: http.client.HTTPConnection, answer: http.client.HTTPResponse) -> StoreBody:
            if answer.length is None:
                raise http.client.HTTPException("no Content-Length in the store's answer")
            return StoreBody(self, conn, answer, what)

        return self._attempts(url, what, send, body)

    def _attempts(self, url: str, what: str, send: Callable[[http.client.HTTPConnection], http.client.HTTPResponse],
                  ok: Callable[[http.client.HTTPConnection, http.client.HTTPResponse], T]) -> T:
        """``send`` on a pooled connection, then ``ok`` with a 200; a failure on the connection
        or a 5xx is tried again (``ATTEMPTS`` in all), any other status raises at once."""
        for attempt in range(1, ATTEMPTS + 1):
            conn: http.client.HTTPConnection | None = None
            try:
                conn = self._take(url)
                answer = send(conn)
                if answer.status == 200:
                    return ok(conn, answer)
                body = answer.read()
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                if attempt == ATTEMPTS:
                    raise StoreUnavailable(f"object store unreachable for {what}: {exc}") from exc
                time.sleep(_BACKOFF * attempt)
                continue
            self.give_back(conn, answer)
            error = _error(answer.status, body, what)
            if answer.status < 500 or attempt == ATTEMPTS:
                raise error
            time.sleep(_BACKOFF * attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self, url: str) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        if self._tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        return conn

    def on_this_host(self, url: str) -> bool:
        """Whether the store at ``url`` runs on this host (connects once to see)."""
        conn = self._take(url)
        assert conn.sock is not None
        try:
            return _loopback(conn.sock)
        finally:
            self.give_back(conn, None)

    def give_back(self, conn: http.client.HTTPConnection, answer: http.client.HTTPResponse | None) -> None:
        """Back to the pool once ``answer`` (if any) has been read to its end, if the store keeps
        the connection open."""
        if answer is not None and (answer.will_close or not answer.isclosed()):
            conn.close()
            return
        with self._lock:
            if not self._closed and len(self._idle) < _IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()


class StoreBody:
    """A stored blob's body as the store sends it: ``readinto`` blocks, a short body raises."""

    def __init__(
        self, transfers: Transfers, conn: http.client.HTTPConnection, answer: http.client.HTTPResponse, what: str
    ) -> None:
        self._transfers = transfers
        self._conn = conn
        self._answer = answer
        self._what = what
        assert answer.length is not None
        self.size: int = answer.length
        self._left = self.size
        self._closed = False

    def readinto(self, buffer: memoryview) -> int:
        """Fills the start of ``buffer`` with the next bytes; 0 at the end of the body."""
        if not self._left or not buffer:
            return 0
        try:
            got = self._answer.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            raise StoreUnavailable(f"object store broke off the body of {self._what}: {exc}") from exc
        if not got:  # http.client ends a body cut short quietly
            raise StoreUnavailable(f"object store broke off the body of {self._what}: {self._left} bytes missing")
        self._left -= got
        return got

    def close(self) -> None:
        """Done with the body: its connection is reused only if it was read to the end."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._transfers.give_back(self._conn, self._answer)


def _target(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"


def _error(status: int, body: bytes, what: str) -> RegcacheError:
    found = _CODE.search(body)
    code = found.group(1).decode("ascii", "replace") if found else ""
    return answer_error(status, code, what, f"{status} {code}".strip())


def _send_range(conn: http.client.HTTPConnection, fd: int, offset: int, length: int) -> None:
    sock = conn.sock
    assert sock is not None
    if isinstance(sock, ssl.SSLSocket) or _loopback(sock):
        # TLS needs the bytes in this process to encrypt them. To a store on this host, the
        # receiver gets the sender's pages: sendfile's page-cache fragments cost RGW more than
        # the copy here saves (a cold 1 GiB fill: Ceph 7.4-7.9 CPU s with sendfile, 6.1-6.8
        # copying, regcache 0.3 s more), as proxy.http.filesend found for clients on this host.
        buffer = memoryview(bytearray(min(length, _COPY_SLICE)))
        while length > 0:
            got = os.preadv(fd, [buffer[: min(length, len(buffer))]], offset)
            if got == 0:
                raise OSError("spool file shorter than the part")
            sock.sendall(buffer[:got])
            offset += got
            length -= got
        return
    # The socket has a timeout, so its descriptor is non-blocking: wait for room within it.
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    while length > 0:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, min(length, _SENDFILE_SLICE))
        except BlockingIOError:
            if not poller.poll(None if timeout is None else timeout * 1000):
                raise TimeoutError("the store took no bytes") from None
            continue
        if sent == 0:
            raise OSError("spool file shorter than the part")
        offset += sent
        length -= sent


def _loopback(sock: socket.socket) -> bool:
    """Whether the store is on this host (a loopback peer, or our own address)."""
    try:
        local, peer = sock.getsockname(), sock.getpeername()
        address = ipaddress.ip_address(peer[0])
    except (OSError, ValueError, IndexError, TypeError):
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or str(address) == str(local[0]).removeprefix("::ffff:")
