"""``client_credentials: verify``: the upstream says whether a client may read a repository.

A cache that serves everything it holds to everyone hands private images to anybody
who can reach it once one authorised client pulled them. With ``verify`` the client
logs in to regcache with its credentials *for the upstream*, and before anything of a
repository is served, cached or not, the upstream is asked whether those credentials
may read it (``UpstreamClient.may_read``). The answer, yes or no, is kept for
``access_ttl`` per (credentials, upstream, repository), under a SHA-256 of the three:
the credentials themselves are never kept here. A failure to ask (upstream down,
breaker open) is not an answer: it is raised and nothing is remembered, so a client
once refused stays refused and one never asked is never let in.

Concurrent checks of one key share one upstream request.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from proxy.upstream.auth import Credentials
from proxy.upstream.client import UpstreamClient

# Remembered answers at most; the oldest go first. Each entry is 32 bytes and two floats.
MAX_ANSWERS = 100_000


class ClientCheck:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._answers: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[bool]] = {}

    async def may_read(self, client: UpstreamClient, repository: str, credentials: Credentials, ttl: float) -> bool:
        key = _key(client.name, repository, credentials)
        now = self._clock()
        self._expire(now)
        remembered = self._answers.get(key)
        if remembered is not None and remembered[1] > now:
            return remembered[0]
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(client.may_read(repository, credentials))
            self._inflight[key] = pending
            pending.add_done_callback(lambda done: self._settle(key, done, ttl))
        # shield: a client that gives up must not cancel the check others wait for.
        return await asyncio.shield(pending)

    def forget_all(self) -> None:
        """Every remembered answer (the rules were reloaded)."""
        self._answers.clear()

    def _settle(self, key: bytes, done: asyncio.Future[bool], ttl: float) -> None:
        self._inflight.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._answers[key] = (done.result(), self._clock() + ttl)
        while len(self._answers) > MAX_ANSWERS:
            self._answers.popitem(last=False)

    def _expire(self, now: float) -> None:
        # Oldest first; with ttls that differ per upstream a later entry may expire sooner,
        # which the lookup checks: this only bounds the memory.
        while self._answers:
            key, (_, expires_at) = next(iter(self._answers.items()))
            if expires_at > now:
                break
            del self._answers[key]


def _key(upstream: str, repository: str, credentials: Credentials) -> bytes:
    username, password = credentials
    digest = hashlib.sha256()
    for part in (upstream, repository, username, password):
        encoded = part.encode()
        # Length-prefixed: no two different tuples hash the same bytes.
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest.digest()
