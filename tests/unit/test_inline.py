"""proxy.upstream.inline against servers run in this process on loopback (``tests.support.origins``).

Waits carry generous timeouts only so that a broken transport fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme
from yarl import URL

from proxy.upstream.inline import DRAIN_LIMIT, HEAD_LIMIT, LoopAnswer, LoopConnections
from tests.support.origins import (
    BODY,
    GUARD,
    Origin,
    RawServer,
    answer_once,
    chunk_cut_short,
    cut_short,
    guarded,
    hang_up,
    head,
    silent_body,
)


@pytest.fixture
async def connections():
    # The read timeout outlasts GUARD: a read that ends only by timing out fails the test.
    pool = LoopConnections(connect_timeout=5.0, read_timeout=3 * GUARD)
    yield pool
    pool.close()


async def get(pool: LoopConnections, url: URL, tls: ssl.SSLContext | bool = True,
              headers: dict[str, str] | None = None) -> LoopAnswer:
    return await guarded(pool.fetch("GET", url, headers or {"User-Agent": "test"}, tls))


async def read_all(answer: LoopAnswer) -> bytes:
    async def read() -> bytes:
        return b"".join([piece async for piece in answer.chunks()])

    return await guarded(read())


async def test_two_gets_in_a_row_share_one_connection(origin, connections):
    for _ in range(2):
        answer = await get(connections, origin.url / "blob" / "5000")
        assert answer.status == 200
        assert answer.content_length == 5000
        assert await read_all(answer) == BODY[:5000]
        answer.release()
    assert origin.connections == 1
    assert connections.idle() == 1


@pytest.mark.parametrize("path", ["pieces", "chunked"])
async def test_a_body_in_pieces_or_chunks_is_read_whole_and_the_connection_pooled(origin, connections, path):
    for _ in range(2):
        answer = await get(connections, origin.url / path)
        assert await read_all(answer) == BODY
        answer.release()
    assert origin.connections == 1


async def test_an_unread_body_closes_its_connection(origin, connections):
    answer = await get(connections, origin.url / "blob" / "5000")
    answer.release()
    assert connections.idle() == 0
    answer = await get(connections, origin.url / "blob" / "5000")
    assert await read_all(answer) == BODY[:5000]
    answer.release()
    assert origin.connections == 2


async def test_a_body_read_to_its_length_is_pooled_without_asking_past_it(origin, connections):
    answer = await get(connections, origin.url / "blob" / "5000")
    pieces = answer.chunks()
    received = b""
    while len(received) < 5000:
        received += await guarded(anext(pieces))
    answer.release()  # the consumer knew the size and stopped there
    await pieces.aclose()
    assert connections.idle() == 1


async def test_https_through_the_given_tls_context(aiohttp_server, connections):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    origin = Origin()
    server = await aiohttp_server(origin.app(), ssl=server_context)
    url = server.make_url("/blob/" + str(100_000))
    assert url.scheme == "https"

    for _ in range(2):
        answer = await get(connections, url, client_context)
        assert await read_all(answer) == BODY[:100_000]
        answer.release()
    assert origin.connections == 1

    # The system's trust store does not know the throwaway CA: the context given is the one used.
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(connections, url, True)


async def test_a_header_that_would_split_the_request_is_refused_before_anything_is_sent(origin, connections):
    with pytest.raises(ValueError):
        await get(connections, origin.url / "blob" / "10", headers={"Authorization": "Bearer x\r\nX-Evil: 1"})
    assert origin.connections == 0


# --------------------------------------------------------------------------- misbehaving servers


async def test_a_pooled_connection_the_server_closed_is_replaced(connections):
    async with RawServer(answer_once) as server:
        answer = await get(connections, server.url)
        assert await read_all(answer) == b"hello"
        answer.release()  # kept alive as far as the client knows
        await guarded(server.closed.wait())
        await asyncio.sleep(0.05)  # the close reaches the client, or not yet: either way it must recover

        answer = await get(connections, server.url)
        assert await read_all(answer) == b"hello"
        answer.release()
        assert server.connections == 2
        assert len(server.requests) == 2


async def test_a_request_the_server_hangs_up_on_is_sent_again_on_a_new_connection(connections):
    """The race of a keep-alive timeout: the server closes the connection as the request arrives."""

    async def one_answer_per_connection(server, reader, writer):
        if await server.request(reader):
            writer.write(head(5) + b"hello")
            await writer.drain()
        await server.request(reader)  # and hang up without an answer

    async with RawServer(one_answer_per_connection) as server:
        for _ in range(2):
            answer = await get(connections, server.url)
            assert await read_all(answer) == b"hello"
            answer.release()
        assert server.connections == 2
        assert len(server.requests) == 3


async def test_a_new_connection_closed_before_an_answer_is_an_error_not_a_retry(connections):
    async with RawServer(hang_up) as server:
        with pytest.raises(ConnectionError):
            await get(connections, server.url)
        assert server.connections == 1


async def test_a_body_shorter_than_its_content_length_is_a_connection_error(connections):
    async with RawServer(cut_short) as server:
        answer = await get(connections, server.url)
        assert answer.content_length == 1000
        with pytest.raises(ConnectionError, match="700 bytes short"):
            await read_all(answer)
        answer.release()
        assert connections.idle() == 0


async def test_a_chunked_body_cut_short_is_a_connection_error(connections):
    async with RawServer(chunk_cut_short) as server:
        answer = await get(connections, server.url)
        with pytest.raises(ConnectionError):
            await read_all(answer)
        answer.release()


@pytest.mark.parametrize("size_line", [b"zz\r\n", b"-5\r\n"])
async def test_a_chunk_size_that_is_not_one_is_a_connection_error(connections, size_line):
    async def garbled(server, reader, writer):
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"xxxxx\r\n0\r\n\r\n")
        await writer.drain()
        await server.wait_for_eof(reader)

    async with RawServer(garbled) as server:
        answer = await get(connections, server.url)
        with pytest.raises(ConnectionError):
            await read_all(answer)
        answer.release()
        await guarded(server.peer_closed.wait())


async def test_a_silent_body_times_out_after_the_read_timeout_and_its_connection_is_closed():
    pool = LoopConnections(connect_timeout=GUARD, read_timeout=0.3)
    try:
        async with RawServer(silent_body) as server:
            answer = await get(pool, server.url)
            pieces = answer.chunks()
            assert await guarded(anext(pieces)) == b"x" * 100
            with pytest.raises(TimeoutError):
                await guarded(anext(pieces))
            answer.release()
            await guarded(server.peer_closed.wait())
    finally:
        pool.close()


async def test_a_silent_upstream_times_out_before_its_answer():
    async def silent(server, reader, writer):
        await server.request(reader)
        await server.wait_for_eof(reader)

    pool = LoopConnections(connect_timeout=GUARD, read_timeout=0.3)
    try:
        async with RawServer(silent) as server:
            with pytest.raises(TimeoutError):
                await get(pool, server.url)
            await guarded(server.peer_closed.wait())
    finally:
        pool.close()


async def test_a_redirects_short_body_is_read_so_its_connection_serves_the_next_request(connections):
    async def redirect_then_answer(server, reader, writer):
        await server.request(reader)
        note = b"<a href='/elsewhere'>moved</a>"
        writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\n"
                     + f"Content-Length: {len(note)}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.05)  # the body comes after the head: the client must wait for it
        writer.write(note)
        await writer.drain()
        if await server.request(reader):
            writer.write(head(5) + b"hello")
            await writer.drain()
        await server.wait_for_eof(reader)

    async with RawServer(redirect_then_answer) as server:
        answer = await get(connections, server.url)
        assert answer.status == 307
        assert answer.headers["Location"] == "/elsewhere"
        answer.release()
        answer = await get(connections, server.url.with_path("/elsewhere"))
        assert await read_all(answer) == b"hello"
        answer.release()
        assert server.connections == 1


async def test_a_long_error_body_is_not_read_and_its_connection_is_closed(connections):
    async def long_error(server, reader, writer):
        await server.request(reader)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\n" + f"Content-Length: {DRAIN_LIMIT + 1}\r\n\r\n".encode())
        await writer.drain()
        await server.wait_for_eof(reader)

    async with RawServer(long_error) as server:
        answer = await get(connections, server.url)
        assert answer.status == 500
        answer.release()
        await guarded(server.peer_closed.wait())


async def test_connection_close_and_http_1_0_bodies_end_with_the_connection(connections):
    async def until_close(server, reader, writer):
        await server.request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 70_000)
        await writer.drain()

    async def close_after(server, reader, writer):
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        await server.wait_for_eof(reader)

    async with RawServer(until_close) as server:
        answer = await get(connections, server.url)
        assert answer.content_length is None
        assert await read_all(answer) == b"y" * 70_000
        answer.release()
    async with RawServer(close_after) as server:
        answer = await get(connections, server.url)
        assert await read_all(answer) == b"hello"
        answer.release()
        await guarded(server.peer_closed.wait())
    assert connections.idle() == 0


@pytest.mark.parametrize("answer_head", [
    b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * HEAD_LIMIT + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
], ids=["too-large", "two-lengths", "not-a-length", "obs-fold", "not-http"])
async def test_an_answer_head_that_is_not_http_1_1_is_a_connection_error(connections, answer_head):
    async def odd(server, reader, writer):
        await server.request(reader)
        writer.write(answer_head + b"hello!")
        await writer.drain()
        await server.wait_for_eof(reader)

    async with RawServer(odd) as server:
        with pytest.raises(ConnectionError):
            await get(connections, server.url)
        await guarded(server.peer_closed.wait())
        assert connections.idle() == 0


async def test_informational_answers_are_skipped(connections):
    async def early_hints(server, reader, writer):
        await server.request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + head(5) + b"hello")
        await writer.drain()
        await server.wait_for_eof(reader)

    async with RawServer(early_hints) as server:
        answer = await get(connections, server.url)
        assert answer.status == 200
        assert await read_all(answer) == b"hello"
        answer.release()
