"""Tag and image records in the bucket: what every replica agrees on.

::

    repositories/<upstream>/<name>/_tags/<tag>         {"digest": ..., "checked_at": ...}
    repositories/<upstream>/<name>/_images/<digest>    {"media_type": ...}

Each replica keeps its own SQLite index and writes these records whenever it
records a manifest; on a local miss it reads them before asking the upstream.
``_tags`` and ``_images`` can never collide with a repository path component:
the distribution grammar makes every component start with a letter or digit.

Consistency: a record is one object, so every read sees a whole record. A
replica that already has a tag in SQLite serves it until its tag TTL runs out
and then revalidates, as it would alone; an ``rmi`` on one replica deletes the
records at once, and other replicas drop their local rows when they next find
the records gone (``storage.replicas.sync``, before ``images``, ``rmi`` and every
lifecycle pass). To tell "removed by another replica" from "not published yet"
each process remembers which records it has seen in the bucket (written or
listed); tag records are re-read only when their ETag changed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from storage.backends.base import ReplicaIndex
from storage.backends.s3.client import S3Client, read_body, translated
from storage.errors import StoreObjectUnknown

ROOT = "repositories/"
TAGS = "/_tags/"
IMAGES = "/_images/"


class S3Records(ReplicaIndex):
    def __init__(self, client: S3Client) -> None:
        self.client = client
        self._seen: set[tuple[str, str, str]] = set()  # (upstream, repository, digest or tag)
        self._tag_cache: dict[str, tuple[str, tuple[str, float] | None]] = {}  # key -> (ETag, record)

    def seen(self, upstream: str, repository: str, name: str) -> bool:
        return (upstream, repository, name) in self._seen

    def _key(self, upstream: str, repository: str, kind: str, name: str) -> str:
        return self.client.key(f"{ROOT}{upstream}/{repository}{kind}{name}")

    async def _put(self, key: str, record: dict[str, object]) -> None:
        with translated(key):
            await self.client.api.put_object(
                Bucket=self.client.bucket, Key=key, Body=json.dumps(record).encode(), ContentType="application/json"
            )

    async def _get(self, key: str) -> dict[str, object] | None:
        try:
            with translated(key):
                got = await self.client.api.get_object(Bucket=self.client.bucket, Key=key)
        except StoreObjectUnknown:
            return None
        try:
            record = json.loads(await read_body(got, key))
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    async def put_image(self, upstream: str, repository: str, digest: str, media_type: str) -> None:
        await self._put(self._key(upstream, repository, IMAGES, digest), {"media_type": media_type})
        self._seen.add((upstream, repository, digest))

    async def get_image(self, upstream: str, repository: str, digest: str) -> str | None:
        record = await self._get(self._key(upstream, repository, IMAGES, digest))
        media_type = record.get("media_type") if record else None
        return media_type if isinstance(media_type, str) else None

    async def put_tag(self, upstream: str, repository: str, tag: str, digest: str, checked_at: float) -> None:
        await self._put(self._key(upstream, repository, TAGS, tag), {"digest": digest, "checked_at": checked_at})
        self._seen.add((upstream, repository, tag))

    async def get_tag(self, upstream: str, repository: str, tag: str) -> tuple[str, float] | None:
        record = await self._get(self._key(upstream, repository, TAGS, tag))
        if record is None or not isinstance(record.get("digest"), str):
            return None
        checked = record.get("checked_at")
        return str(record["digest"]), float(checked) if isinstance(checked, int | float) else 0.0

    async def _delete(self, key: str) -> None:
        with translated(key):
            await self.client.api.delete_object(Bucket=self.client.bucket, Key=key)

    async def delete_image(self, upstream: str, repository: str, digest: str) -> None:
        tags_prefix = f"{ROOT}{upstream}/{repository}{TAGS}"
        async for item in self.client.list(tags_prefix):
            record = await self._get(item["Key"])
            if record is not None and record.get("digest") == digest:
                await self._delete(item["Key"])
        await self._delete(self._key(upstream, repository, IMAGES, digest))

    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        await self._delete(self._key(upstream, repository, TAGS, tag))

    def _split(self, key: str, kind: str) -> tuple[str, str, str] | None:
        """(upstream, repository, name) of a record key of ``kind``."""
        relative = self.client.relative(key)[len(ROOT) :]
        head, sep, name = relative.rpartition(kind)
        upstream, slash, repository = head.partition("/")
        if sep and slash and repository and name:
            return upstream, repository, name
        return None

    async def images(self) -> AsyncIterator[tuple[str, str, str]]:
        async for item in self.client.list(ROOT):
            found = self._split(item["Key"], IMAGES)
            if found is not None:
                self._seen.add(found)
                yield found

    async def tags(self) -> AsyncIterator[tuple[str, str, str, str, float]]:
        listed = set()
        async for item in self.client.list(ROOT):
            found = self._split(item["Key"], TAGS)
            if found is None:
                continue
            key, etag = item["Key"], str(item.get("ETag", ""))
            listed.add(key)
            cached = self._tag_cache.get(key)
            if cached is not None and etag and cached[0] == etag:
                record = cached[1]
            else:
                raw = await self._get(key)
                digest = raw.get("digest") if raw else None
                checked = raw.get("checked_at") if raw else None
                record = None
                if isinstance(digest, str):
                    record = digest, float(checked) if isinstance(checked, int | float) else 0.0
                self._tag_cache[key] = (etag, record)
            if record is not None:
                self._seen.add(found)
                yield (*found, *record)
        for gone in set(self._tag_cache) - listed:
            del self._tag_cache[gone]
