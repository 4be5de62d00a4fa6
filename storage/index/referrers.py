"""What the referrers API reads from the index: the manifests whose ``subject`` is a digest,
and when the upstream was last asked for them."""

from __future__ import annotations

import time

from storage.index.database import Database
from storage.index.rows import ManifestRow


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
