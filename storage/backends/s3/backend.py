"""Blobs in an S3-compatible object store (Ceph RGW, MinIO, AWS S3, GCS in S3 mode).

Any number of regcache replicas may share one bucket. Keys under ``prefix``::

    blobs/<algorithm>/<ab>/<hex>                    verified blobs, written once (``paths.blob_key``)
    leases/<algorithm>:<hex>                        who is fetching a cold blob now (``leases``)
    leases/gc                                       which replica runs the GC sweep now
    repositories/<upstream>/<name>/_tags/<tag>      tag -> manifest records      (``records``)
    repositories/<upstream>/<name>/_images/<digest> image records: GC's shared truth

Writing a blob: every byte goes to a local spool file first (followers of the
fill tail it, exactly as with the filesystem backend) and, as each part fills
up, that part is uploaded to a multipart upload; to a store on this host, the
parts go once the fill is verified (``part_uploads``). The upload is *completed*
only in ``commit``, which ``BlobWriter`` calls after size and digest matched;
on a mismatch, an upstream error or a cancelled fill it is aborted. An
incomplete multipart upload is never readable under its key, so nothing
unverified is ever visible, even when the process is killed mid-fill. A blob
smaller than one part is sent with a single PUT at commit.

Two replicas may complete the same digest (RGW ignores ``If-None-Match`` on
CompleteMultipartUpload): harmless, both wrote the same verified bytes.

The client is aiobotocore: it exposes the multipart calls one by one (so
"complete" is a call made only after verification, not the side effect of an
input stream ending), ListMultipartUploads to clean up after killed replicas,
conditional PUT for leases and presigned URLs, and it runs on aiohttp, the
HTTP stack regcache already uses. Its errors never leave this package: ``client``
turns them into regcache's. The bytes of parts and of whole-blob GETs move on
worker threads through presigned URLs instead (``transfer``), off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import email.utils
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from config.settings import S3Settings
from storage import paths
from storage.backends.base import BlobBackend, FillLease, ReplicaIndex, Upload
from storage.backends.s3.client import CONNECT_TIMEOUT, READ_TIMEOUT, S3Client, translated
from storage.backends.s3.leases import Leases, S3Lease
from storage.backends.s3.records import S3Records
from storage.backends.s3.transfer import StoreBody, Transfers
from storage.errors import BlobUnknown, StoreObjectUnknown, StoreUnavailable
from storage.oci.digest import Digest

log = logging.getLogger("regcache.s3")

READ_CHUNK = 1024 * 1024
# Part uploads in flight per process; each holds one part in memory.
PARALLEL_PARTS = 4
# Incomplete multipart uploads older than this belong to a replica that died
# mid-fill (a live fill is bounded by storage.fill_timeout): aborted at start.
# A replica that takes over a dead one's fill aborts its upload at once.
ABANDONED_UPLOAD_AGE = datetime.timedelta(days=1)
SWEEP_LEASE = "gc"  # leases/gc: one replica sweeps the bucket at a time
# Threads for blob bodies: PARALLEL_PARTS part uploads, the rest for warm GETs until their
# headers (the bodies are then copied on proxy.http.filesend's threads).
TRANSFER_THREADS = 32
T = TypeVar("T")


class S3Upload(Upload):
    """Spool locally, upload parts as they fill, complete only on commit."""

    def __init__(self, backend: S3Backend, digest: Digest) -> None:
        self._backend = backend
        self._client = backend.client
        self._key = backend.client.key(paths.blob_key(digest))
        self._part_size = backend.settings.part_size
        self._loop = asyncio.get_running_loop()
        self.spool_path = backend.spool_dir / uuid.uuid4().hex
        self._file = open(self.spool_path, "xb")  # noqa: SIM115 - closed in commit/abort
        self._read_fd = os.open(self.spool_path, os.O_RDONLY)
        self._written = 0
        self._submitted = 0  # bytes handed to part uploads
        self._parts: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._upload_id: asyncio.Task[str] | None = None
        self._closed = False

    # Called from a worker thread (BlobWriter hashes and writes off the loop), or
    # on the loop for a small batch: part uploads are scheduled either way.
    def write_sync(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._file.flush()  # followers read the spool by path
        self._written += len(data)
        if not self._backend.parts_after_fill:
            self._submit_full_parts()

    def _submit_full_parts(self) -> None:
        while self._written - self._submitted >= self._part_size:
            self._submit(self._part_size)

    def _submit(self, length: int) -> None:
        number, offset = len(self._parts) + 1, self._submitted
        self._submitted += length
        self._parts.append(asyncio.run_coroutine_threadsafe(self._upload_part(number, offset, length), self._loop))

    async def _create_multipart(self) -> str:
        with translated(self._key):
            created = await self._client.api.create_multipart_upload(
                Bucket=self._client.bucket, Key=self._key, ContentType="application/octet-stream"
            )
        return str(created["UploadId"])

    async def _multipart_id(self) -> str:
        if self._upload_id is None:
            # A task of its own, not part of the first part's: abort cancels the parts, and a
            # create cancelled mid-request leaves an upload in the store whose id nobody learns.
            self._upload_id = asyncio.ensure_future(self._create_multipart())
        return await asyncio.shield(self._upload_id)

    async def _upload_part(self, number: int, offset: int, length: int) -> dict[str, Any]:
        async with self._backend.part_slots:
            upload_id = await self._multipart_id()
            transfers = self._backend.transfers
            if transfers is not None:
                url = await self._client.presign("upload_part", self._key, UploadId=upload_id, PartNumber=number)
                # The thread's own descriptor: an abort may close the spool while a part is on its way.
                fd = os.dup(self._read_fd)
                etag = await self._backend.blocking(_put_part, transfers, url, fd, offset, length, self._key)
                return {"PartNumber": number, "ETag": etag}
            data = await asyncio.to_thread(os.pread, self._read_fd, length, offset)
            if len(data) != length:
                raise OSError(f"spool file shorter than {offset + length} bytes")
            with translated(self._key):
                sent = await self._client.api.upload_part(
                    Bucket=self._client.bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=data
                )
        return {"PartNumber": number, "ETag": sent["ETag"]}

    async def commit(self) -> None:
        await asyncio.to_thread(self._file.flush)
        self._submit_full_parts()  # all of them, when parts wait for the end of the fill
        try:
            if not self._parts:
                # Smaller than one part: one PUT of the verified bytes.
                data = await asyncio.to_thread(os.pread, self._read_fd, self._written, 0)
                with translated(self._key):
                    await self._client.api.put_object(
                        Bucket=self._client.bucket, Key=self._key, Body=data, ContentType="application/octet-stream"
                    )
            else:
                if self._written > self._submitted:
                    self._submit(self._written - self._submitted)
                parts = [await asyncio.wrap_future(part) for part in self._parts]
                assert self._upload_id is not None
                with translated(self._key):
                    await self._client.api.complete_multipart_upload(
                        Bucket=self._client.bucket,
                        Key=self._key,
                        UploadId=await self._upload_id,
                        MultipartUpload={"Parts": parts},
                    )
        except StoreObjectUnknown as exc:  # NoSuchUpload: aborted under us as abandoned
            raise StoreUnavailable(f"object store lost the upload of {self._key}") from exc
        self._close_spool()

    async def abort(self) -> None:
        if self._closed:
            return
        for part in self._parts:
            part.cancel()
        for part in self._parts:
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(part)
        if self._upload_id is not None:
            with contextlib.suppress(BaseException):
                upload_id = await self._upload_id
                await self._client.api.abort_multipart_upload(
                    Bucket=self._client.bucket, Key=self._key, UploadId=upload_id
                )
        self._close_spool()

    def _close_spool(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        os.close(self._read_fd)
        # Followers hold their own descriptor: unlinking does not cut them off.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool_path)


def _put_part(transfers: Transfers, url: str, fd: int, offset: int, length: int, key: str) -> str:
    try:
        return transfers.put_part(url, fd, offset, length, key)
    finally:
        os.close(fd)


def _close_unclaimed(future: concurrent.futures.Future[StoreBody]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class S3Backend(BlobBackend):
    name = "s3"

    def __init__(self, settings: S3Settings, data_dir: Path, *, direct: bool = True) -> None:
        """``direct=False`` keeps every request on aiobotocore, as a proxy for the endpoint does."""
        self.settings = settings
        self.spool_dir = paths.tmp_dir(data_dir)
        self.client = S3Client(settings)
        self.leases = Leases(self.client, settings.lease_ttl, settings.lease_renewal)
        self.records = S3Records(self.client)
        self.part_slots: asyncio.Semaphore
        self._direct = direct
        # A store on this host shares its cores with the fill: parts then go once the fill's last
        # byte has been verified (and its client has it), not while the client waits for bytes.
        # On RGW here, a cold 1 GiB GET: client 113-128 MiB/s with parts going during the fill,
        # 202-240 after it; blob readable in the bucket after 8.3-9.3 s and 8.9-11.5 s. A store
        # elsewhere takes them while the fill runs: the blob is readable right after verification.
        self.parts_after_fill = settings.part_uploads == "after_fill"
        # Blob bodies on worker threads (``transfer``): parts, and warm GETs until their headers.
        self.transfers: Transfers | None = None
        self._threads = concurrent.futures.ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="regcache-s3")

    async def blocking(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on a transfer thread (never the default pool, which hashes fills)."""
        return await asyncio.wrap_future(self._threads.submit(call, *args))

    async def start(self) -> None:
        # Local spool files of a killed process were never visible anywhere.
        if self.spool_dir.exists():
            await asyncio.to_thread(shutil.rmtree, self.spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.part_slots = asyncio.Semaphore(PARALLEL_PARTS)
        await self.client.open()
        try:
            await self.client.head_bucket()
        except StoreUnavailable as exc:
            await self.client.close()
            raise StoreUnavailable(f"bucket {self.client.bucket!r} at {self.settings.endpoint}: {exc}") from exc
        direct, tls = await self.client.direct_tls()
        if direct and self._direct:
            self.transfers = Transfers(tls, CONNECT_TIMEOUT, READ_TIMEOUT)
        if self.settings.part_uploads == "auto" and self.transfers is not None:
            url = await self.client.presign("head_object", "probe")
            try:
                self.parts_after_fill = await self.blocking(self.transfers.on_this_host, url)
            except OSError as exc:
                log.warning("could not tell where the object store runs (%s): parts go while fills run", exc)
        await self._abort_abandoned_uploads()

    async def _abort_uploads(self, prefix: str, initiated_before: datetime.datetime) -> int:
        """Abort the incomplete multipart uploads under ``prefix`` begun before the given time
        (the store's clock); how many. Best effort: what is left, the next start cleans up."""
        aborted = 0
        try:
            with translated("multipart uploads"):
                listed = await self.client.api.list_multipart_uploads(Bucket=self.client.bucket, Prefix=prefix)
            for upload in listed.get("Uploads", []):
                if upload["Initiated"] < initiated_before:
                    # Another replica (starting, or taking the same fill over) may have aborted it first.
                    with contextlib.suppress(StoreObjectUnknown), translated(upload["Key"]):
                        await self.client.api.abort_multipart_upload(
                            Bucket=self.client.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        except StoreUnavailable as exc:
            log.warning("could not clean up abandoned multipart uploads under %s: %s", prefix, exc)
        return aborted

    async def _abort_abandoned_uploads(self) -> None:
        cutoff = datetime.datetime.now(datetime.UTC) - ABANDONED_UPLOAD_AGE
        await self._abort_uploads(self.client.key(paths.BLOBS + "/"), cutoff)

    async def close(self) -> None:
        await self.leases.close()
        await self.client.close()
        if self.transfers is not None:
            self.transfers.close()
        self._threads.shutdown(wait=False)

    async def stat(self, digest: Digest) -> int | None:
        found = await self.stat_with_time(digest)
        return None if found is None else found[0]

    async def stat_with_time(self, digest: Digest) -> tuple[int, float] | None:
        key = self._key(digest)
        try:
            with translated(key):
                head = await self.client.api.head_object(Bucket=self.client.bucket, Key=key)
        except StoreObjectUnknown:
            return None
        return int(head["ContentLength"]), head["LastModified"].timestamp()

    async def begin(self, digest: Digest) -> Upload:
        return S3Upload(self, digest)

    async def delete(self, digest: Digest) -> bool:
        if await self.stat(digest) is None:
            return False
        key = self._key(digest)
        with translated(key):
            await self.client.api.delete_object(Bucket=self.client.bucket, Key=key)
        return True

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        if length == 0:
            return
        extra = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"
        key = self._key(digest)
        try:
            with translated(key):
                got = await self.client.api.get_object(Bucket=self.client.bucket, Key=key, **extra)
        except StoreObjectUnknown:
            raise BlobUnknown(f"blob {digest} is not in the store") from None
        body = got["Body"]
        try:
            with translated(key):
                while chunk := await body.read(READ_CHUNK):
                    yield chunk
        finally:
            body.close()

    async def open_body(self, digest: Digest) -> StoreBody | None:
        if self.transfers is None:
            return None
        key = self._key(digest)
        url = await self.client.presign("get_object", key)
        opening = self._threads.submit(self.transfers.get, url, key)
        try:
            return await asyncio.wrap_future(opening)
        except StoreObjectUnknown:
            raise BlobUnknown(f"blob {digest} is not in the store") from None
        except asyncio.CancelledError:
            opening.add_done_callback(_close_unclaimed)  # nobody will read what it opens
            raise

    async def read_small(self, digest: Digest) -> bytes:
        return b"".join([chunk async for chunk in self.read(digest)])

    async def list(self) -> AsyncIterator[tuple[Digest, int]]:
        async for digest, size, _ in self.list_with_times():
            yield digest, size

    async def list_with_times(self) -> AsyncIterator[tuple[Digest, int, float]]:
        """Every blob with its size and commit time (epoch seconds): GC's grace period needs the time."""
        async for item in self.client.list(paths.BLOBS + "/"):
            digest = paths.digest_from_path(self.client.relative(item["Key"]))
            if digest is not None:
                yield digest, int(item["Size"]), item["LastModified"].timestamp()

    async def redirect_url(self, digest: Digest) -> str | None:
        if not self.settings.redirect:
            return None
        return await self.client.presign("get_object", self._key(digest), self.settings.redirect_ttl)

    async def writable(self) -> bool:
        try:
            await self.client.head_bucket()
        except StoreUnavailable:
            return False
        return True

    # Replicas ---------------------------------------------------------------

    async def acquire_fill_lease(self, digest: Digest) -> FillLease | None:
        lease = await self.leases.acquire(str(digest))
        if isinstance(lease, S3Lease) and lease.taken_over_at is not None:
            # The previous holder died mid-fill: its multipart upload of this key would
            # otherwise stay in the bucket (and be billed) until some replica's next start.
            # It began before its lease lapsed; this holder's own upload begins after now.
            aborted = await self._abort_uploads(self._key(digest), lease.taken_over_at)
            if aborted:
                log.info("aborted %d multipart upload(s) of the dead fill of %s", aborted, digest)
        return lease

    async def wait_for(self, digest: Digest) -> int | None:
        return await self.leases.wait(str(digest), lambda: self.stat(digest))

    async def acquire_sweep_lease(self) -> FillLease | None:
        return await self.leases.acquire(SWEEP_LEASE)

    async def now(self) -> float:
        """The store's clock, from its Date header: LastModified times are on it, not on ours."""
        head = await self.client.head_bucket()
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()

    @property
    def shared(self) -> ReplicaIndex | None:
        return self.records

    def _key(self, digest: Digest) -> str:
        return self.client.key(paths.blob_key(digest))
