"""Which (repository, digest) links the index holds, remembered so a linked
manifest or blob costs no query (which would wait behind the fills' commits
on the one SQLite connection), with the size the link's descriptor gave: a
fill of a blob an image just named needs no query for it either."""

from __future__ import annotations

# ~200 bytes each; past this the map starts over.
MAX_CACHED_LINKS = 1_000_000


class Links:
    def __init__(self, limit: int = MAX_CACHED_LINKS) -> None:
        self.limit = limit
        self._known: dict[tuple[int, str], int | None] = {}

    def __contains__(self, link: tuple[int, str]) -> bool:
        return link in self._known

    def add(self, repository_id: int, digest: str, size: int | None = None, *, stored: bool = False) -> None:
        """A link the index holds; ``size``: the blob's size as a descriptor said (a size
        known already stays, as the index keeps the first) or, ``stored``, as the blob
        itself has it (which replaces any other, as in the index)."""
        key = (repository_id, digest)
        if not stored and self._known.get(key) is not None:
            return
        if key not in self._known and len(self._known) >= self.limit:
            self._known.clear()
        self._known[key] = size

    def size(self, repository_id: int, digest: str) -> int | None:
        """The linked blob's size as remembered; None when not known here."""
        return self._known.get((repository_id, digest))

    def clear(self) -> None:
        self._known.clear()
