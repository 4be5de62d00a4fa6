"""The bench's bare verifying relay keeps the guarantee it stands for.

``bench/floor.py`` is the anchor that says what a verifying cache can reach on
this machine; an anchor that skipped the digest check or sent the last byte
early would flatter itself. Here it relays from a plain HTTP upstream in this
process: every byte arrives and lands in the spool when the digest matches, and
the client never gets the last byte when it does not.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import floor
from tests.support.registry import HOST

BODY = os.urandom(3 * floor.BUFFER_BYTES + 12345)  # whole buffers and a tail
RIGHT = "sha256:" + hashlib.sha256(BODY).hexdigest()
WRONG = "sha256:" + "1" * 64


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serving(server: http.server.HTTPServer | floor.Server) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def upstream() -> Iterator[int]:
    yield from _serving(http.server.ThreadingHTTPServer((HOST, 0), Upstream))


@pytest.fixture(params=[(False, False), (False, True), (True, False), (True, True)],
                ids=["memory", "spool", "memory-direct", "spool-direct"])
def relay(request: pytest.FixtureRequest, upstream: int, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    direct, from_spool = request.param
    server = floor.Server((HOST, 0), f"http://{HOST}:{upstream}", tmp_path, direct, from_spool)
    for port in _serving(server):
        yield port, tmp_path


def _get(port: int, digest: str) -> tuple[int, bytes, bool]:
    """Status, the bytes received, and whether the body was complete."""
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", f"/v2/some/image/blobs/{digest}")
        response = connection.getresponse()
        try:
            return response.status, response.read(), True
        except http.client.IncompleteRead as cut:
            return response.status, cut.partial, False
    finally:
        connection.close()


def test_a_matching_body_reaches_the_client_whole_and_is_committed(relay):
    port, spool = relay
    status, body, complete = _get(port, RIGHT)
    assert (status, complete) == (200, True)
    assert body == BODY
    committed = spool / RIGHT
    for _ in range(100):  # the commit follows the client's last byte
        if committed.exists():
            break
        time.sleep(0.05)
    assert committed.read_bytes() == BODY


def test_a_body_that_does_not_match_its_digest_never_gets_its_last_byte(relay):
    port, spool = relay
    status, body, complete = _get(port, WRONG)
    assert status == 200 and not complete
    assert body == BODY[:-1]
    assert not (spool / WRONG).exists()
