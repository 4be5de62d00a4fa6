"""Metadata in SQLite: names, links, manifests, tags and access statistics.

The hot read path (``tag``, ``is_linked``, ``manifest``) only reads. Pull
times and counts are gathered in memory by ``note_pull`` / ``note_blob_access``
and written in one transaction by ``flush`` every few seconds: losing the last
seconds of counters in a crash is fine, losing a committed tag is not, so tag
and manifest writes commit immediately.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storage.index.collect import CollectQueries
from storage.index.consistency import ConsistencyQueries
from storage.index.database import Database, Statement
from storage.index.listing import ListingQueries
from storage.index.referrers import ReferrerQueries
from storage.index.replicas import ReplicaQueries
from storage.index.rows import BlobRow, ImageKey, ManifestRow, StoreSummary
from storage.oci.manifests import ParsedManifest


@dataclass(frozen=True, slots=True)
class TagRow:
    manifest: str
    checked_at: float


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(path)
        self._repo_ids: dict[tuple[str, str], int] = {}
        self._pulls: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0])
        self._blob_access: dict[str, float] = {}
        # What GC, replica sync and fsck read and change, each by name.
        self.collect = CollectQueries(self._db)
        self.replicas = ReplicaQueries(self._db)
        self.consistency = ConsistencyQueries(self._db)
        self.listing = ListingQueries(self._db)
        self.referrers = ReferrerQueries(self._db)

    @property
    def observe(self) -> Callable[[str, float], None] | None:
        """Optional callable(operation, seconds) for metrics."""
        return self._db.observe

    @observe.setter
    def observe(self, observe: Callable[[str, float], None] | None) -> None:
        self._db.observe = observe

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        if self._db.is_open:
            await self.flush()
            await self._db.close()

    async def ping(self) -> bool:
        """Readiness: the database answers a query."""
        return await self._db.one("SELECT 1") == (1,)

    async def totals(self) -> tuple[int, int, int, int]:
        """(bytes of blobs, blobs, images, repositories), for the store gauges."""
        blobs = await self._db.one("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs")
        images = await self._db.one("SELECT COUNT(*) FROM images")
        repositories = await self._db.one("SELECT COUNT(*) FROM repositories")
        assert blobs is not None and images is not None and repositories is not None
        return int(blobs[0]), int(blobs[1]), int(images[0]), int(repositories[0])

    async def stored_bytes(self) -> int:
        """Bytes of committed blobs: what the size budget is measured against."""
        row = await self._db.one("SELECT COALESCE(SUM(size), 0) FROM blobs")
        return int(row[0]) if row else 0

    async def summary(self) -> StoreSummary:
        """The store as ``stats`` shows it: only repositories that hold an image count."""
        row = await self._db.one(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM blobs), (SELECT COUNT(*) FROM blobs), "
            "(SELECT COUNT(*) FROM images), (SELECT COUNT(*) FROM images WHERE pinned != 0), "
            "(SELECT COUNT(*) FROM repositories WHERE EXISTS "
            "(SELECT 1 FROM images i WHERE i.repository_id = repositories.id))",
        )
        assert row is not None
        return StoreSummary(*row)

    async def pull_count(self) -> int:
        """Pulls of every cached image, as far as they were flushed."""
        row = await self._db.one("SELECT COALESCE(SUM(pull_count), 0) FROM images")
        return row[0] if row else 0

    # Repositories -------------------------------------------------------

    async def repository_id(self, upstream: str, name: str, create: bool = True) -> int | None:
        key = (upstream, name)
        if key in self._repo_ids:
            return self._repo_ids[key]
        row = await self._db.one("SELECT id FROM repositories WHERE upstream = ? AND name = ?", key)
        if row is None:
            if not create:
                return None
            await self._db.transaction(
                [("INSERT OR IGNORE INTO repositories (upstream, name, created_at) VALUES (?, ?, ?)",
                  (upstream, name, time.time()))]
            )
            row = await self._db.one("SELECT id FROM repositories WHERE upstream = ? AND name = ?", key)
            assert row is not None
        repository_id: int = row[0]
        self._repo_ids[key] = repository_id
        return repository_id

    async def catalog(self) -> list[tuple[str, str]]:
        """(upstream, name) of every repository that holds at least one image."""
        rows = await self._db.all(
            "SELECT r.upstream, r.name FROM repositories r "
            "WHERE EXISTS (SELECT 1 FROM images i WHERE i.repository_id = r.id) ORDER BY r.upstream, r.name"
        )
        return [(u, name) for u, name in rows]

    async def repository_names(self) -> dict[int, tuple[str, str]]:
        """Every repository's (upstream, name) by id, to name removed images."""
        return {row[0]: (row[1], row[2]) for row in await self._db.all("SELECT id, upstream, name FROM repositories")}

    # Tags ---------------------------------------------------------------

    async def tag(self, repository_id: int, tag: str) -> TagRow | None:
        row = await self._db.one("SELECT manifest, checked_at FROM tags WHERE repository_id = ? AND tag = ?",
                                 (repository_id, tag))
        return TagRow(row[0], row[1]) if row else None

    async def tags(self, repository_id: int) -> list[str]:
        return [r[0] for r in await self._db.all("SELECT tag FROM tags WHERE repository_id = ? ORDER BY tag",
                                                (repository_id,))]

    async def confirm_tag(self, repository_id: int, tag: str, when: float | None = None) -> None:
        await self._db.transaction(
            [("UPDATE tags SET checked_at = ? WHERE repository_id = ? AND tag = ?",
              (when or time.time(), repository_id, tag))]
        )

    async def untag(self, repository_id: int, tag: str) -> None:
        await self._db.transaction([("DELETE FROM tags WHERE repository_id = ? AND tag = ?", (repository_id, tag))])

    # Manifests ----------------------------------------------------------

    async def manifest(self, digest: str) -> ManifestRow | None:
        row = await self._db.one("SELECT digest, media_type, size FROM manifests WHERE digest = ?", (digest,))
        return ManifestRow(*row) if row else None

    async def record_manifest(
        self,
        repository_id: int,
        digest: str,
        size: int,
        parsed: ParsedManifest,
        tag: str | None = None,
        pinned: bool = False,
    ) -> None:
        """Store a manifest's rows, its image in the repository, links to what it references, and the tag."""
        await self._db.transaction(self._manifest_statements(repository_id, digest, size, parsed, tag, pinned))

    def _manifest_statements(
        self,
        repository_id: int,
        digest: str,
        size: int,
        parsed: ParsedManifest,
        tag: str | None = None,
        pinned: bool = False,
    ) -> list[Statement]:
        """The statements of ``record_manifest``, for a load that commits several manifests at once."""
        now = time.time()
        config = parsed.config
        content = None if parsed.is_index else sum(d.size for d in parsed.references if d.kind != "subject")
        statements: list[Statement] = [
            ("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
             "ON CONFLICT(digest) DO NOTHING", (digest, size, now, now)),
            ("INSERT INTO manifests (digest, media_type, size, config_digest, content_size, fetched_at) "
             "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(digest) DO NOTHING",
             (digest, parsed.media_type, size, str(config.digest) if config else None, content, now)),
            ("INSERT INTO images (repository_id, manifest, first_pulled, last_pulled, pull_count, pinned) "
             "VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT(repository_id, manifest) DO UPDATE SET "
             "pinned = MAX(pinned, excluded.pinned)", (repository_id, digest, now, now, int(pinned))),
            ("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
             "ON CONFLICT DO NOTHING", (repository_id, digest, size, now)),
        ]
        # References first, then links: each kind in one run (see Database.transaction).
        statements += [
            (
                "INSERT INTO manifest_references (manifest, child, kind, media_type, size, platform) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (digest, str(ref.digest), ref.kind, ref.media_type, ref.size, ref.platform),
            )
            for ref in parsed.references
        ]
        # The upstream vouched for this manifest in this repository, and a
        # registry only accepts a manifest whose references it holds there.
        statements += [
            (
                "INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (repository_id, str(ref.digest), ref.size if ref.size >= 0 else None, now),
            )
            for ref in parsed.references
            if ref.kind in ("config", "layer", "manifest")
        ]
        if tag is not None:
            statements.append(
                (
                    "INSERT INTO tags (repository_id, tag, manifest, checked_at, updated_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(repository_id, tag) DO UPDATE SET manifest = excluded.manifest, "
                    "checked_at = excluded.checked_at, updated_at = CASE WHEN tags.manifest = excluded.manifest "
                    "THEN tags.updated_at ELSE excluded.updated_at END",
                    (repository_id, tag, digest, now, now),
                )
            )
        return statements

    async def record_images(
        self, blobs: dict[str, int], manifests: list[tuple[int, str, int, ParsedManifest, str | None]]
    ) -> None:
        """A load: blob rows and pinned (repository, manifest, size, parsed, tag) images, all or nothing."""
        now = time.time()
        statements: list[Statement] = [
            ("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
             "ON CONFLICT(digest) DO NOTHING", (digest, size, now, now))
            for digest, size in blobs.items()
        ]
        for repository_id, digest, size, parsed, tag in manifests:
            statements += self._manifest_statements(repository_id, digest, size, parsed, tag, pinned=True)
        await self._db.transaction(statements)

    async def set_manifest_details(self, digest: str, created: str | None, platform: str | None) -> None:
        await self._db.transaction(
            [("UPDATE manifests SET created = COALESCE(?, created), platform = COALESCE(?, platform) "
              "WHERE digest = ?", (created, platform, digest))]
        )

    async def is_pinned(self, repository_id: int, digest: str) -> bool:
        row = await self._db.one("SELECT pinned FROM images WHERE repository_id = ? AND manifest = ?",
                                 (repository_id, digest))
        return bool(row and row[0])

    async def has_image(self, repository_id: int, digest: str) -> bool:
        return await self._db.one("SELECT 1 FROM images WHERE repository_id = ? AND manifest = ?",
                                  (repository_id, digest)) is not None

    async def set_pinned(self, key: ImageKey, pinned: bool) -> bool:
        """Mark one image row; False when there is no such row."""
        async with self._db.writing() as db:
            cur = await db.execute(
                "UPDATE images SET pinned = ? WHERE repository_id = ? AND manifest = ?",
                (int(pinned), key.repository_id, key.manifest),
            )
            return cur.rowcount > 0

    # Blobs --------------------------------------------------------------

    async def link(self, repository_id: int, digest: str) -> tuple[bool, int | None]:
        """Whether the repository may see the blob, and the size a descriptor gave it."""
        row = await self._db.one("SELECT size FROM repository_blobs WHERE repository_id = ? AND digest = ?",
                                 (repository_id, digest))
        return (True, row[0]) if row else (False, None)

    async def blob_size(self, digest: str) -> int | None:
        row = await self._db.one("SELECT size FROM blobs WHERE digest = ?", (digest,))
        return row[0] if row else None

    async def blob_sizes(self) -> dict[str, int]:
        return dict(await self._db.all("SELECT digest, size FROM blobs"))

    async def restore_blobs(self, blobs: list[BlobRow]) -> None:
        """Blob rows put back (a deletion deferred by a lease) or adopted (fsck); a row already there wins."""
        await self._db.transaction(
            [("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
              "ON CONFLICT(digest) DO NOTHING", (b.digest, b.size, b.created_at, b.last_access)) for b in blobs]
        )

    async def record_blob(self, repository_id: int | None, digest: str, size: int) -> None:
        now = time.time()
        statements: list[Statement] = [
            ("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
             "ON CONFLICT(digest) DO UPDATE SET size = excluded.size", (digest, size, now, now)),
        ]
        if repository_id is not None:
            statements.append(
                ("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT DO UPDATE SET size = excluded.size", (repository_id, digest, size, now))
            )
        await self._db.transaction(statements)

    async def link_blob(self, repository_id: int, digest: str, size: int | None) -> None:
        await self._db.transaction(
            [("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
              "ON CONFLICT DO NOTHING", (repository_id, digest, size, time.time()))]
        )

    # Access statistics, batched ------------------------------------------

    def note_pull(self, repository_id: int, manifest: str, count: bool = True) -> None:
        entry = self._pulls[(repository_id, manifest)]
        entry[0] = time.time()
        if count:
            entry[1] += 1

    def note_blob_access(self, digest: str) -> None:
        self._blob_access[digest] = time.time()

    async def flush(self) -> None:
        if not self._pulls and not self._blob_access:
            return
        pulls, self._pulls = self._pulls, defaultdict(lambda: [0.0, 0])
        blobs, self._blob_access = self._blob_access, {}
        statements: list[Statement] = [
            ("UPDATE images SET last_pulled = MAX(last_pulled, ?), pull_count = pull_count + ? "
             "WHERE repository_id = ? AND manifest = ?", (when, int(n), repo, manifest))
            for (repo, manifest), (when, n) in pulls.items()
        ]
        statements += [
            ("UPDATE blobs SET last_access = MAX(last_access, ?) WHERE digest = ?", (when, digest))
            for digest, when in blobs.items()
        ]
        await self._db.transaction(statements)
