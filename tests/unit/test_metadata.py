"""Metadata edge cases that need no upstream."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

import pytest

from storage.errors import StoreFull
from storage.index.consistency import TagRef
from storage.index.metadata import Metadata
from storage.index.replicas import Reconciliation, TagUpdate
from storage.index.rows import BlobRow, ImageKey, RepositoryName
from storage.oci.manifests import OCI_MANIFEST, parse_manifest


async def test_a_full_metadata_database_is_store_full_and_keeps_what_was_committed(tmp_path):
    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    try:
        await metadata.record_blob(None, "sha256:" + "a" * 64, 10)
        connection = metadata._db.connection
        async with connection.execute("PRAGMA page_count") as cur:
            pages = (await cur.fetchone())[0]
        # A database that cannot grow behaves like a full disk (SQLITE_FULL).
        await connection.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreFull):
            for i in range(2000):
                await metadata.record_blob(None, f"sha256:{i:064x}", 1)
        assert await metadata.blob_size("sha256:" + "a" * 64) == 10
        assert not connection.in_transaction
        await connection.execute(f"PRAGMA max_page_count = {pages * 100}")
        await metadata.record_blob(None, "sha256:" + "b" * 64, 5)
        assert await metadata.blob_size("sha256:" + "b" * 64) == 5
    finally:
        await metadata.close()


async def test_a_transaction_cancelled_during_its_commit_stays_cancelled_and_committed(tmp_path):
    import asyncio

    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    queued = asyncio.Event()
    pending: list[asyncio.Future] = []  # type: ignore[type-arg]
    # Keeps the connection's thread busy, so the COMMIT waits in its queue when the task is cancelled.
    slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) SELECT count(*) FROM n"

    async def write() -> None:
        async with metadata._db.writing() as db:
            await db.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
            pending.append(asyncio.ensure_future(db.execute(slow)))
            for _ in range(3):  # the slow query reaches the connection's queue first
                await asyncio.sleep(0)
            queued.set()

    try:
        task = asyncio.create_task(write())
        await queued.wait()
        await asyncio.sleep(0)  # the task leaves the block and queues its COMMIT
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.gather(*pending)
        assert not metadata._db.connection.in_transaction
        assert await metadata._db.one("SELECT value FROM meta WHERE key = 'k'") == ("v",)
        async with metadata._db.writing() as db:  # the connection is usable
            await db.execute("DELETE FROM meta WHERE key = 'k'")
    finally:
        await metadata.close()


async def test_a_one_trip_transaction_rolls_back_on_error_and_commits_when_its_waiter_is_cancelled(tmp_path):
    import asyncio

    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    db = metadata._db
    slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) SELECT count(*) FROM n"

    def failing(connection):
        connection.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
        raise ValueError("half way")

    try:
        with pytest.raises(ValueError):
            await db.atomically(failing)
        assert await db.one("SELECT value FROM meta WHERE key = 'a'") is None
        assert not db.connection.in_transaction
        # Queued behind a slow read, then its waiter goes: the transaction still runs, whole.
        busy = asyncio.ensure_future(db.all(slow))
        await asyncio.sleep(0)
        task = asyncio.create_task(db.transaction([("INSERT INTO meta (key, value) VALUES ('b', '2')", ())]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await busy
        assert await db.one("SELECT value FROM meta WHERE key = 'b'") == ("2",)
        assert await db.atomically(lambda c: c.execute("SELECT value FROM meta WHERE key = 'b'").fetchone()) == ("2",)
    finally:
        await metadata.close()


REPO = RepositoryName("up.test", "team/app")


def _digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


async def _record_image(
    metadata: Metadata, repository: RepositoryName, config: str, layers: list[str], tag: str
) -> str:
    """An image manifest referencing blobs named by ``config`` and ``layers``; its blob rows too."""
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(config), "size": 10},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _digest(layer), "size": 100}
            for layer in layers
        ],
    }
    data = json.dumps(document).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for blob, size in [(config, 10)] + [(layer, 100) for layer in layers]:
        await metadata.record_blob(repository, _digest(blob), size)
    await metadata.record_manifest(repository, digest, len(data), parse_manifest(data, OCI_MANIFEST), tag=tag)
    return digest


@pytest.fixture
async def metadata(tmp_path):
    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    yield metadata
    await metadata.close()


async def test_removing_an_image_drops_its_tags_and_only_the_rows_no_other_image_reaches(metadata):
    old = await _record_image(metadata, REPO, "config-1", ["shared", "own-1"], "1")
    repo = await metadata.repository_id(*REPO)
    new = await _record_image(metadata, REPO, "config-2", ["shared", "own-2"], "2")

    dropped = await metadata.collect.remove_images([ImageKey(repo, old), ImageKey(repo, "sha256:" + "0" * 64)])

    assert dropped.images == [ImageKey(repo, old)], "a key with no row is not reported as removed"
    assert {row.digest for row in dropped.blobs} == {old, _digest("config-1"), _digest("own-1")}
    assert dropped.manifests == 1
    assert await metadata.tags(repo) == ["2"]
    assert await metadata.blob_size(_digest("shared")) == 100
    assert await metadata.blob_size(_digest("own-1")) is None
    assert await metadata.link(repo, _digest("own-1")) == (False, None)
    reach = await metadata.collect.reachable(new)
    assert reach[0] == new and set(reach) == {new, _digest("config-2"), _digest("own-2"), _digest("shared")}


async def test_a_sweep_drops_unreachable_rows_older_than_the_cutoff_except_busy_ones(metadata):
    image = await _record_image(metadata, REPO, "config", ["layer"], "1")
    repo = await metadata.repository_id(*REPO)
    for name in ("stray", "leased"):
        await metadata.record_blob(None, _digest(name), 5)

    assert (await metadata.collect.drop_unreachable(time.time() - 3600, lambda digest: False)).blobs == []
    dropped = await metadata.collect.drop_unreachable(time.time() + 1, lambda digest: digest == _digest("leased"))

    assert [row.digest for row in dropped.blobs] == [_digest("stray")]
    assert await metadata.blob_size(_digest("stray")) is None
    assert await metadata.blob_size(_digest("leased")) == 5
    assert await metadata.blob_size(_digest("layer")) == 100, "an image reaches it"
    assert await metadata.has_image(repo, image)


async def test_deferred_blob_rows_are_restored_and_an_existing_row_wins(metadata):
    await metadata.record_blob(None, _digest("kept"), 7)
    await metadata.restore_blobs([BlobRow(_digest("kept"), 99, 0.0, 0.0), BlobRow(_digest("back"), 3, 0.0, 0.0)])
    assert await metadata.blob_sizes() == {_digest("kept"): 7, _digest("back"): 3}


async def test_pinning_marks_one_image_row_and_the_summary_counts_it(metadata):
    image = await _record_image(metadata, REPO, "config", ["layer"], "1")
    repo = await metadata.repository_id(*REPO)
    await metadata.link_blob(RepositoryName("up.test", "empty"), _digest("layer"), None)  # a row without an image

    assert await metadata.set_pinned(ImageKey(repo, image), True)
    assert not await metadata.set_pinned(ImageKey(repo, "sha256:" + "0" * 64), True)
    assert await metadata.is_pinned(repo, image)
    summary = await metadata.summary()
    assert (summary.images, summary.pinned, summary.repositories, summary.blobs) == (1, 1, 1, 3)
    assert summary.size == await metadata.stored_bytes() == 110 + (await metadata.manifest(image)).size
    assert await metadata.set_pinned(ImageKey(repo, image), False)
    assert (await metadata.summary()).pinned == 0


async def test_reconciling_with_replica_records_drops_images_and_moves_tags_in_one_transaction(metadata):
    gone = await _record_image(metadata, REPO, "config-1", ["layer-1"], "old")
    repo = await metadata.repository_id(*REPO)
    kept = await _record_image(metadata, REPO, "config-2", ["layer-2"], "stays")
    assert await _record_image(metadata, REPO, "config-2", ["layer-2"], "dropped") == kept

    await metadata.replicas.reconcile(
        Reconciliation(
            drop_images=[ImageKey(repo, gone)],
            set_tags=[TagUpdate(repo, "moved", kept, 100.0, 200.0)],
            drop_tags=[(repo, "dropped")],
        )
    )

    assert [image.key for image in await metadata.replicas.images()] == [ImageKey(repo, kept)]
    tags = {tag.tag: tag for tag in await metadata.replicas.tags()}
    assert sorted(tags) == ["moved", "stays"]
    assert (tags["moved"].manifest, tags["moved"].checked_at, tags["moved"].updated_at) == (kept, 100.0, 200.0)
    assert tags["moved"].upstream == "up.test" and tags["moved"].repository == "team/app"
    assert await metadata.replicas.references(gone) is not None, "the manifest row stays: that is the GC's"
    assert await metadata.replicas.references("sha256:" + "0" * 64) is None


async def test_forgetting_blobs_gone_from_the_bucket_keeps_a_manifest_an_image_still_names(metadata):
    image = await _record_image(metadata, REPO, "config", ["layer"], "1")
    repo = await metadata.repository_id(*REPO)
    assert await metadata.replicas.forget_blobs([image, _digest("layer")]) == 0
    assert await metadata.manifest(image) is not None
    assert await metadata.blob_size(_digest("layer")) is None
    assert await metadata.link(repo, _digest("layer")) == (False, None)


async def test_consistency_finds_tags_without_an_image_and_repairs_drop_rows(metadata):
    image = await _record_image(metadata, REPO, "config", ["layer"], "1")
    repo = await metadata.repository_id(*REPO)
    await metadata._db.transaction(
        [("INSERT INTO tags (repository_id, tag, manifest, checked_at, updated_at) VALUES (?, 'lost', ?, 0, 0)",
          (repo, "sha256:" + "0" * 64))]
    )

    assert await metadata.consistency.integrity_errors() == []
    assert await metadata.consistency.images_without_manifest() == []
    assert await metadata.consistency.tags_without_image() == [TagRef(repo, "lost", "sha256:" + "0" * 64)]
    assert await metadata.consistency.manifest_digests() == {image}
    assert await metadata.consistency.referenced_digests() == {_digest("config"), _digest("layer")}
    assert await metadata.consistency.images_of(image) == [ImageKey(repo, image)]

    await metadata.consistency.drop_images([ImageKey(repo, image)])
    await metadata.consistency.forget_blob(image)
    assert await metadata.tags(repo) == ["lost"]
    assert await metadata.consistency.images_of(image) == []
    assert await metadata.manifest(image) is None and await metadata.blob_size(image) is None
    assert await metadata.consistency.referenced_digests() == set(), "references go with their manifest"


async def test_a_lookup_makes_no_row_and_pruning_takes_rows_without_an_image_but_never_the_newest(metadata):
    assert await metadata.repository_id("up.test", "asked/only") is None
    assert (await metadata.totals())[3] == 0
    links_only = RepositoryName("up.test", "links/only")
    await metadata.link_blob(links_only, _digest("confirmed"), None)
    await _record_image(metadata, REPO, "config", ["layer"], "1")
    emptied = RepositoryName("up.test", "emptied")
    image = await _record_image(metadata, emptied, "config-2", ["layer-2"], "1")
    emptied_id = await metadata.repository_id(*emptied)
    assert emptied_id is not None
    await metadata.collect.remove_images([ImageKey(emptied_id, image)])
    assert (await metadata.totals())[3] == 3

    # "emptied" holds nothing but is the newest row: it stays, so its id is never handed out again.
    assert await metadata.prune_repositories() == 1
    assert await metadata.repository_id(*links_only) is None
    assert await metadata.repository_id(*emptied) == emptied_id
    assert await metadata.repository_id(*REPO) is not None
    newer = RepositoryName("up.test", "newer")
    await _record_image(metadata, newer, "config-3", ["layer-3"], "1")
    assert await metadata.prune_repositories() == 1
    assert await metadata.repository_id(*emptied) is None
    assert (await metadata.repository_id(*newer) or 0) > emptied_id


async def _pulled_by(metadata: Metadata) -> dict[tuple[str, str], str | None]:
    return {(row.repository, row.digest): row.last_pulled_by for row in await metadata.listing.images()}


async def test_the_last_puller_is_batched_and_a_pull_by_nobody_keeps_it(metadata):
    digest = await _record_image(metadata, REPO, "config", ["layer"], "1")
    repo_id = await metadata.repository_id(*REPO)
    assert repo_id is not None
    metadata.note_pull(repo_id, digest, by="user:alice")
    assert await _pulled_by(metadata) == {(REPO.name, digest): None}  # nothing written before a flush
    await metadata.flush()
    assert await _pulled_by(metadata) == {(REPO.name, digest): "user:alice"}
    metadata.note_pull(repo_id, digest, count=False, by="anonymous")
    metadata.note_pull(repo_id, digest, by="token:ci")
    metadata.note_pull(repo_id, digest, count=False)  # a save or a referrers lookup: no client's pull
    await metadata.flush()
    assert await _pulled_by(metadata) == {(REPO.name, digest): "token:ci"}
    assert await metadata.pull_count() == 2


async def test_a_listed_image_names_the_puller_of_the_repository_pulled_last(metadata):
    other = RepositoryName("up.test", "team/copy")
    digest = await _record_image(metadata, REPO, "config", ["layer"], "1")
    assert await _record_image(metadata, other, "config", ["layer"], "1") == digest
    first, second = await metadata.repository_id(*REPO), await metadata.repository_id(*other)
    assert first is not None and second is not None
    metadata.note_pull(second, digest, by="user:bob")
    await metadata.flush()
    metadata.note_pull(first, digest, by="user:alice")
    await metadata.flush()
    from storage.index.listing import list_images

    (image,) = await list_images(metadata)
    assert image.last_pulled_by == "user:alice"
    metadata.note_pull(second, digest, by="user:bob")
    await metadata.flush()
    (image,) = await list_images(metadata)
    assert image.last_pulled_by == "user:bob"


async def test_a_version_2_index_gains_the_puller_column_and_keeps_its_images(tmp_path):
    import sqlite3

    from storage.index.schema import SCHEMA_VERSION

    path = tmp_path / "metadata.db"
    metadata = Metadata(path)
    await metadata.open()
    digest = await _record_image(metadata, REPO, "config", ["layer"], "1")
    await metadata.close()
    # The database as regcache before version 3 left it.
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE images DROP COLUMN last_pulled_by")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()
    metadata = Metadata(path)
    await metadata.open()
    try:
        assert await metadata._db.one("SELECT value FROM meta WHERE key = 'schema_version'") == (str(SCHEMA_VERSION),)
        assert await _pulled_by(metadata) == {(REPO.name, digest): None}
        repo_id = await metadata.repository_id(*REPO)
        assert repo_id is not None
        metadata.note_pull(repo_id, digest, by="user:alice")
        await metadata.flush()
        assert await _pulled_by(metadata) == {(REPO.name, digest): "user:alice"}
    finally:
        await metadata.close()
    # Opening again migrates nothing twice.
    metadata = Metadata(path)
    await metadata.open()
    await metadata.close()


async def test_blobs_recorded_while_a_transaction_runs_share_the_next_one(metadata):
    import asyncio

    writes: list[str] = []
    metadata.observe = lambda operation, seconds: writes.append(operation)
    other = RepositoryName("up.test", "team/other")
    ids = await asyncio.gather(*(
        metadata.record_blob(REPO if i % 2 else other, _digest(f"blob{i}"), i) for i in range(10)))
    # All ten were queued before the first transaction could start: they share it.
    assert writes == ["write"]
    assert len(set(ids)) == 2 and ids[1] == ids[3] == await metadata.repository_id(*REPO)
    for i in range(10):
        assert await metadata.blob_size(_digest(f"blob{i}")) == i
        assert await metadata.link(ids[i], _digest(f"blob{i}")) == (True, i)


async def test_a_failed_batch_fails_each_of_its_writers_and_the_next_batch_goes_on(metadata):
    import asyncio

    connection = metadata._db.connection
    await connection.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON blobs WHEN NEW.size = 13 BEGIN SELECT RAISE(ABORT, 'no'); END")
    writes: list[str] = []
    metadata.observe = lambda operation, seconds: writes.append(operation)
    first = asyncio.ensure_future(metadata.record_blob(REPO, _digest("first"), 1))
    for _ in range(3):  # its transaction is on the connection's thread: later ones wait for the next
        await asyncio.sleep(0)
    batch = [asyncio.ensure_future(metadata.record_blob(REPO, _digest(f"b{size}"), size)) for size in (12, 13)]
    assert await first
    for task in batch:
        with pytest.raises(sqlite3.IntegrityError):
            await task
    assert writes == ["write"]  # the first one's; the two others shared one that failed
    assert await metadata.blob_size(_digest("b12")) is None
    await metadata.record_blob(REPO, _digest("after"), 2)
    assert await metadata.blob_size(_digest("after")) == 2


async def test_a_blob_row_is_written_when_its_writer_stops_waiting(metadata):
    import asyncio

    task = asyncio.create_task(metadata.record_blob(REPO, _digest("left"), 3))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await metadata._blob_rows.settle()
    assert await metadata.blob_size(_digest("left")) == 3
