"""Which (repository, digest) links the index holds, remembered so a linked
manifest or blob costs no query (which would wait behind the fills' commits
on the one SQLite connection)."""

from __future__ import annotations

# ~150 bytes each; past this the set starts over.
MAX_CACHED_LINKS = 1_000_000


class Links:
    def __init__(self, limit: int = MAX_CACHED_LINKS) -> None:
        self.limit = limit
        self._known: set[tuple[int, str]] = set()

    def __contains__(self, link: tuple[int, str]) -> bool:
        return link in self._known

    def add(self, repository_id: int, digest: str) -> None:
        if len(self._known) >= self.limit:
            self._known.clear()
        self._known.add((repository_id, digest))

    def clear(self) -> None:
        self._known.clear()
