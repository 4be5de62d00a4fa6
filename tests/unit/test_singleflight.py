"""SingleFlight: one call per key at a time, its result or error shared by every caller."""

from __future__ import annotations

import asyncio

import pytest

from proxy.pull.singleflight import SingleFlight


async def test_concurrent_callers_share_one_call():
    flight: SingleFlight[str] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "manifest"

    waiters = [asyncio.create_task(flight.do("key", fetch)) for _ in range(5)]
    await asyncio.sleep(0)
    assert flight.running("key")
    release.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1
    assert [result for result, _ in results] == ["manifest"] * 5
    assert sorted(shared for _, shared in results) == [False, True, True, True, True]
    assert not flight.running("key")


async def test_different_keys_do_not_share():
    flight: SingleFlight[str] = SingleFlight()

    async def echo(value: str) -> str:
        await asyncio.sleep(0)
        return value

    a, b = await asyncio.gather(flight.do("a", lambda: echo("a")), flight.do("b", lambda: echo("b")))
    assert a == ("a", False) and b == ("b", False)


async def test_an_error_reaches_every_caller_and_the_next_call_starts_afresh():
    flight: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def failing() -> str:
        await release.wait()
        raise LookupError("upstream said no")

    waiters = [asyncio.create_task(flight.do("key", failing)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(outcome, LookupError) for outcome in outcomes)

    async def fine() -> str:
        return "ok"

    assert await flight.do("key", fine) == ("ok", False)


async def test_a_caller_that_goes_away_does_not_cancel_the_call_for_the_others():
    flight: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def fetch() -> str:
        await release.wait()
        return "done"

    first = asyncio.create_task(flight.do("key", fetch))
    second = asyncio.create_task(flight.do("key", fetch))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == ("done", True)
