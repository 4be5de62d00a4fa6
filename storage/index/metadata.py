"""Metadata in SQLite: names, links, manifests, tags and access statistics.

The hot read path (``tag``, ``is_linked``, ``manifest``) only reads. Pull
times, counts and the last puller are gathered in memory by ``note_pull`` / ``note_blob_access``
and written in one transaction by ``flush`` every few seconds: losing the last
seconds of counters in a crash is fine, losing a committed tag is not, so tag
and manifest writes commit immediately.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from storage.index.batched import Batched
from storage.index.collect import CollectQueries
from storage.index.consistency import ConsistencyQueries
from storage.index.database import Database, Statement
from storage.index.listing import ListingQueries
from storage.index.referrers import ReferrerQueries
from storage.index.replicas import ReplicaQueries
from storage.index.rows import BlobRow, ImageKey, ManifestRow, RepositoryName, StoreSummary
from storage.oci.manifests import ParsedManifest

# (repository to link it to, digest, size) of a committed blob.
_BlobRow = tuple[RepositoryName | None, str, int]


def _repository_rows(db: sqlite3.Connection, repositories: list[RepositoryName]) -> dict[RepositoryName, int]:
    """The ids of ``repositories``, each row made first when missing; inside a write transaction."""
    ids = {}
    for key in dict.fromkeys(repositories):
        db.execute("INSERT INTO repositories (upstream, name, created_at) VALUES (?, ?, ?) "
                   "ON CONFLICT(upstream, name) DO NOTHING", (*key, time.time()))
        ids[key] = db.execute("SELECT id FROM repositories WHERE upstream = ? AND name = ?", key).fetchone()[0]
    return ids


def _record_blobs(db: sqlite3.Connection, blobs: list[_BlobRow]) -> list[int | None]:
    """The rows of committed blobs and their links, in one transaction: each one's repository id."""
    now = time.time()
    ids = _repository_rows(db, [repository for repository, _, _ in blobs if repository is not None])
    db.executemany("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(digest) DO UPDATE SET size = excluded.size",
                   [(digest, size, now, now) for _, digest, size in blobs])
    db.executemany("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT DO UPDATE SET size = excluded.size",
                   [(ids[repo], digest, size, now) for repo, digest, size in blobs if repo is not None])
    return [None if repository is None else ids[repository] for repository, _, _ in blobs]


@dataclass(frozen=True, slots=True)
class TagRow:
    manifest: str
    checked_at: float


@dataclass(slots=True)
class _Pulls:
    """An image's pulls since the last flush."""

    when: float = 0.0
    count: int = 0
    by: str | None = None


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(path)
        # Ids as last read or written; emptied whenever GC prunes repository rows.
        self._repo_ids: dict[RepositoryName, int] = {}
        self._pulls: dict[tuple[int, str], _Pulls] = defaultdict(_Pulls)
        self._blob_access: dict[str, float] = {}
        # What GC, replica sync and fsck read and change, each by name.
        self.collect = CollectQueries(self._db)
        self.replicas = ReplicaQueries(self._db)
        self.consistency = ConsistencyQueries(self._db)
        self.listing = ListingQueries(self._db)
        self.referrers = ReferrerQueries(self._db)
        self._blob_rows: Batched[_BlobRow, int | None] = Batched(self._db, _record_blobs)

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
            await self._blob_rows.settle()
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

    async def repository_id(self, upstream: str, name: str) -> int | None:
        """The repository's id; None while nothing was ever recorded in it (a lookup makes no row:
        any client can ask for any name)."""
        key = RepositoryName(upstream, name)
        known = self._repo_ids.get(key)
        if known is not None:
            return known
        row = await self._db.one("SELECT id FROM repositories WHERE upstream = ? AND name = ?", key)
        if row is None:
            return None
        repository_id: int = row[0]
        self._repo_ids[key] = repository_id
        return repository_id

    async def _recording(
        self, repositories: list[RepositoryName], statements: Callable[[dict[RepositoryName, int]], list[Statement]]
    ) -> dict[RepositoryName, int]:
        """One transaction that makes the rows of ``repositories`` (when missing) and runs the
        statements built from their ids. A row made and filled in one transaction is never
        empty, so a concurrent prune cannot take it between the two."""
        ids: dict[RepositoryName, int] = {}

        def prepare(db: sqlite3.Connection) -> list[Statement]:
            ids.update(_repository_rows(db, repositories))
            return statements(ids)

        await self._db.transaction(prepare)
        self._repo_ids.update(ids)
        return ids

    async def prune_repositories(self) -> int:
        """Delete the rows of repositories that hold no image (their blob links go with them:
        a link only spares an upstream HEAD); the count deleted.

        The newest row stays even when empty: SQLite gives a new row the largest id plus one,
        so while the largest is kept no id is ever handed out twice, and an id a request still
        holds can never come to name another repository.
        """
        async with self._db.writing() as db:
            cur = await db.execute(
                "DELETE FROM repositories WHERE id < (SELECT MAX(id) FROM repositories) "
                "AND NOT EXISTS (SELECT 1 FROM images i WHERE i.repository_id = repositories.id) "
                "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository_id = repositories.id)"
            )
            pruned = max(cur.rowcount, 0)
        if pruned:
            self._repo_ids.clear()
        return pruned

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
        repository: RepositoryName,
        digest: str,
        size: int,
        parsed: ParsedManifest,
        tag: str | None = None,
        pinned: bool = False,
    ) -> int:
        """Store a manifest's rows, its image in the repository, links to what it references, and the tag;
        the repository's id."""
        ids = await self._recording(
            [repository], lambda ids: self._manifest_statements(ids[repository], digest, size, parsed, tag, pinned)
        )
        return ids[repository]

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
        self, blobs: dict[str, int], manifests: list[tuple[RepositoryName, str, int, ParsedManifest, str | None]]
    ) -> None:
        """A load: blob rows and pinned (repository, manifest, size, parsed, tag) images, all or nothing."""
        now = time.time()

        def statements(ids: dict[RepositoryName, int]) -> list[Statement]:
            rows: list[Statement] = [
                ("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT(digest) DO NOTHING", (digest, size, now, now))
                for digest, size in blobs.items()
            ]
            for repository, digest, size, parsed, tag in manifests:
                rows += self._manifest_statements(ids[repository], digest, size, parsed, tag, pinned=True)
            return rows

        await self._recording([m[0] for m in manifests], statements)

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

    async def descriptor_size(self, repository: RepositoryName, digest: str) -> int | None:
        """The size a manifest's descriptor gave a blob linked to the repository, if any."""
        row = await self._db.one(
            "SELECT b.size FROM repository_blobs b JOIN repositories r ON r.id = b.repository_id "
            "WHERE r.upstream = ? AND r.name = ? AND b.digest = ?", (*repository, digest))
        return row[0] if row else None

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

    @overload
    async def record_blob(self, repository: RepositoryName, digest: str, size: int) -> int: ...

    @overload
    async def record_blob(self, repository: None, digest: str, size: int) -> None: ...

    async def record_blob(self, repository: RepositoryName | None, digest: str, size: int) -> int | None:
        """A committed blob, linked to ``repository`` when given; that repository's id.

        Returns once the row is committed; blobs recorded meanwhile share a transaction."""
        repository_id = await self._blob_rows.write((repository, digest, size))
        if repository is not None:
            assert repository_id is not None
            self._repo_ids[repository] = repository_id
        return repository_id

    async def link_blob(self, repository: RepositoryName, digest: str, size: int | None) -> int:
        """The upstream confirmed the repository has the blob; the repository's id."""
        ids = await self._recording([repository], lambda ids: [
            ("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
             "ON CONFLICT DO NOTHING", (ids[repository], digest, size, time.time())),
        ])
        return ids[repository]

    # Access statistics, batched ------------------------------------------

    def note_pull(self, repository_id: int, manifest: str, count: bool = True, by: str | None = None) -> None:
        """A pull of the image; ``by``: who pulled it, as the access log names them (never a
        secret), when a client did (a save or a referrers lookup is nobody's pull)."""
        entry = self._pulls[(repository_id, manifest)]
        entry.when = time.time()
        if count:
            entry.count += 1
        if by is not None:
            entry.by = by

    def note_blob_access(self, digest: str) -> None:
        self._blob_access[digest] = time.time()

    async def flush(self) -> None:
        if not self._pulls and not self._blob_access:
            return
        pulls, self._pulls = self._pulls, defaultdict(_Pulls)
        blobs, self._blob_access = self._blob_access, {}
        # The expressions of SET see the row before the update: the puller is replaced only
        # by a pull at least as recent as the stored one.
        statements: list[Statement] = [
            ("UPDATE images SET last_pulled = MAX(last_pulled, ?), pull_count = pull_count + ?, "
             "last_pulled_by = CASE WHEN ? IS NOT NULL AND ? >= last_pulled THEN ? ELSE last_pulled_by END "
             "WHERE repository_id = ? AND manifest = ?",
             (p.when, p.count, p.by, p.when, p.by, repo, manifest))
            for (repo, manifest), p in pulls.items()
        ]
        statements += [
            ("UPDATE blobs SET last_access = MAX(last_access, ?) WHERE digest = ?", (when, digest))
            for digest, when in blobs.items()
        ]
        await self._db.transaction(statements)
