"""proxy.upstream.transport against servers run in this process on loopback (``tests.support.origins``).

Every blocking call of the transport runs on a thread, as it does in production;
waits carry generous timeouts only so a broken transport fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TypeVar

import pytest
import trustme
from yarl import URL

from proxy.upstream.transport import DRAIN_LIMIT, Answer, Connections
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
    silent_body,
)

T = TypeVar("T")


@pytest.fixture
async def connections():
    # The read timeout outlasts GUARD: a read that ends only by timing out fails the test.
    pool = Connections(connect_timeout=5.0, read_timeout=3 * GUARD)
    yield pool
    pool.close()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def get(pool: Connections, url: URL, tls: ssl.SSLContext | bool = True) -> Answer:
    return await guarded(pool.fetch("GET", url, {"User-Agent": "test"}, tls))


async def blocking(function: Callable[..., T], *args: object) -> T:
    return await guarded(asyncio.to_thread(function, *args))


async def read_all(answer: Answer, size: int = 64 * 1024) -> bytes:
    def read() -> bytes:
        out = bytearray()
        buffer = memoryview(bytearray(size))
        while count := answer.readinto(buffer):
            out += buffer[:count]
        return bytes(out)

    return await blocking(read)


async def test_two_gets_in_a_row_share_one_connection(origin, connections):
    for _ in range(2):
        answer = await get(connections, origin.url / "blob" / "5000")
        assert answer.status == 200
        assert answer.content_length == 5000
        assert await read_all(answer) == BODY[:5000]
        await blocking(answer.release)
    assert len(origin.peers) == 2
    assert origin.connections == 1


async def test_an_unread_big_body_is_closed_and_a_read_one_pooled(origin, connections):
    unread = await get(connections, origin.url / "blob" / str(len(BODY)))
    assert unread.content_length == len(BODY) > DRAIN_LIMIT
    await blocking(unread.release)

    read = await get(connections, origin.url / "blob" / str(len(BODY)))
    assert await read_all(read) == BODY
    await blocking(read.release)
    assert origin.connections == 2  # the unread body's connection was not reused

    again = await get(connections, origin.url / "blob" / "10")
    assert await read_all(again) == BODY[:10]
    await blocking(again.release)
    assert len(origin.peers) == 3
    assert origin.connections == 2  # the read one was
    assert origin.peers[2] == origin.peers[1]


async def test_a_short_unread_rest_is_drained_and_the_connection_pooled(origin, connections):
    answer = await get(connections, origin.url / "blob" / str(DRAIN_LIMIT))
    buffer = memoryview(bytearray(1000))
    assert await blocking(answer.readinto, buffer) == 1000
    answer.release()  # DRAIN_LIMIT - 1000 bytes left: read on a pool thread, not closed
    await guarded(until(lambda: connections.idle() == 1))

    answer = await get(connections, origin.url / "blob" / "10")
    assert await read_all(answer) == BODY[:10]
    await blocking(answer.release)
    assert origin.connections == 1


async def test_readinto_fills_the_buffer_and_returns_0_at_the_end(origin, connections):
    answer = await get(connections, origin.url / "pieces")
    assert answer.content_length == len(BODY)
    size = 64 * 1024
    buffer = memoryview(bytearray(size))
    counts, out = [], bytearray()
    while count := await blocking(answer.readinto, buffer):
        counts.append(count)
        out += buffer[:count]
    assert bytes(out) == BODY
    # The server wrote pieces of 100_003 bytes: each read still fills the buffer.
    assert counts[:-1] == [size] * (len(counts) - 1)
    assert counts[-1] == len(BODY) - size * (len(counts) - 1)
    assert await blocking(answer.readinto, buffer) == 0  # and stays at the end
    await blocking(answer.release)


async def test_a_chunked_body_is_read_to_its_end_and_the_connection_pooled(origin, connections):
    answer = await get(connections, origin.url / "chunked")
    assert answer.headers["Transfer-Encoding"].lower() == "chunked"
    assert answer.content_length is None
    assert await read_all(answer, 100_000) == BODY
    await blocking(answer.release)

    answer = await get(connections, origin.url / "blob" / "10")
    assert await read_all(answer) == BODY[:10]
    await blocking(answer.release)
    assert origin.connections == 1


async def test_https_through_the_given_tls_context(aiohttp_server, connections):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    origin = Origin()
    server = await aiohttp_server(origin.app(), ssl=server_context)
    url = server.make_url("/blob/" + str(len(BODY)))
    assert url.scheme == "https"

    for _ in range(2):
        answer = await get(connections, url, client_context)
        assert answer.status == 200
        assert await read_all(answer) == BODY
        await blocking(answer.release)
    assert origin.connections == 1

    # The system's trust store does not know the throwaway CA: the context given is the one used.
    with pytest.raises(ssl.SSLCertVerificationError):
        await get(connections, url, True)


# --------------------------------------------------------------------------- misbehaving servers


async def test_a_pooled_connection_the_server_closed_is_replaced(connections):
    async with RawServer(answer_once) as server:
        answer = await get(connections, server.url)
        assert await read_all(answer) == b"hello"
        await blocking(answer.release)  # kept alive as far as the client knows
        await guarded(server.closed.wait())

        answer = await get(connections, server.url)
        assert answer.status == 200
        assert await read_all(answer) == b"hello"
        await blocking(answer.release)
        assert server.connections == 2
        assert len(server.requests) == 2


async def test_a_new_connection_closed_before_an_answer_is_an_error_not_a_retry(connections):
    async with RawServer(hang_up) as server:
        with pytest.raises(ConnectionError):
            await get(connections, server.url)
        assert server.connections == 1


async def test_a_body_shorter_than_its_content_length_is_a_connection_error(connections):
    async with RawServer(cut_short) as server:
        answer = await get(connections, server.url)
        assert answer.content_length == 1000
        buffer = memoryview(bytearray(4096))
        assert await blocking(answer.readinto, buffer) == 300
        with pytest.raises(ConnectionError, match="700 bytes short"):
            await blocking(answer.readinto, buffer)
        with pytest.raises(ConnectionError):  # and stays short, not over
            await blocking(answer.readinto, buffer)
        await blocking(answer.release)


async def test_a_chunked_body_cut_short_is_a_connection_error(connections):
    async with RawServer(chunk_cut_short) as server:
        answer = await get(connections, server.url)
        with pytest.raises(ConnectionError):
            await read_all(answer, 4096)
        await blocking(answer.release)


async def test_a_silent_body_times_out_after_the_read_timeout():
    pool = Connections(connect_timeout=GUARD, read_timeout=0.3)
    try:
        async with RawServer(silent_body) as server:
            answer = await get(pool, server.url)
            buffer = memoryview(bytearray(100))
            assert await blocking(answer.readinto, buffer) == 100
            with pytest.raises(TimeoutError):
                await blocking(answer.readinto, buffer)
            await blocking(answer.release)  # not worth keeping: closed
            await guarded(server.peer_closed.wait())
    finally:
        pool.close()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_interrupt_from_the_loop_ends_a_read_blocked_on_a_silent_body(tls, connections):
    async with RawServer(silent_body) as server:
        url, context = server.url, True
        if tls:  # the same handler on a second, TLS, listener: shutting down an SSL socket differs
            ca = trustme.CA()
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(server_context)
            context = ssl.create_default_context()
            ca.configure_trust(context)
            tls_server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_context)
            url = url.with_scheme("https").with_port(tls_server.sockets[0].getsockname()[1])
        try:
            answer = await get(connections, url, context)
            buffer = memoryview(bytearray(4096))
            assert await blocking(answer.readinto, buffer[:100]) == 100
            reading = asyncio.create_task(asyncio.to_thread(answer.readinto, buffer))
            await asyncio.sleep(0.05)  # most likely blocked in the read by now; either way it must end
            answer.interrupt()
            try:
                count = await guarded(reading)
            except ConnectionError:
                pass
            else:
                assert count == 0
            await blocking(answer.release)
            await guarded(server.peer_closed.wait())
        finally:
            if tls:
                tls_server.close()
