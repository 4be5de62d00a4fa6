"""What the referrers API reads from the index: the manifests whose ``subject`` is a digest,
and when the upstream was last asked for them."""

from __future__ import annotations

import time

from storage.index.database import Database
from storage.index.rows import ManifestRow
from storage.oci.referrers import subject_of_fallback_tag


class ReferrerQueries:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def referrers(self, repository_id: int, subject: str) -> list[ManifestRow]:
        """Manifests held as images in this repository whose ``subject`` is ``subject``:
        access stays per repository, like every other read."""
        rows = await self._db.all(
            "SELECT m.digest, m.media_type, m.size FROM manifest_references r "
            "JOIN manifests m ON m.digest = r.manifest "
            "JOIN images i ON i.manifest = r.manifest AND i.repository_id = ? "
            "WHERE r.child = ? AND r.kind = 'subject' ORDER BY m.digest",
            (repository_id, subject),
        )
        return [ManifestRow(*row) for row in rows]

    async def edges(self) -> list[tuple[str, str]]:
        """(subject, manifest that refers to it) pairs: every manifest with a ``subject``, and the
        index a fallback tag ``<alg>-<hex>`` names, with the subject that tag stands for."""
        edges = await self._db.all("SELECT child, manifest FROM manifest_references WHERE kind = 'subject'")
        for tag, manifest in await self._db.all("SELECT DISTINCT tag, manifest FROM tags WHERE tag GLOB '*-*'"):
            subject = subject_of_fallback_tag(tag)
            if subject is not None:
                edges.append((str(subject), manifest))
        return edges

    async def checked_at(self, repository_id: int, subject: str) -> float | None:
        row = await self._db.one(
            "SELECT checked_at FROM referrer_checks WHERE repository_id = ? AND subject = ?",
            (repository_id, subject),
        )
        return row[0] if row else None

    async def confirm(self, repository_id: int, subject: str) -> None:
        """The upstream was asked now; what it listed is recorded as images."""
        await self._db.transaction(
            [("INSERT INTO referrer_checks (repository_id, subject, checked_at) VALUES (?, ?, ?) "
              "ON CONFLICT(repository_id, subject) DO UPDATE SET checked_at = excluded.checked_at",
              (repository_id, subject, time.time()))]
        )
