"""Both ways a blob body leaves a file for a client's socket, and the choice between them."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.http import filesend
from storage import directio
from storage.errors import SpoolAborted
from storage.progress import SpoolFollower, SpoolProgress


@pytest.mark.parametrize(
    ("local", "peer", "expected"),
    [
        (("127.0.0.1", 5000), ("127.0.0.1", 40000), True),
        (("127.0.0.1", 5000), ("127.0.0.53", 40000), True),
        (("::1", 5000, 0, 0), ("::1", 40000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), ("::ffff:127.0.0.1", 40000, 0, 0), True),
        (("10.0.0.5", 5000), ("10.0.0.5", 40000), True),  # this host through its own address
        (("10.0.0.5", 5000), ("10.0.0.6", 40000), False),
        (("::ffff:10.0.0.5", 5000, 0, 0), ("::ffff:10.0.0.9", 40000, 0, 0), False),
        (("fd00::1", 5000, 0, 0), ("fd00::2", 40000, 0, 0), False),
        ("/run/regcache.sock", "", False),
        (None, None, False),  # a transport that did not record them
    ],
)
def test_same_host(local, peer, expected) -> None:  # type: ignore[no-untyped-def]
    assert filesend.same_host(local, peer) is expected


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    accepted.setblocking(False)  # as asyncio leaves a transport's socket
    return accepted, client


def _read_all(sock: socket.socket, into: bytearray, slow: bool) -> None:
    while chunk := sock.recv(4096 if slow else 1 << 20):
        into += chunk
        if slow:
            threading.Event().wait(0.0005)


class FileBody:
    """A remote store's body (``BlobBackend.open_body``) played from a file, in small reads."""

    def __init__(self, fd: int, offset: int, size: int, fail_after: int | None = None) -> None:
        self.fd, self.offset, self.size, self.fail_after = fd, offset, size, fail_after
        self.closed = 0

    def readinto(self, buffer: memoryview) -> int:
        if self.fail_after is not None and self.offset >= self.fail_after:
            raise OSError("the store broke off")
        got = os.preadv(self.fd, [buffer[: 100_000]], self.offset)
        self.offset += got
        return got

    def close(self) -> None:
        self.closed += 1


def _relay_file(sock: int, fd: int, offset: int, count: int, stall: float, stop: threading.Event) -> None:
    filesend._relay_blocking(sock, FileBody(fd, offset, count), count, stall, stop)


def _copy_direct(sock: int, fd: int, offset: int, count: int, stall: float, stop: threading.Event) -> None:
    """The same file read around the page cache, as a fill's spool written that way is."""
    direct = directio.open_direct(f"/proc/self/fd/{fd}", os.O_RDONLY)
    assert direct is not None, "the test filesystem has no direct I/O"
    try:
        filesend._copy_direct_blocking(sock, direct, offset, count, stall, stop)
    finally:
        os.close(direct)


SENDERS = [filesend._sendfile_blocking, filesend._copy_blocking, _relay_file, _copy_direct]


@pytest.mark.parametrize("send", SENDERS)
@pytest.mark.parametrize("slow", [False, True], ids=["fast-reader", "slow-reader"])
def test_a_range_arrives_whole(tmp_path: Path, send, slow: bool) -> None:  # type: ignore[no-untyped-def]
    # Several MiB against a small socket buffer: every slice boundary and every
    # would-block wait is crossed.
    body = os.urandom(5 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(body)
    server, client = _connected_pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    received = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, received, slow))
    reader.start()
    fd = os.open(path, os.O_RDONLY)
    try:
        send(server.fileno(), fd, 3, len(body) - 3, 10, threading.Event())
    finally:
        os.close(fd)
        server.close()
    reader.join(timeout=30)
    client.close()
    assert bytes(received) == body[3:]


@contextlib.contextmanager
def _blob_and_connection(tmp_path: Path, body: bytes) -> Iterator[tuple[socket.socket, int]]:
    """A file holding ``body`` (its descriptor) and the server end of a connection nobody reads."""
    path = tmp_path / "blob"
    path.write_bytes(body)
    server, client = _connected_pair()
    fd = os.open(path, os.O_RDONLY)
    try:
        yield server, fd
    finally:
        os.close(fd)
        server.close()
        client.close()


@pytest.mark.parametrize("send", SENDERS)
def test_a_client_that_takes_nothing_is_stalled(tmp_path: Path, send) -> None:  # type: ignore[no-untyped-def]
    blob = _blob_and_connection(tmp_path, os.urandom(16 * 1024 * 1024))
    with blob as (server, fd), pytest.raises(filesend.Stalled):
        send(server.fileno(), fd, 0, 16 * 1024 * 1024, 0.3, threading.Event())


@pytest.mark.parametrize("send", SENDERS)
def test_a_file_shorter_than_announced_is_an_error(tmp_path: Path, send) -> None:  # type: ignore[no-untyped-def]
    blob = _blob_and_connection(tmp_path, b"x" * 1000)
    with blob as (server, fd), pytest.raises(OSError, match="shorter"):
        send(server.fileno(), fd, 0, 2000, 5, threading.Event())


@pytest.mark.parametrize("send", SENDERS)
def test_an_abandoned_response_stops(tmp_path: Path, send) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    blob = _blob_and_connection(tmp_path, os.urandom(16 * 1024 * 1024))
    with blob as (server, fd), pytest.raises(ConnectionResetError, match="abandoned"):
        send(server.fileno(), fd, 0, 16 * 1024 * 1024, 30, stop)


@pytest.mark.parametrize("fail_after", [None, 3 * 1024 * 1024], ids=["whole", "store-breaks-off"])
def test_a_relayed_body_is_closed_whatever_happens(tmp_path: Path, fail_after: int | None) -> None:
    # Its connection goes back to the store's pool or away: a relay never leaves it open.
    data = os.urandom(5 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server, client = _connected_pair()
    received = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, received, False))
    reader.start()
    fd = os.open(path, os.O_RDONLY)
    body = FileBody(fd, 0, len(data), fail_after)
    try:
        with pytest.raises(OSError, match="broke off") if fail_after else contextlib.nullcontext():
            filesend._relay_blocking(server.fileno(), body, len(data), 10, threading.Event())
    finally:
        os.close(fd)
        server.close()
        reader.join(timeout=30)
        client.close()
    assert body.closed == 1
    assert bytes(received) == (data if fail_after is None else data[: len(received)])
    assert fail_after is None or len(received) < len(data)


@pytest.mark.parametrize(("peer", "copies"), [(("127.0.0.1", 40000), True), (("192.0.2.7", 40000), False)])
def test_the_sender_picks_its_way_from_the_connection_s_addresses(peer, copies: bool) -> None:  # type: ignore[no-untyped-def]
    server, client = _connected_pair()

    class Transport:  # what FileSender reads of an asyncio transport
        def get_extra_info(self, name: str):  # type: ignore[no-untyped-def]
            return {"socket": server, "sockname": ("127.0.0.1", 5000), "peername": peer}[name]

    try:
        sender = filesend.FileSender(Transport())  # type: ignore[arg-type]
        assert sender._copy is copies
        sender.close()
    finally:
        server.close()
        client.close()


class GrowingSpool:
    """A spool file written in batches on a thread of its own, each told to its progress."""

    def __init__(self, path: Path, body: bytes, direct: bool = False) -> None:
        self.body = body
        path.write_bytes(b"")
        self.fd = os.open(path, os.O_RDWR)
        self.direct_fd = directio.open_direct(str(path), os.O_RDONLY) if direct else None
        assert not direct or self.direct_fd is not None, "the test filesystem has no direct I/O"
        self.progress = SpoolProgress()
        self.follower = SpoolFollower(self.fd, self.progress, self.direct_fd, lambda: direct)

    def write(self, start: int, end: int, pause: float = 0.0) -> None:
        for offset in range(start, end, 1024 * 1024):
            threading.Event().wait(pause)
            chunk = self.body[offset:min(end, offset + 1024 * 1024)]
            os.pwrite(self.fd, chunk, offset)
            self.progress.reach(offset + len(chunk))

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)


def _follow(spool: GrowingSpool, sock: socket.socket, count: int, stall: float = 10,
            stop: threading.Event | None = None) -> None:
    fd = os.dup(spool.fd)
    direct_fd = None if spool.direct_fd is None else os.dup(spool.direct_fd)
    try:
        filesend._follow_blocking(sock.fileno(), fd, direct_fd, spool.follower, count, stall,
                                  stop or threading.Event())
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)


FOLLOWS = [pytest.param(False, id="sendfile"), pytest.param(True, id="direct")]


@pytest.mark.parametrize("direct", FOLLOWS)
def test_a_spool_is_sent_as_it_lands_and_its_last_byte_once_verified(tmp_path: Path, direct: bool) -> None:
    body = os.urandom(5 * 1024 * 1024 + 17)
    spool = GrowingSpool(tmp_path / "spool", body, direct)
    server, client = _connected_pair()
    received = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, received, False))
    reader.start()
    sender = threading.Thread(target=_follow, args=(spool, server, len(body)))
    sender.start()
    try:
        spool.write(0, len(body), pause=0.01)
        for _ in range(500):  # every landed byte but the last goes out before the digest is known
            if len(received) == len(body) - 1:
                break
            threading.Event().wait(0.01)
        assert len(received) == len(body) - 1
        assert sender.is_alive(), "the last byte waits for the digest"
        spool.progress.verify()
        sender.join(timeout=30)
        assert not sender.is_alive()
    finally:
        spool.progress.abort()
        server.close()
        reader.join(timeout=30)
        client.close()
        spool.close()
    assert bytes(received) == body


@pytest.mark.parametrize("direct", FOLLOWS)
def test_a_failed_fill_fails_its_follower(tmp_path: Path, direct: bool) -> None:
    body = os.urandom(3 * 1024 * 1024)
    spool = GrowingSpool(tmp_path / "spool", body, direct)
    server, client = _connected_pair()
    reader = threading.Thread(target=_read_all, args=(client, bytearray(), False))
    reader.start()
    spool.write(0, 2 * 1024 * 1024)
    threading.Timer(0.1, spool.progress.abort).start()
    try:
        with pytest.raises(SpoolAborted):
            _follow(spool, server, len(body))
    finally:
        server.close()
        reader.join(timeout=30)
        client.close()
        spool.close()


def test_a_verified_spool_shorter_than_announced_is_an_error(tmp_path: Path) -> None:
    spool = GrowingSpool(tmp_path / "spool", b"x" * 1000)
    spool.write(0, 1000)
    spool.progress.verify()
    server, client = _connected_pair()
    try:
        with pytest.raises(OSError, match="shorter"):
            _follow(spool, server, 2000)
    finally:
        server.close()
        client.close()
        spool.close()


def test_waiting_for_the_upstream_is_not_a_stall_but_an_abandoned_response_stops(tmp_path: Path) -> None:
    body = os.urandom(1024 * 1024)
    spool = GrowingSpool(tmp_path / "spool", body)
    idle = GrowingSpool(tmp_path / "idle", b"x" * 1000)
    server, client = _connected_pair()
    received = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, received, False))
    reader.start()
    try:
        # Bytes that take longer to arrive than the stall timeout: the client is not to blame.
        threading.Timer(0.6, spool.write, args=(0, len(body))).start()
        threading.Timer(0.7, spool.progress.verify).start()
        _follow(spool, server, len(body), stall=0.2)
        # A response given up while its follower waits for bytes that never come.
        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        with pytest.raises(ConnectionResetError, match="abandoned"):
            _follow(idle, server, 1000, stop=stop)
    finally:
        server.close()
        reader.join(timeout=30)
        client.close()
        spool.close()
        idle.close()
    assert bytes(received) == body
