"""Blob bytes from a file to a client's socket by sendfile(2), on a pool thread.

Why not ``loop.sendfile``: it makes every sendfile(2) call on the event loop's
thread, so one process copies at most one core's worth of bytes while
manifests wait behind it, and uvloop has no ``loop.sendfile`` at all (aiohttp
then copies through Python). Here the kernel copies on a pool thread: several
clients use several cores and the loop stays free for requests.

Safety: the thread works on duplicates of the socket and file descriptors, so
a connection or file that aiohttp closes meanwhile can never be confused with
a new one that reuses its number. The transport's own buffer is empty before
the thread writes (headers first), and nothing else writes to the socket until
the thread is done. TLS connections cannot use this (``possible`` says so).
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# One thread per blob body being sent; threads blocked in poll() cost little.
_POOL = ThreadPoolExecutor(max_workers=256, thread_name_prefix="regcache-send")
# Bytes per sendfile(2) call: the call returns early when the socket buffer is full anyway.
_SLICE = 16 * 1024 * 1024
_POLL_MS = 500  # how often a waiting thread looks at its stop flag
_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


class Stalled(ConnectionError):
    """The client took no bytes for the stall timeout."""


def possible(transport: asyncio.BaseTransport | None) -> bool:
    if transport is None or transport.is_closing() or not hasattr(os, "sendfile"):
        return False
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.fileno() >= 0


class KernelSender:
    """Sends file ranges to one client connection; ``close`` when the response ends."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._sock = os.dup(transport.get_extra_info("socket").fileno())
        self._stop = threading.Event()
        self._jobs = 0
        self._closing = False

    async def send(self, file_fd: int, offset: int, count: int, stall_timeout: float) -> None:
        """Send ``count`` bytes of ``file_fd`` from ``offset``; raises on a gone or stalled client."""
        if count <= 0:
            return
        await self._drain_transport(stall_timeout)
        fd = os.dup(file_fd)
        self._jobs += 1
        future = asyncio.get_running_loop().run_in_executor(
            _POOL, _send_blocking, self._sock, fd, offset, count, stall_timeout, self._stop
        )
        future.add_done_callback(lambda _: self._job_done(fd))
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

    def _job_done(self, fd: int) -> None:
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


def _send_blocking(sock: int, fd: int, offset: int, count: int, stall_timeout: float, stop: threading.Event) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    deadline = time.monotonic() + stall_timeout
    while count > 0:
        if stop.is_set():
            raise ConnectionResetError("response abandoned")
        try:
            sent = os.sendfile(sock, fd, offset, min(count, _SLICE))
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stalled(f"client took no bytes for {stall_timeout}s") from None
            for _, events in poller.poll(min(_POLL_MS, left * 1000)):
                if events & _BAD and not events & select.POLLOUT:
                    raise ConnectionResetError("connection lost") from None
            continue
        if sent == 0:
            raise OSError("file shorter than its announced size")
        offset += sent
        count -= sent
        deadline = time.monotonic() + stall_timeout
