"""What replica sync and the shared GC read from this replica's index, and the rows they change.

On a store shared by replicas the bucket's records are the truth for which
images exist; this replica's rows follow them (``storage.replicas``).
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.index.database import Database, Statement
from storage.index.rows import ImageKey, image_removal


@dataclass(frozen=True, slots=True)
class LocalImage:
    key: ImageKey
    upstream: str
    repository: str
    first_pulled: float


@dataclass(frozen=True, slots=True)
class LocalTag:
    repository_id: int
    upstream: str
    repository: str
    tag: str
    manifest: str
    checked_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class TagUpdate:
    """A tag taken from another replica's record: it points at ``manifest`` as confirmed at ``checked_at``."""

    repository_id: int
    tag: str
    manifest: str
    checked_at: float
    updated_at: float


@dataclass(slots=True)
class Reconciliation:
    """Changes one sync makes to the index, committed together."""

    drop_images: list[ImageKey]
    set_tags: list[TagUpdate]
    drop_tags: list[tuple[int, str]]  # (repository id, tag)


class ReplicaQueries:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def images(self) -> list[LocalImage]:
        rows = await self._db.all(
            "SELECT i.repository_id, p.upstream, p.name, i.manifest, i.first_pulled "
            "FROM images i JOIN repositories p ON p.id = i.repository_id"
        )
        return [LocalImage(ImageKey(repo, manifest), u, r, first) for repo, u, r, manifest, first in rows]

    async def tags(self) -> list[LocalTag]:
        rows = await self._db.all(
            "SELECT t.repository_id, p.upstream, p.name, t.tag, t.manifest, t.checked_at, t.updated_at "
            "FROM tags t JOIN repositories p ON p.id = t.repository_id"
        )
        return [LocalTag(*row) for row in rows]

    async def reconcile(self, changes: Reconciliation) -> None:
        """Images dropped (with their tags), then tags set, then tags dropped: one transaction."""
        statements: list[Statement] = []
        for key in changes.drop_images:
            statements += image_removal(key)
        statements += [
            ("INSERT INTO tags (repository_id, tag, manifest, checked_at, updated_at) VALUES (?, ?, ?, ?, ?) "
             "ON CONFLICT(repository_id, tag) DO UPDATE SET manifest = excluded.manifest, "
             "checked_at = excluded.checked_at, updated_at = excluded.updated_at",
             (t.repository_id, t.tag, t.manifest, t.checked_at, t.updated_at))
            for t in changes.set_tags
        ]
        statements += [
            ("DELETE FROM tags WHERE repository_id = ? AND tag = ?", (repo, tag)) for repo, tag in changes.drop_tags
        ]
        if statements:
            await self._db.transaction(statements)

    async def references(self, manifest: str) -> tuple[tuple[str, bool], ...] | None:
        """(child, is a manifest) for what a manifest keeps alive (no ``subject``);
        None when this index has no row for the manifest."""
        known = await self._db.one("SELECT EXISTS (SELECT 1 FROM manifests WHERE digest = ?)", (manifest,))
        if not (known and known[0]):
            return None
        rows = await self._db.all(
            "SELECT child, kind FROM manifest_references WHERE manifest = ? AND kind != 'subject'", (manifest,)
        )
        return tuple((child, kind == "manifest") for child, kind in rows)

    async def forget_blobs(self, digests: list[str]) -> int:
        """This replica's rows of what is gone from the bucket; the count of manifest rows deleted."""
        args = [(d,) for d in digests]
        async with self._db.writing() as db:
            # An image row still naming it (recorded here, not yet published) keeps the row; its
            # next pull finds the bytes gone and fetches them again.
            cur = await db.executemany(
                "DELETE FROM manifests WHERE digest = ?1 AND NOT EXISTS (SELECT 1 FROM images WHERE manifest = ?1)",
                args,
            )
            await db.executemany("DELETE FROM blobs WHERE digest = ?", args)
            await db.executemany("DELETE FROM repository_blobs WHERE digest = ?", args)
        return max(cur.rowcount, 0)
