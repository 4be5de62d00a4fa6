"""Metadata edge cases that need no upstream."""

from __future__ import annotations

import pytest

from storage.errors import StoreFull
from storage.metadata import Metadata


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
