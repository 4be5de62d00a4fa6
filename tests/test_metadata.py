"""Metadata edge cases that need no upstream."""

from __future__ import annotations

import pytest

from storage.errors import StoreFull
from storage.index.metadata import Metadata


async def test_a_full_metadata_database_is_store_full_and_keeps_what_was_committed(tmp_path):
    metadata = Metadata(tmp_path / "metadata.db")
    await metadata.open()
    try:
        await metadata.record_blob(None, "sha256:" + "a" * 64, 10)
        async with metadata.db.execute("PRAGMA page_count") as cur:
            pages = (await cur.fetchone())[0]
        # A database that cannot grow behaves like a full disk (SQLITE_FULL).
        await metadata.db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreFull):
            for i in range(2000):
                await metadata.record_blob(None, f"sha256:{i:064x}", 1)
        assert await metadata.blob_size("sha256:" + "a" * 64) == 10
        assert not metadata.db.in_transaction
        await metadata.db.execute(f"PRAGMA max_page_count = {pages * 100}")
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
        async with metadata.writing() as db:
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
        assert not metadata.db.in_transaction
        async with metadata.db.execute("SELECT value FROM meta WHERE key = 'k'") as cur:
            assert await cur.fetchone() == ("v",)
        async with metadata.writing() as db:  # the connection is usable
            await db.execute("DELETE FROM meta WHERE key = 'k'")
    finally:
        await metadata.close()
