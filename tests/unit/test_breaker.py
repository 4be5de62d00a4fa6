"""The circuit breaker's counting and probing, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import (
    UpstreamCircuitOpen,
    UpstreamNotFound,
    UpstreamServerError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.upstream.breaker import Breaker
from proxy.upstream.responses import NullObserver


class Transitions(NullObserver):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def breaker(self, upstream: str, state: str) -> None:
        self.seen.append(state)


def make(probe, failures: int = 3):  # type: ignore[no-untyped-def]
    observer = Transitions()
    return Breaker("up.test", failures, probe, observer, sleep=lambda _: asyncio.sleep(0)), observer


async def never_answers() -> None:
    raise UpstreamTimeout("probe timed out", upstream="up.test")


async def test_only_failures_in_a_row_open_it() -> None:
    breaker, observer = make(never_answers)
    for error in (UpstreamTimeout(), UpstreamUnavailable(), UpstreamNotFound(), UpstreamTimeout(), UpstreamTimeout()):
        breaker.failed(error)
    assert not breaker.is_open, "an answer (404) in between resets the count"
    breaker.failed(UpstreamServerError())
    breaker.failed(UpstreamTimeout())
    breaker.failed(UpstreamTimeout())
    assert not breaker.is_open, "a 5xx is an answer"
    breaker.failed(UpstreamUnavailable())
    assert breaker.is_open and observer.seen == ["open"]
    with pytest.raises(UpstreamCircuitOpen) as caught:
        breaker.check()
    assert caught.value.upstream == "up.test" and caught.value.retry_after is not None
    await breaker.close()


async def test_probe_closes_it_once_the_upstream_answers() -> None:
    answers = iter([False, False, True])
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1
        if not next(answers):
            raise UpstreamTimeout("probe timed out", upstream="up.test")

    breaker, observer = make(probe, failures=1)
    breaker.failed(UpstreamTimeout())
    for _ in range(100):
        if not breaker.is_open:
            break
        await asyncio.sleep(0)
    assert not breaker.is_open and probes == 3
    assert observer.seen == ["open", "closed"]
    breaker.check()
    await breaker.close()
