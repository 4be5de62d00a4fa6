"""Leases in the bucket: one replica at a time fetches a cold blob (or runs GC).

A lease is the object ``leases/<name>``, created with ``PUT If-None-Match: *``:
the store lets exactly one replica create it (the others get 412). While the
holder works, a task beside it rewrites the object every ``renewal`` seconds
(``storage.s3.lease_renew_interval``, well within the TTL); when it is done it
deletes it. A replica killed mid-fill stops rewriting, and once the object is
older than the TTL (seconds by default) any replica may take it over; the
lease it then holds says when the old one was found expired, so the new holder
can clean up what the dead one left (``S3Backend.acquire_fill_lease``).

Age is judged with the store's own clock (the object's Last-Modified against
the Date of the reply that carried it), so clock skew between replicas does
not matter.

A store that does not honour ``If-None-Match`` on PUT (it answers something
other than 412, or 501) makes every lease a local one: each replica then
fetches a cold blob at most once, never more, because fills inside one
process are single flight anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from storage.backends.base import FillLease
from storage.backends.s3.client import S3Client, read_body, translated
from storage.errors import StoreObjectExists, StoreObjectUnknown, StoreRejected, StoreUnavailable

log = logging.getLogger("regcache.s3.leases")

LEASES = "leases/"
OWNER = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class S3Lease(FillLease):
    def __init__(self, leases: Leases, name: str, token: str, taken_over_at: datetime.datetime | None) -> None:
        self._leases = leases
        self.name = name
        self.token = token
        # When (the store's clock) the previous holder's lease was found expired; None for a
        # lease nobody held. Whatever that holder started is older than this.
        self.taken_over_at = taken_over_at
        self._heartbeat = asyncio.create_task(self._beat())
        self._released = False

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self._leases.renewal))
            try:
                await self._leases._put(self.name, self.token, conditional=False)
            except StoreUnavailable as exc:
                log.warning("renewing lease %s failed: %s", self.name, exc)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._heartbeat
        await self._leases._delete_if_ours(self.name, self.token)
        self._leases._held.discard(self)


class Leases:
    def __init__(self, client: S3Client, ttl: float, renewal: float) -> None:
        self.client = client
        self.ttl = ttl
        self.renewal = renewal
        self._held: set[S3Lease] = set()
        self._conditional = True  # until the store shows it ignores If-None-Match
        self.poll_max = 1.0

    def _key(self, name: str) -> str:
        return self.client.key(LEASES + name)

    async def _put(self, name: str, token: str, conditional: bool) -> None:
        body = json.dumps({"owner": OWNER, "token": token, "ttl": self.ttl}).encode()
        extra = {"IfNoneMatch": "*"} if conditional else {}
        key = self._key(name)
        with translated(key):
            await self.client.api.put_object(
                Bucket=self.client.bucket, Key=key, Body=body, ContentType="application/json", **extra
            )

    async def acquire(self, name: str) -> S3Lease | FillLease | None:
        """A lease on ``name``; None while another live replica holds it."""
        if not self._conditional:
            return FillLease()
        token = uuid.uuid4().hex
        taken_over_at: datetime.datetime | None = None
        for _ in range(2):
            try:
                await self._put(name, token, conditional=True)
            except StoreObjectExists:
                holder = await self._holder(name)
                if holder is not None and not holder["expired"]:
                    return None
                # Released a moment ago, or its holder died: take it over.
                if holder is not None:
                    log.info("taking over expired lease %s of %s", name, holder.get("owner"))
                    taken_over_at = holder["now"]
                    await self._delete(name)
                continue
            except StoreRejected as exc:
                log.warning("object store rejects conditional PUT (%s): leases are per replica", exc)
                self._conditional = False
                return FillLease()
            lease = S3Lease(self, name, token, taken_over_at)
            self._held.add(lease)
            return lease
        return None

    async def _holder(self, name: str) -> dict[str, Any] | None:
        """The lease object's content plus ``expired`` and ``now`` (the store's clock when it
        answered, or None); None when there is none."""
        key = self._key(name)
        try:
            with translated(key):
                got = await self.client.api.get_object(Bucket=self.client.bucket, Key=key)
            raw = await read_body(got, key)
        except StoreObjectUnknown:
            return None
        try:
            holder: dict[str, Any] = json.loads(raw)
            ttl = float(holder.get("ttl", self.ttl))
        except (ValueError, AttributeError, TypeError):
            holder, ttl = {}, self.ttl
        date = got["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date) if date else None
        modified = got["LastModified"]
        holder["expired"] = now is not None and (now - modified).total_seconds() > ttl
        holder["now"] = now
        return holder

    async def _delete(self, name: str) -> None:
        key = self._key(name)
        with contextlib.suppress(StoreObjectUnknown, StoreUnavailable), translated(key):
            await self.client.api.delete_object(Bucket=self.client.bucket, Key=key)

    async def _delete_if_ours(self, name: str, token: str) -> None:
        try:
            holder = await self._holder(name)
        except StoreUnavailable:
            return  # it expires on its own
        if holder is not None and holder.get("token") == token:
            await self._delete(name)

    async def wait(self, name: str, stat: Callable[[], Awaitable[int | None]]) -> int | None:
        """Poll until the holder committed (the blob's size) or gave up (None).

        Bounded by the lease: a holder that dies stops renewing and its lease
        expires after ``ttl``; a holder that fails deletes it at once.
        """
        delay = 0.02
        while True:
            size = await stat()
            if size is not None:
                return size
            holder = await self._holder(name)
            if holder is None or holder["expired"]:
                return await stat()  # committed just before it released?
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_max)

    async def close(self) -> None:
        for lease in list(self._held):
            await lease.release()
