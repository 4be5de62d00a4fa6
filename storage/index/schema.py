"""The SQLite schema and its migrations.

Names and links live here; bytes live in the blob store. The tables are built
so that eviction (images by last pull, pins), listing (sizes, created time,
pull counts) and reference-counting GC are plain queries:

- ``blobs``: every committed blob (layers, configs, manifests) with its size.
- ``repositories``: (upstream, name) pairs clients have pulled.
- ``repository_blobs``: which repository may see which blob (access is per
  repository); rows may exist before the bytes do (from a manifest's
  descriptors), with the descriptor's size.
- ``manifests``: every stored manifest and what it is.
- ``manifest_references``: manifest -> config, layers, index children,
  subject. Reference counting walks these.
- ``images``: a manifest as present in a repository; the unit of listing,
  pinning and eviction, carrying last pull time, pull count and who pulled it
  last (an identity's name as the access log gives it, never a secret).
- ``tags``: tag -> manifest per repository, with the time it was last
  confirmed against the upstream (for the tag TTL).
- ``referrer_checks``: when the referrers of a subject in a repository were
  last asked of the upstream (the same TTL as a tag). The referrers themselves
  are manifests with a ``subject`` row in ``manifest_references``.
"""

from __future__ import annotations

import aiosqlite

SCHEMA_VERSION = 3

_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS repositories (
    id INTEGER PRIMARY KEY,
    upstream TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (upstream, name)
);
CREATE TABLE IF NOT EXISTS repository_blobs (
    repository_id INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    size INTEGER,
    linked_at REAL NOT NULL,
    PRIMARY KEY (repository_id, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repository_blobs_digest ON repository_blobs (digest);
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    config_digest TEXT,
    platform TEXT,
    content_size INTEGER,
    created TEXT,
    fetched_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest_references (
    manifest TEXT NOT NULL REFERENCES manifests(digest) ON DELETE CASCADE,
    child TEXT NOT NULL,
    kind TEXT NOT NULL,
    media_type TEXT,
    size INTEGER,
    platform TEXT,
    PRIMARY KEY (manifest, child, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifest_references_child ON manifest_references (child);
CREATE TABLE IF NOT EXISTS images (
    repository_id INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    manifest TEXT NOT NULL REFERENCES manifests(digest),
    first_pulled REAL NOT NULL,
    last_pulled REAL NOT NULL,
    pull_count INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (repository_id, manifest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS images_last_pulled ON images (last_pulled);
CREATE INDEX IF NOT EXISTS images_manifest ON images (manifest);
CREATE TABLE IF NOT EXISTS tags (
    repository_id INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    manifest TEXT NOT NULL,
    checked_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (repository_id, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_manifest ON tags (manifest);
"""

# Version 2: the referrers API (OCI 1.1) is answered from the cache within a TTL.
_V2 = """
CREATE TABLE IF NOT EXISTS referrer_checks (
    repository_id INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    subject TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (repository_id, subject)
) WITHOUT ROWID;
"""

# Version 3: who pulled an image last (``regcache images --pulled-by``); NULL until a client does.
_V3 = """
ALTER TABLE images ADD COLUMN last_pulled_by TEXT;
"""

MIGRATIONS = {1: _V1, 2: _V2, 3: _V3}


async def migrate(db: aiosqlite.Connection) -> None:
    await db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    async with db.execute("SELECT value FROM meta WHERE key = 'schema_version'") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise RuntimeError(f"metadata schema {current} is newer than this regcache ({SCHEMA_VERSION})")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        # One transaction per version: an ALTER TABLE cannot run twice, so a crash between
        # the change and the version row must leave neither (SQLite's DDL is transactional).
        try:
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[version]}\n"
                f"INSERT INTO meta (key, value) VALUES ('schema_version', '{int(version)}') "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value;\nCOMMIT;"
            )
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
