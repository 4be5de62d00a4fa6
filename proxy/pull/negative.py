"""Tags the upstream does not have, remembered for a short while (``negative_ttl``).

A crash-looping pod asks for its missing tag every few seconds; without this,
each ask is an upstream request that counts against the upstream's rate limit.
Only tags: a digest the upstream lacks is asked for rarely, and a tag that
appears upstream is found again once the entry expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Entries (a few dozen bytes each); past this the memory starts over.
MAX_MISSING_TAGS = 10_000

Key = tuple[str, str, str]  # upstream, repository, tag


class MissingTags:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[Key, float] = {}

    def remember(self, key: Key, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._until) >= MAX_MISSING_TAGS:
            self._until.clear()
        self._until[key] = self._clock() + ttl

    def missing(self, key: Key) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[key]
        return False

    def clear(self) -> None:
        self._until.clear()
