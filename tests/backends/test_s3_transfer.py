"""Blob bodies on worker threads (storage/backends/s3/transfer.py) against a scripted store.

The happy paths run against the real RGW in the conformance suite; here an HTTP/1.1 server in the
test process answers what each test scripts (a 503 first, an S3 error, a body cut short) and
counts connections, to prove retries, error mapping and connection reuse.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage.backends.s3 import transfer
from storage.backends.s3.transfer import Transfers
from storage.errors import StoreObjectUnknown, StoreRejected, StoreUnavailable
from tests.support.daemons import closed_port

PART = os.urandom(3 * 1024 * 1024 + 17)
NO_SUCH_UPLOAD = b"<?xml version='1.0'?><Error><Code>NoSuchUpload</Code></Error>"


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # send only this many body bytes, then close


@dataclass
class Store:
    url: str
    answers: list[Answer]
    received: list[tuple[str, str, bytes]] = field(default_factory=list)  # method, path, body
    connections: int = 0


@pytest.fixture
def store() -> Iterator[Store]:
    scripted = Store("", [])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            scripted.connections += 1

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            scripted.received.append((self.command, self.path, self.rfile.read(length)))
            answer = scripted.answers.pop(0) if scripted.answers else Answer()
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if answer.cut_after is None:
                self.wfile.write(answer.body)
                return
            self.wfile.write(answer.body[: answer.cut_after])
            self.close_connection = True

        do_GET = do_PUT = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scripted.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield scripted
    server.shutdown()
    server.server_close()


@pytest.fixture
def transfers() -> Iterator[Transfers]:
    made = Transfers(None, connect_timeout=2, read_timeout=5)
    yield made
    made.close()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "spool"
    path.write_bytes(b"head" + PART + b"tail")
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def read_all(body: transfer.StoreBody) -> bytes:
    out = bytearray()
    buffer = memoryview(bytearray(64 * 1024))
    while got := body.readinto(buffer):
        out += buffer[:got]
    return bytes(out)


@pytest.mark.parametrize("path", ["copy", "sendfile"])
def test_a_part_goes_whole_from_its_file_range_and_its_etag_comes_back(store, transfers, spool, monkeypatch, path):
    # A store on this host gets copies; one on another host, sendfile(2): both must send the same bytes.
    monkeypatch.setattr(transfer, "_loopback", lambda sock: path == "copy")
    store.answers = [Answer(headers={"ETag": '"abc"'})]
    etag = transfers.put_part(f"{store.url}/bucket/key?partNumber=1&X-Amz-Signature=s", spool, 4, len(PART), "key")
    assert etag == '"abc"'
    assert store.received == [("PUT", "/bucket/key?partNumber=1&X-Amz-Signature=s", PART)]


def test_a_part_the_store_answers_503_is_sent_again(store, transfers, spool):
    store.answers = [Answer(503, b"<Error><Code>SlowDown</Code></Error>"), Answer(headers={"ETag": '"e"'})]
    assert transfers.put_part(f"{store.url}/b/k?x=1", spool, 4, len(PART), "k") == '"e"'
    assert [body for _, _, body in store.received] == [PART, PART]


def test_a_part_of_an_upload_aborted_meanwhile_is_store_object_unknown_at_once(store, transfers, spool):
    store.answers = [Answer(404, NO_SUCH_UPLOAD)]
    with pytest.raises(StoreObjectUnknown):
        transfers.put_part(f"{store.url}/b/k?x=1", spool, 4, len(PART), "k")
    assert len(store.received) == 1  # not an error a retry mends


def test_a_request_the_store_rejects_is_store_rejected(store, transfers):
    store.answers = [Answer(400, b"<Error><Code>InvalidArgument</Code></Error>")]
    with pytest.raises(StoreRejected):
        transfers.get(f"{store.url}/b/k?x=1", "k")


def test_a_body_the_store_cuts_short_raises_instead_of_ending(store, transfers):
    store.answers = [Answer(body=b"x" * 100_000, cut_after=40_000)]
    body = transfers.get(f"{store.url}/b/k?x=1", "k")
    assert body.size == 100_000
    with pytest.raises(StoreUnavailable, match="broke off"):
        read_all(body)
    body.close()


def test_a_connection_is_reused_only_after_its_body_was_read_to_the_end(store, transfers):
    data = os.urandom(300_000)
    store.answers = [Answer(body=data) for _ in range(4)]
    url = f"{store.url}/b/k?x=1"
    for _ in range(2):
        body = transfers.get(url, "k")
        assert read_all(body) == data
        body.close()
    assert store.connections == 1
    half = transfers.get(url, "k")
    half.readinto(memoryview(bytearray(10)))
    half.close()  # the rest of its body is still on that connection: it must not serve the next GET
    body = transfers.get(url, "k")
    assert read_all(body) == data
    body.close()
    assert store.connections == 2


def test_a_store_nobody_listens_on_is_unavailable(transfers, spool):
    url = f"http://127.0.0.1:{closed_port()}/b/k?x=1"
    calls: list[Callable[[], object]] = [
        lambda: transfers.get(url, "k"),
        lambda: transfers.put_part(url, spool, 0, 10, "k"),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            call()
