"""Blob bytes from a file to a client's socket on a pool thread.

Why not ``loop.sendfile``: it makes every sendfile(2) call on the event loop's
thread, so one process copies at most one core's worth of bytes while
manifests wait behind it, and uvloop has no ``loop.sendfile`` at all (aiohttp
then copies through Python). Here the copy runs on a pool thread: several
clients use several cores and the loop stays free for requests.

How the bytes move depends on where the client is. To a client on another
host, sendfile(2): the kernel hands page-cache pages to the NIC and the
sender copies nothing. To a client on this host (loopback: containerd beside
a node-local cache, a sidecar, the bench), the receiving socket gets the
sender's own buffers; sendfile's page-cache fragments make every receive
cost more, and a client that reads slowly (skopeo, ~170 MiB/s) spends a
third more system time on the same bytes. There, one ``pread`` into a
reused 1 MiB buffer and ``write`` per slice was measured faster for every
reader: skopeo 20 % (as fast as a direct pull from distribution, which also
copies), curl and 8 parallel curls 5-20 %, a cold fill 8 %.

A fill's client is the exception: it is sent the spool by sendfile wherever it is.
Its bytes were just written; copying them out again, as a file already cached is
to a client on this host, adds a read of every byte on the path that bounds a
cold GET here (two cores: the upstream sending, receiving, hashing, writing, the
client). Measured on the cold 1 GiB GET, alternating (README, "The first client follows
the writer"): 0.91-1.15x the distribution proxy's throughput by sendfile, 0.76-0.79x
copying, 0.78-1.00x before the follower.

Safety: the thread works on duplicates of the socket and file descriptors, so
a connection or file that aiohttp closes meanwhile can never be confused with
a new one that reuses its number. The transport's own buffer is empty before
the thread writes (headers first), and nothing else writes to the socket until
the thread is done. TLS connections cannot use this (``possible`` says so).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeGuard

from storage import directio
from storage.backends.base import BlockingBody
from storage.progress import SpoolFollower

# One thread per blob body being sent; threads blocked in poll() cost little.
_POOL = ThreadPoolExecutor(max_workers=256, thread_name_prefix="regcache-send")
# Bytes per sendfile(2) call: the call returns early when the socket buffer is full anyway.
_SLICE = 16 * 1024 * 1024
# Bytes per pread/write to a client on this host: 256 KiB to 4 MiB measured alike; one
# buffer per body being sent.
_COPY_SLICE = 1024 * 1024
# Bytes per read around the page cache: each waits for the disk, so fewer and larger ones
# (1 MiB reads took 0.9 s of a 1 GiB cold fill's 1.3 s here, 4 MiB ones 0.6 s).
_DIRECT_SLICE = 4 * 1024 * 1024
_POLL_MS = 500  # how often a waiting thread looks at its stop flag
_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


class Stalled(ConnectionError):
    """The client took no bytes for the stall timeout."""


def possible(transport: asyncio.BaseTransport | None) -> TypeGuard[asyncio.WriteTransport]:
    """Whether bytes may go straight to this connection's socket: plain TCP, still open."""
    if transport is None or transport.is_closing() or not hasattr(os, "sendfile"):
        return False
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.fileno() >= 0


class FileSender:
    """Sends file ranges to one client connection; ``close`` when the response ends."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        # Both addresses as the transport recorded them when the connection was accepted.
        self._copy = same_host(transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
        self._sock = os.dup(transport.get_extra_info("socket").fileno())
        self._stop = threading.Event()
        self._jobs = 0
        self._closing = False

    async def send(self, file_fd: int, offset: int, count: int, stall_timeout: float,
                   direct_fd: int | None = None) -> None:
        """Send ``count`` bytes of ``file_fd`` from ``offset``; raises on a gone or stalled client.
        With ``direct_fd`` (the same file opened with O_DIRECT) the bytes are read from it,
        around the page cache, and copied to any client (storage.directio)."""
        if count <= 0:
            return
        await self._drain_transport(stall_timeout)
        # A direct read is copied to any client: sendfile would bring every page into the cache.
        send = _copy_blocking if self._copy else _sendfile_blocking
        if direct_fd is not None:
            send = _copy_direct_blocking
        fd = os.dup(file_fd if direct_fd is None else direct_fd)
        await self._run(send, (fd, offset, count, stall_timeout), owned=(fd,))

    async def follow(self, spool: SpoolFollower, count: int, stall_timeout: float) -> None:
        """Send the first ``count`` bytes of a spool being written, each batch as soon as the
        writing thread says it landed, the last byte once the blob is verified; one pool
        thread for the whole body, woken by the writer, not by the loop. Raises on a gone or
        stalled client, ``SpoolAborted`` if the fill fails, or if the spool stops short."""
        await self._drain_transport(stall_timeout)
        fd = os.dup(spool.fd)
        direct_fd = None if spool.direct_fd is None else os.dup(spool.direct_fd)
        await self._run(_follow_blocking, (fd, direct_fd, spool, count, stall_timeout),
                        owned=(fd,) if direct_fd is None else (fd, direct_fd))

    async def send_body(self, body: BlockingBody, count: int, stall_timeout: float) -> None:
        """Send ``count`` bytes of a remote store's ``body`` (``BlobBackend.open_body``), read and
        written on a pool thread; raises on a gone or stalled client or a body cut short."""
        await self._drain_transport(stall_timeout)
        await self._run(_relay_blocking, (body, count, stall_timeout), owned=())

    async def _run(self, job: Callable[..., None], args: tuple[Any, ...], owned: tuple[int, ...]) -> None:
        """``job(socket, *args, stop)`` on a pool thread; the descriptors in ``owned`` are closed
        once it is done, whether it finished, failed or was abandoned."""
        self._jobs += 1
        run = functools.partial(job, self._sock, *args, self._stop)
        future = asyncio.get_running_loop().run_in_executor(_POOL, run)
        future.add_done_callback(lambda _: self._job_done(owned))
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            self._stop.set()  # the thread stops at its next look; its done callback closes the fds
            raise

    async def _drain_transport(self, stall_timeout: float) -> None:
        # Headers (or an earlier write) may still sit in the transport's buffer: they go first.
        deadline = time.monotonic() + stall_timeout
        while self._transport.get_write_buffer_size() > 0:
            if self._transport.is_closing():
                raise ConnectionResetError("connection lost")
            if time.monotonic() > deadline:
                raise Stalled("client took no bytes")
            await asyncio.sleep(0.001)
        if self._transport.is_closing():
            raise ConnectionResetError("connection lost")

    def _job_done(self, owned: tuple[int, ...]) -> None:
        for fd in owned:
            os.close(fd)
        self._jobs -= 1
        if self._closing and self._jobs == 0:
            self._close_socket()

    def close(self) -> None:
        self._stop.set()
        self._closing = True
        if self._jobs == 0:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._sock >= 0:
            os.close(self._sock)
            self._sock = -1


def same_host(local: tuple[Any, ...] | None, peer: tuple[Any, ...] | None) -> bool:
    """Whether a connection's two ends are this host (socket addresses as Python gives them)."""
    if local is None or peer is None:
        return False
    try:
        peer_ip = ipaddress.ip_address(peer[0])
    except (ValueError, IndexError, TypeError):
        return False  # a Unix socket or anything unexpected: the default path
    if isinstance(peer_ip, ipaddress.IPv6Address) and peer_ip.ipv4_mapped is not None:
        peer_ip = peer_ip.ipv4_mapped
    return peer_ip.is_loopback or str(peer_ip) == str(local[0]).removeprefix("::ffff:")


def _sendfile_blocking(
    sock: int, fd: int, offset: int, count: int, stall_timeout: float, stop: threading.Event
) -> None:
    waiter = _Writable(sock, stall_timeout)
    while count > 0:
        if stop.is_set():
            raise ConnectionResetError("response abandoned")
        try:
            sent = os.sendfile(sock, fd, offset, min(count, _SLICE))
        except BlockingIOError:
            waiter.wait()
            continue
        if sent == 0:
            raise OSError("file shorter than its announced size")
        offset += sent
        count -= sent
        waiter.progressed()


def _copy_blocking(sock: int, fd: int, offset: int, count: int, stall_timeout: float, stop: threading.Event) -> None:
    buffer = memoryview(bytearray(min(count, _COPY_SLICE)))
    position = offset

    def pread(want: int) -> memoryview:
        nonlocal position
        got = os.preadv(fd, [buffer[:want]], position)
        position += got
        return buffer[:got]

    _copy(sock, pread, count, len(buffer), stall_timeout, stop, "file")


def _copy_direct_blocking(sock: int, fd: int, offset: int, count: int, stall_timeout: float,
                          stop: threading.Event) -> None:
    """As ``_copy_blocking``, from a file opened with O_DIRECT: whole aligned blocks are read
    into an aligned buffer and the wanted part of them is sent."""
    buffer = _DIRECT_BUFFERS.take()
    position = offset

    def pread(want: int) -> memoryview:
        nonlocal position
        data = directio.pread(fd, buffer, position, want)
        position += len(data)
        return data

    try:
        _copy(sock, pread, count, len(buffer) - 2 * directio.ALIGN, stall_timeout, stop, "file")
    finally:
        _DIRECT_BUFFERS.give(buffer)


def _follow_blocking(sock: int, fd: int, direct_fd: int | None, spool: SpoolFollower, count: int,
                     stall_timeout: float, stop: threading.Event) -> None:
    """``FileSender.follow`` on its thread: each range the writer says landed, sent as soon as
    it has; waits for the upstream do not count as a stall. By sendfile to any client (see the
    module's docstring), or copied from a spool written around the page cache."""
    position = 0
    while position < count:
        if stop.is_set():
            raise ConnectionResetError("response abandoned")
        ready = spool.progress.readable(position, _POLL_MS / 1000)
        if ready is None:
            continue
        end = min(ready[0], count)
        if end <= position:  # verified, and nothing past ``position``
            raise OSError("spool shorter than its announced size")
        if direct_fd is not None and spool.direct():
            _copy_direct_blocking(sock, direct_fd, position, end - position, stall_timeout, stop)
        else:
            _sendfile_blocking(sock, fd, position, end - position, stall_timeout, stop)
        position = end


class _Buffers:
    """Aligned buffers for direct reads, lent per send and kept for the next ones: a new
    mapping per slice would fault in fresh pages for every slice sent, the very cost direct
    I/O avoids. The first ``large`` sends at a time get ``_DIRECT_SLICE`` (a fill's first
    client, as a rule), the others 1 MiB, so eight clients of one cold fill hold 14 MiB, not
    32; one buffer of each size is kept idle, so memory goes back once fills end."""

    def __init__(self, large: int) -> None:
        self._large = large
        self._lent_large = 0
        self._free: dict[int, list[memoryview]] = {_DIRECT_SLICE: [], _COPY_SLICE: []}
        self._lock = threading.Lock()

    def take(self) -> memoryview:
        with self._lock:
            size = _DIRECT_SLICE if self._lent_large < self._large else _COPY_SLICE
            if size == _DIRECT_SLICE:
                self._lent_large += 1
            if self._free[size]:
                return self._free[size].pop()
        return directio.buffer(size + 2 * directio.ALIGN)

    def give(self, buffer: memoryview) -> None:
        size = len(buffer) - 2 * directio.ALIGN
        with self._lock:
            if size == _DIRECT_SLICE:
                self._lent_large -= 1
            if not self._free[size]:
                self._free[size].append(buffer)


_DIRECT_BUFFERS = _Buffers(large=2)


def _relay_blocking(
    sock: int, body: BlockingBody, count: int, stall_timeout: float, stop: threading.Event
) -> None:
    """As ``_copy_blocking``, from a body that arrives over the network instead of a file. Two
    copies in all (the store's socket into the buffer, the buffer into the client's socket); the
    body is closed here whatever happens, so its connection goes back to its pool or away."""
    buffer = memoryview(bytearray(min(count, _COPY_SLICE)))

    def read(want: int) -> memoryview:
        return buffer[:body.readinto(buffer[:want])]

    try:
        _copy(sock, read, count, len(buffer), stall_timeout, stop, "store body")
    finally:
        body.close()


def _copy(sock: int, read: Callable[[int], memoryview], count: int, slice_bytes: int, stall_timeout: float,
          stop: threading.Event, source: str) -> None:
    """``count`` bytes to the non-blocking ``sock``, ``read`` giving at most ``slice_bytes``
    of them at a time (a view of a buffer it reuses)."""
    waiter = _Writable(sock, stall_timeout)
    while count > 0:
        if stop.is_set():
            raise ConnectionResetError("response abandoned")
        pending = read(min(count, slice_bytes))
        if not pending:
            raise OSError(f"{source} shorter than its announced size")
        count -= len(pending)
        while pending:
            if stop.is_set():
                raise ConnectionResetError("response abandoned")
            try:
                sent = os.write(sock, pending)
            except BlockingIOError:
                waiter.wait()
                continue
            pending = pending[sent:]
            waiter.progressed()


class _Writable:
    """Waits for a non-blocking socket to take bytes again, within the stall timeout."""

    def __init__(self, sock: int, stall_timeout: float) -> None:
        self._poller = select.poll()
        self._poller.register(sock, select.POLLOUT)
        self._stall_timeout = stall_timeout
        self._deadline = time.monotonic() + stall_timeout

    def progressed(self) -> None:
        self._deadline = time.monotonic() + self._stall_timeout

    def wait(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise Stalled(f"client took no bytes for {self._stall_timeout}s")
        for _, events in self._poller.poll(min(_POLL_MS, left * 1000)):
            if events & _BAD and not events & select.POLLOUT:
                raise ConnectionResetError("connection lost")
