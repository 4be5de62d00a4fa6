"""Metadata in SQLite: names, links, manifests, tags and access statistics.

The hot read path (``tag``, ``is_linked``, ``manifest``) only reads. Pull
times and counts are gathered in memory by ``note_pull`` / ``note_blob_access``
and written in one transaction by ``flush`` every few seconds: losing the last
seconds of counters in a crash is fine, losing a committed tag is not, so tag
and manifest writes commit immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from storage.errors import StoreFull
from storage.index.schema import migrate
from storage.oci.manifests import ParsedManifest


@dataclass(frozen=True, slots=True)
class TagRow:
    manifest: str
    checked_at: float


@dataclass(frozen=True, slots=True)
class ManifestRow:
    digest: str
    media_type: str
    size: int


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._repo_ids: dict[tuple[str, str], int] = {}
        self._pulls: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0])
        self._blob_access: dict[str, float] = {}
        self._write_lock = asyncio.Lock()
        self.observe = None  # optional callable(operation, seconds) for metrics

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "metadata is not open"
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=FULL")
        await self.db.execute("PRAGMA foreign_keys=ON")
        await self.db.execute("PRAGMA busy_timeout=10000")
        await migrate(self.db)

    async def close(self) -> None:
        if self._db is not None:
            await self.flush()
            await self._db.close()
            self._db = None

    async def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        started = time.perf_counter()
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        if self.observe:
            self.observe("read", time.perf_counter() - started)
        return row

    async def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        started = time.perf_counter()
        async with self.db.execute(sql, args) as cur:
            rows = list(await cur.fetchall())
        if self.observe:
            self.observe("read", time.perf_counter() - started)
        return rows

    async def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        started = time.perf_counter()
        async with self.writing() as db:
            # Each call is a trip to the connection's thread and back: consecutive
            # rows of one statement go in one executemany (a manifest's ~2 per layer).
            for sql, group in itertools.groupby(statements, key=lambda statement: statement[0]):
                rows = [args for _, args in group]
                if len(rows) == 1:
                    await db.execute(sql, rows[0])
                else:
                    await db.executemany(sql, rows)
        if self.observe:
            self.observe("write", time.perf_counter() - started)

    async def transaction(self, statements: list[tuple[str, tuple]]) -> None:
        await self._transaction(statements)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction that may read as it goes (GC decides and deletes in one).

        One connection serves every task, so transactions take turns.
        """
        async with self._write_lock:
            # Cancelled while BEGIN waits in the connection's queue, it still runs
            # after: roll it back then, or the connection stays in a transaction.
            begin = asyncio.ensure_future(self.db.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                await asyncio.wait([begin])
                if not begin.cancelled() and begin.exception() is None and self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise
            try:
                yield self.db
                # Cancelled while COMMIT waits or runs, it still runs after: let it
                # end first, or the ROLLBACK below would run after it and fail,
                # hiding the cancellation (a stopping task would then go on).
                commit = asyncio.ensure_future(self.db.execute("COMMIT"))
                try:
                    await asyncio.shield(commit)
                except asyncio.CancelledError:
                    await asyncio.wait([commit])
                    raise
            except BaseException as exc:
                # SQLite may already have rolled back (a full disk does that).
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                    raise StoreFull("no space left for the metadata database") from exc
                raise

    async def ping(self) -> bool:
        """Readiness: the database answers a query."""
        return await self._one("SELECT 1") == (1,)

    async def totals(self) -> tuple[int, int, int, int]:
        """(bytes of blobs, blobs, images, repositories), for the store gauges."""
        blobs = await self._one("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs")
        images = await self._one("SELECT COUNT(*) FROM images")
        repositories = await self._one("SELECT COUNT(*) FROM repositories")
        assert blobs is not None and images is not None and repositories is not None
        return int(blobs[0]), int(blobs[1]), int(images[0]), int(repositories[0])

    # Repositories -------------------------------------------------------

    async def repository_id(self, upstream: str, name: str, create: bool = True) -> int | None:
        key = (upstream, name)
        if key in self._repo_ids:
            return self._repo_ids[key]
        row = await self._one("SELECT id FROM repositories WHERE upstream = ? AND name = ?", key)
        if row is None:
            if not create:
                return None
            await self._transaction(
                [("INSERT OR IGNORE INTO repositories (upstream, name, created_at) VALUES (?, ?, ?)",
                  (upstream, name, time.time()))]
            )  # fmt: skip
            row = await self._one("SELECT id FROM repositories WHERE upstream = ? AND name = ?", key)
            assert row is not None
        self._repo_ids[key] = row[0]
        return row[0]

    async def catalog(self) -> list[tuple[str, str]]:
        """(upstream, name) of every repository that holds at least one image."""
        rows = await self._all(
            "SELECT r.upstream, r.name FROM repositories r "
            "WHERE EXISTS (SELECT 1 FROM images i WHERE i.repository_id = r.id) ORDER BY r.upstream, r.name"
        )
        return [(u, name) for u, name in rows]

    # Tags ---------------------------------------------------------------

    async def tag(self, repository_id: int, tag: str) -> TagRow | None:
        row = await self._one("SELECT manifest, checked_at FROM tags WHERE repository_id = ? AND tag = ?",
                              (repository_id, tag))  # fmt: skip
        return TagRow(row[0], row[1]) if row else None

    async def tags(self, repository_id: int) -> list[str]:
        return [r[0] for r in await self._all("SELECT tag FROM tags WHERE repository_id = ? ORDER BY tag",
                                              (repository_id,))]  # fmt: skip

    async def confirm_tag(self, repository_id: int, tag: str, when: float | None = None) -> None:
        await self._transaction(
            [("UPDATE tags SET checked_at = ? WHERE repository_id = ? AND tag = ?",
              (when or time.time(), repository_id, tag))]
        )  # fmt: skip

    # Manifests ----------------------------------------------------------

    async def manifest(self, digest: str) -> ManifestRow | None:
        row = await self._one("SELECT digest, media_type, size FROM manifests WHERE digest = ?", (digest,))
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
        await self._transaction(self.manifest_statements(repository_id, digest, size, parsed, tag, pinned))

    def manifest_statements(
        self,
        repository_id: int,
        digest: str,
        size: int,
        parsed: ParsedManifest,
        tag: str | None = None,
        pinned: bool = False,
    ) -> list[tuple[str, tuple]]:
        """The statements of ``record_manifest``, for callers that commit several manifests at once."""
        now = time.time()
        config = parsed.config
        content = None if parsed.is_index else sum(d.size for d in parsed.references if d.kind != "subject")
        statements: list[tuple[str, tuple]] = [
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
        ]  # fmt: skip
        # References first, then links: each kind in one run (see _transaction).
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
        statements: list[tuple[str, tuple]] = [
            ("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
             "ON CONFLICT(digest) DO NOTHING", (digest, size, now, now))
            for digest, size in blobs.items()
        ]  # fmt: skip
        for repository_id, digest, size, parsed, tag in manifests:
            statements += self.manifest_statements(repository_id, digest, size, parsed, tag, pinned=True)
        await self._transaction(statements)

    async def set_manifest_details(self, digest: str, created: str | None, platform: str | None) -> None:
        await self._transaction(
            [("UPDATE manifests SET created = COALESCE(?, created), platform = COALESCE(?, platform) "
              "WHERE digest = ?", (created, platform, digest))]
        )  # fmt: skip

    async def is_pinned(self, repository_id: int, digest: str) -> bool:
        row = await self._one("SELECT pinned FROM images WHERE repository_id = ? AND manifest = ?",
                              (repository_id, digest))  # fmt: skip
        return bool(row and row[0])

    async def has_image(self, repository_id: int, digest: str) -> bool:
        return await self._one("SELECT 1 FROM images WHERE repository_id = ? AND manifest = ?",
                               (repository_id, digest)) is not None  # fmt: skip

    # Blobs --------------------------------------------------------------

    async def link(self, repository_id: int, digest: str) -> tuple[bool, int | None]:
        """Whether the repository may see the blob, and the size a descriptor gave it."""
        row = await self._one("SELECT size FROM repository_blobs WHERE repository_id = ? AND digest = ?",
                              (repository_id, digest))  # fmt: skip
        return (True, row[0]) if row else (False, None)

    async def blob_size(self, digest: str) -> int | None:
        row = await self._one("SELECT size FROM blobs WHERE digest = ?", (digest,))
        return row[0] if row else None

    async def record_blob(self, repository_id: int | None, digest: str, size: int) -> None:
        now = time.time()
        statements: list[tuple[str, tuple]] = [
            ("INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?, ?, ?, ?) "
             "ON CONFLICT(digest) DO UPDATE SET size = excluded.size", (digest, size, now, now)),
        ]  # fmt: skip
        if repository_id is not None:
            statements.append(
                ("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT DO UPDATE SET size = excluded.size", (repository_id, digest, size, now))
            )  # fmt: skip
        await self._transaction(statements)

    async def link_blob(self, repository_id: int, digest: str, size: int | None) -> None:
        await self._transaction(
            [("INSERT INTO repository_blobs (repository_id, digest, size, linked_at) VALUES (?, ?, ?, ?) "
              "ON CONFLICT DO NOTHING", (repository_id, digest, size, time.time()))]
        )  # fmt: skip

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
        statements: list[tuple[str, tuple]] = [
            ("UPDATE images SET last_pulled = MAX(last_pulled, ?), pull_count = pull_count + ? "
             "WHERE repository_id = ? AND manifest = ?", (when, int(n), repo, manifest))
            for (repo, manifest), (when, n) in pulls.items()
        ]  # fmt: skip
        statements += [
            ("UPDATE blobs SET last_access = MAX(last_access, ?) WHERE digest = ?", (when, digest))
            for digest, when in blobs.items()
        ]
        await self._transaction(statements)
