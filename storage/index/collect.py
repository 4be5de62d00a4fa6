"""What garbage collection, eviction and expiry read from the index, and the rows they delete.

A digest is live while an image row reaches it: the image's manifest, that
manifest's config and layers, an index's child manifests and everything they
reference; ``subject`` links do not count. Deciding what is no longer live and
deleting its rows happen in one transaction, so a manifest recorded at the
same moment either sees a blob as live or records it afresh.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiosqlite

from storage.index.database import Database, fetch
from storage.index.rows import BlobRow, ImageKey, image_removal

# The live set: every digest reachable from an image row.
LIVE_CTE = """
live(digest) AS (
    SELECT manifest FROM images
    UNION
    SELECT r.child FROM manifest_references r JOIN live l ON r.manifest = l.digest WHERE r.kind != 'subject'
)"""


@dataclass(frozen=True, slots=True)
class ImageRow:
    key: ImageKey
    last_pulled: float
    pinned: bool


@dataclass(slots=True)
class Dropped:
    """Rows one transaction deleted: the image rows, and the content nothing live reaches any more."""

    images: list[ImageKey] = field(default_factory=list)
    blobs: list[BlobRow] = field(default_factory=list)  # their files are the caller's to delete
    manifests: int = 0  # manifest rows deleted


class CollectQueries:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def images(self) -> list[ImageRow]:
        rows = await self._db.all("SELECT repository_id, manifest, last_pulled, pinned FROM images")
        return [ImageRow(ImageKey(repo, manifest), last, bool(pinned)) for repo, manifest, last, pinned in rows]

    async def index_children(self) -> list[tuple[str, str]]:
        """(index, child manifest) pairs."""
        return await self._db.all("SELECT manifest, child FROM manifest_references WHERE kind = 'manifest'")

    async def references(self) -> list[tuple[str, str]]:
        """(manifest, digest it references) pairs that keep content alive: every kind but ``subject``."""
        return await self._db.all("SELECT manifest, child FROM manifest_references WHERE kind != 'subject'")

    async def reachable(self, manifest: str) -> list[str]:
        """The manifest and every digest it keeps alive, the manifest first."""
        rows = await self._db.all(
            "WITH RECURSIVE reach(digest) AS (SELECT ? UNION SELECT r.child FROM manifest_references r "
            "JOIN reach ON r.manifest = reach.digest WHERE r.kind != 'subject') SELECT digest FROM reach",
            (manifest,),
        )
        return [row[0] for row in rows]

    async def remove_images(self, keys: Iterable[ImageKey]) -> Dropped:
        """Delete these image rows (and their tags) and the rows of every digest only they reached."""
        async with self._db.writing() as db:
            removed = []
            for key in keys:
                *related, image = image_removal(key)
                for statement in related:
                    await db.execute(*statement)
                cur = await db.execute(*image)
                if cur.rowcount:
                    removed.append(key)
            gone = sorted({k.manifest for k in removed})
            doomed = await _blob_rows(
                db,
                "WITH RECURSIVE gone(digest) AS ("
                " SELECT value FROM json_each(?)"
                " UNION SELECT r.child FROM manifest_references r JOIN gone g ON r.manifest = g.digest"
                " WHERE r.kind != 'subject'),"
                f"{LIVE_CTE} "
                "SELECT g.digest, b.size, b.created_at, b.last_access FROM gone g LEFT JOIN blobs b USING (digest) "
                "WHERE g.digest NOT IN (SELECT digest FROM live)",
                (json.dumps(gone),),
            )
            return Dropped(removed, doomed, await _drop(db, doomed))

    async def drop_unreachable(self, cutoff: float, busy: Callable[[str], bool]) -> Dropped:
        """Delete the rows of blobs and manifests nothing live reaches, created before ``cutoff``,
        except those ``busy`` says are in use (checked inside the transaction)."""
        async with self._db.writing() as db:
            doomed = await _blob_rows(
                db,
                f"WITH RECURSIVE {LIVE_CTE} "
                "SELECT digest, size, created_at, last_access FROM blobs "
                "WHERE created_at < ? AND digest NOT IN (SELECT digest FROM live)",
                (cutoff,),
            )
            doomed += [
                BlobRow(digest, None, None, None)
                for (digest,) in await fetch(
                    db,
                    f"WITH RECURSIVE {LIVE_CTE} "
                    "SELECT m.digest FROM manifests m WHERE m.fetched_at < ? "
                    "AND m.digest NOT IN (SELECT digest FROM live) "
                    "AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = m.digest)",
                    (cutoff,),
                )
            ]
            doomed = [row for row in doomed if not busy(row.digest)]
            return Dropped([], doomed, await _drop(db, doomed))


async def _blob_rows(db: aiosqlite.Connection, sql: str, args: tuple) -> list[BlobRow]:
    return [BlobRow(*row) for row in await fetch(db, sql, args)]


async def _drop(db: aiosqlite.Connection, doomed: list[BlobRow]) -> int:
    """Delete the rows of content that is going; the count of manifest rows."""
    digests = [(row.digest,) for row in doomed]
    cur = await db.executemany("DELETE FROM manifests WHERE digest = ?", digests)
    manifests = max(cur.rowcount, 0)
    await db.executemany("DELETE FROM blobs WHERE digest = ?", digests)
    # Links to content that is gone would let a later fill skip the upstream's say-so.
    await db.executemany("DELETE FROM repository_blobs WHERE digest = ?", digests)
    return manifests
