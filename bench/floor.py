"""The least a verifying cache does on its client's path, as a process of its own.

A relay of blob GETs with only the work that every cache keeping regcache's
guarantees must do before its client has the last byte: receive the upstream's
body, sha256 every byte, write it to a spool file, send it to the client, and
send the last byte only once the digest matches. The fsync and the rename into
place come after, off the client's path, as in regcache. There is no framework,
no index, no access log, no followers and no ranges: the receiving thread fills a
ring of reused buffers and three threads take each one at once (hash, write,
send), so the relay runs at the pace of its slowest stage, on as many cores as
there are stages. The bench measures it beside regcache and the distribution
proxy: what it reaches is the bound of the design on this machine, whatever the
code around it costs.

    python -m bench.floor --listen 127.0.0.1:PORT --upstream http://HOST:PORT --spool DIR [--direct]

``--direct`` writes the spool around the page cache (``O_DIRECT``), as regcache's
``storage.direct_io`` does. ``--send-from spool`` sends each batch only once it is
written, from the spool file, as regcache does (``sendfile``, or with ``--direct``
4 MiB reads around the page cache copied to the socket), rather than from the
receive buffers: the two side by side measure what that choice costs.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import mmap
import os
import queue
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

BUFFER_BYTES = 4 * 1024 * 1024
BUFFERS = 8
PAGE = mmap.PAGESIZE


class Ring:
    """Page-aligned buffers, each free again once every stage has taken it."""

    def __init__(self, stages: int) -> None:
        self.buffers = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(BUFFERS)]
        self.stages = stages
        self._pending = [0] * BUFFERS
        self._changed = threading.Condition()

    def claim(self, slot: int) -> memoryview:
        with self._changed:
            self._changed.wait_for(lambda: self._pending[slot] == 0)
            self._pending[slot] = self.stages
        return memoryview(self.buffers[slot])

    def done(self, slot: int) -> None:
        with self._changed:
            self._pending[slot] -= 1
            self._changed.notify_all()


class Stage(threading.Thread):
    """One consumer of the ring: runs ``step(buffer, offset)`` on each batch, in order."""

    def __init__(self, ring: Ring, step: Callable[[memoryview, int], None]) -> None:
        super().__init__(daemon=True)
        self.ring, self.step = ring, step
        self.batches: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()  # None ends
        self.error: BaseException | None = None

    def put(self, batch: tuple[int, int, int] | None) -> None:
        self.batches.put(batch)

    def run(self) -> None:
        while (batch := self.batches.get()) is not None:
            slot, offset, length = batch
            try:
                if self.error is None:
                    self.step(memoryview(self.ring.buffers[slot])[:length], offset)
            except BaseException as exc:  # the handler raises it once the stages are done
                self.error = exc
            finally:
                self.ring.done(slot)


class Landed:
    """How far the spool is written: a sender that reads the spool follows it."""

    def __init__(self) -> None:
        self.offset = 0
        self.failed = False
        self._moved = threading.Condition()

    def reach(self, offset: int) -> None:
        with self._moved:
            self.offset = offset
            self._moved.notify_all()

    def fail(self) -> None:
        """Nothing more will land: a sender waiting for more stops."""
        with self._moved:
            self.failed = True
            self._moved.notify_all()

    def past(self, offset: int) -> int:
        with self._moved:
            self._moved.wait_for(lambda: self.offset > offset or self.failed)
            if self.offset <= offset:
                raise ConnectionError("the spool was not written")
            return self.offset


class SpoolSender(threading.Thread):
    """Sends what the writer has written, read back from the spool (``--send-from spool``)."""

    def __init__(self, client: socket.socket, spool: Path, size: int, landed: Landed, direct: bool,
                 last_byte: Callable[[bytes], None]) -> None:
        super().__init__(daemon=True)
        self.client, self.spool, self.size, self.landed = client, spool, size, landed
        self.direct, self.last_byte = direct, last_byte
        self.error: BaseException | None = None

    def put(self, batch: tuple[int, int, int] | None) -> None:
        """It follows the writer, not the ring."""

    def run(self) -> None:
        fd = os.open(self.spool, os.O_RDONLY)
        direct = os.open(self.spool, os.O_RDONLY | os.O_DIRECT) if self.direct else None
        buffer = mmap.mmap(-1, BUFFER_BYTES) if direct is not None else None
        try:
            sent, body = 0, self.size - 1  # the last byte waits for the digest
            while sent < body:
                end = min(self.landed.past(sent), body)
                while sent < end:
                    if direct is None or buffer is None:
                        count = os.sendfile(self.client.fileno(), fd, sent, end - sent)
                        if not count:
                            raise ConnectionError("the spool is shorter than written")
                        sent += count
                        continue
                    want = min(BUFFER_BYTES, end - sent)
                    if want == BUFFER_BYTES:  # a whole buffer, written around the page cache
                        data: memoryview | bytes = memoryview(buffer)[:os.preadv(direct, [buffer], sent)]
                    else:  # short of a whole buffer: the blob's end, read through the page cache
                        data = os.pread(fd, want, sent)
                    if not data:
                        raise ConnectionError("the spool is shorter than written")
                    self.client.sendall(data)
                    sent += len(data)
            self.last_byte(os.pread(fd, 1, body))
        except BaseException as exc:  # the handler raises it once the stages are done
            self.error = exc
        finally:
            os.close(fd)
            if direct is not None:
                os.close(direct)


class Relay(socketserver.StreamRequestHandler):
    server: Server

    def handle(self) -> None:
        request = self.rfile.readline().decode("latin-1").split()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        path = request[1] if len(request) > 1 else "/"
        if "/blobs/sha256:" not in path:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            return
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port, timeout=60)
        try:
            upstream.request("GET", path)
            response = upstream.getresponse()
            if response.status != 200 or response.length is None:
                self.wfile.write(f"HTTP/1.1 {response.status} upstream\r\nContent-Length: 0\r\n"
                                 "Connection: close\r\n\r\n".encode())
                return
            self.relay(response, response.length, path.rsplit("/", 1)[1])
        finally:
            upstream.close()

    def relay(self, body: http.client.HTTPResponse, size: int, digest: str) -> None:
        spool = self.server.spool / f"{digest}.{threading.get_ident()}"
        fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        direct = _open_direct(spool) if self.server.direct else None
        hasher = hashlib.sha256()
        verified = threading.Event()
        client = self.connection
        client.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\n"
                       f"Docker-Content-Digest: {digest}\r\nConnection: close\r\n\r\n".encode())

        def write(data: memoryview, offset: int) -> None:
            aligned = len(data) - len(data) % PAGE if direct is not None else 0
            if aligned:
                os.pwrite(direct, data[:aligned], offset)
            if aligned < len(data):
                os.pwrite(fd, data[aligned:], offset + aligned)

        def last_byte(byte: memoryview | bytes) -> None:
            verified.wait()
            if "sha256:" + hasher.hexdigest() != digest:
                raise ValueError("digest mismatch")
            client.sendall(byte)

        def send(data: memoryview, offset: int) -> None:
            if offset + len(data) < size:
                client.sendall(data)
                return
            client.sendall(data[:-1])  # the last byte waits for the digest
            last_byte(data[-1:])

        landed = Landed()

        def write_landed(data: memoryview, offset: int) -> None:
            try:
                write(data, offset)
            except BaseException:
                landed.fail()
                raise
            landed.reach(offset + len(data))

        ring = Ring(2 if self.server.from_spool else 3)
        stages = [Stage(ring, lambda data, _: hasher.update(data))]
        if self.server.from_spool:
            sender = SpoolSender(client, spool, size, landed, direct is not None, last_byte)
            stages.append(Stage(ring, write_landed))
            stages.append(sender)
        else:
            stages += [Stage(ring, write), Stage(ring, send)]
        for stage in stages:
            stage.start()
        try:
            try:
                offset, slot = 0, 0
                while offset < size:
                    buffer = ring.claim(slot)
                    length = _fill(body, buffer[:min(BUFFER_BYTES, size - offset)])
                    if not length:
                        raise ConnectionError("upstream body ended early")
                    for stage in stages:
                        stage.put((slot, offset, length))
                    offset += length
                    slot = (slot + 1) % BUFFERS
            finally:
                # Every stage done with the spool before it is closed, whatever happened.
                for stage in stages:
                    stage.put(None)
                stages[0].join()
                verified.set()  # the hash is whole, or will never be
                stages[1].join()
                landed.fail()  # a spool sender still waiting: nothing more lands
                stages[2].join()
            failed = next((stage.error for stage in stages if stage.error is not None), None)
            if failed is not None:
                raise failed
            # The client has every byte; the commit is off its path.
            os.fsync(direct if direct is not None else fd)
            os.replace(spool, self.server.spool / digest)
        finally:
            os.close(fd)
            if direct is not None:
                os.close(direct)
            spool.unlink(missing_ok=True)


def _fill(body: http.client.HTTPResponse, buffer: memoryview) -> int:
    got = 0
    while got < len(buffer):
        count = body.readinto(buffer[got:])
        if not count:
            break
        got += count
    return got


def _open_direct(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_DIRECT)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], upstream: str, spool: Path, direct: bool, from_spool: bool) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.spool, self.direct, self.from_spool = spool, direct, from_spool
        super().__init__(listen, Relay)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the registry's base URL (plain HTTP)")
    parser.add_argument("--spool", type=Path, required=True, help="where blobs are written")
    parser.add_argument("--direct", action="store_true", help="write the spool with O_DIRECT")
    parser.add_argument("--send-from", choices=("memory", "spool"), default="memory",
                        help="send the receive buffers, or what the writer wrote, read back from the spool")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    args.spool.mkdir(parents=True, exist_ok=True)
    with Server((host, int(port)), args.upstream, args.spool, args.direct, args.send_from == "spool") as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
