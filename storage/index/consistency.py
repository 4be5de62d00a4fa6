"""What ``fsck`` reads to check the index against itself and the store, and the rows its repairs delete."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from storage.index.database import Database, Statement
from storage.index.rows import ImageKey, image_removal


@dataclass(frozen=True, slots=True)
class TagRef:
    repository_id: int
    tag: str
    manifest: str


class ConsistencyQueries:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def integrity_errors(self) -> list[str]:
        """What SQLite's own check finds wrong with the database file; empty when it is sound."""
        return [row[0] for row in await self._db.all("PRAGMA integrity_check") if row[0] != "ok"]

    async def images_without_manifest(self) -> list[ImageKey]:
        rows = await self._db.all(
            "SELECT repository_id, manifest FROM images WHERE manifest NOT IN (SELECT digest FROM manifests)"
        )
        return [ImageKey(repo, manifest) for repo, manifest in rows]

    async def tags_without_image(self) -> list[TagRef]:
        rows = await self._db.all(
            "SELECT t.repository_id, t.tag, t.manifest FROM tags t WHERE NOT EXISTS "
            "(SELECT 1 FROM images i WHERE i.repository_id = t.repository_id AND i.manifest = t.manifest)"
        )
        return [TagRef(*row) for row in rows]

    async def manifest_digests(self) -> set[str]:
        return {row[0] for row in await self._db.all("SELECT digest FROM manifests")}

    async def referenced_digests(self) -> set[str]:
        """Every digest some manifest references, of any kind."""
        return {row[0] for row in await self._db.all("SELECT child FROM manifest_references")}

    async def images_of(self, manifest: str) -> list[ImageKey]:
        rows = await self._db.all("SELECT repository_id, manifest FROM images WHERE manifest = ?", (manifest,))
        return [ImageKey(repo, digest) for repo, digest in rows]

    async def drop_images(self, keys: Iterable[ImageKey]) -> None:
        """These image rows and their tags, in one transaction."""
        statements: list[Statement] = []
        for key in keys:
            statements += image_removal(key)
        if statements:
            await self._db.transaction(statements)

    async def forget_blob(self, digest: str) -> None:
        """The blob's row and, when it is a manifest, the manifest's row (its references go with it)."""
        await self._db.transaction(
            [
                ("DELETE FROM manifests WHERE digest = ?", (digest,)),
                ("DELETE FROM blobs WHERE digest = ?", (digest,)),
            ]
        )
