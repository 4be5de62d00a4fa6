"""The blob backend interface.

A backend stores immutable byte strings under digest keys. It does not hash
and it does not decide whether bytes are right: ``storage.blobs`` does that and
only calls ``Upload.commit`` once the digest has been verified. What a backend
must guarantee is that nothing is readable under a digest key before commit.

Every upload spools to a local file as it goes; followers of a fill in progress
read that file while it grows, whatever backend the bytes end up in. A small
blob verified in memory is handed over whole instead (``put``).

A backend raises only regcache's errors (``storage.errors``): a store that
cannot be reached or refuses a request is ``StoreUnavailable``, whatever client
library sits underneath. That holds for the replica seam too (fill and sweep
leases, ``ReplicaIndex``), so callers that can carry on without the other
replicas catch exactly that.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Protocol

from storage.oci.digest import Digest


class BlockingBody(Protocol):
    """A stored blob's body for a worker thread to copy on (``BlobBackend.open_body``)."""

    size: int

    def readinto(self, buffer: memoryview) -> int:
        """Blocks for the next bytes, put at the start of ``buffer``; 0 at the end. A body the
        store cuts short raises, never ends early."""

    def close(self) -> None:
        """Done with it (read to the end or not); idempotent."""


class Upload(abc.ABC):
    """One blob being written. Bytes go to ``spool_path`` in order."""

    spool_path: Path
    # The spool may be written around the page cache (storage.directio): its readers
    # open it for that too, while it still has this name.
    may_direct = False
    # Some bytes went to the spool file around the page cache: its readers read it the same way.
    direct = False

    @abc.abstractmethod
    def write_sync(self, data: bytes | memoryview) -> None:
        """Append bytes; called from a worker thread, or on the loop for a small batch."""

    async def reserve(self, size: int) -> None:  # noqa: B027 - optional hook
        """Claim space for ``size`` bytes up front; raise ``StoreFull`` when there is none."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the verified bytes visible under the digest (atomically)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Forget everything written; idempotent."""


class FillLease:
    """The right to fetch one blob from the upstream, held while the fill runs.

    A store shared by several replicas hands out one lease per digest at a
    time so that a cold blob is fetched once for all of them. This base class
    is the lease of a store nobody else writes to: it is always granted and
    releasing it does nothing.
    """

    async def release(self) -> None:
        """Give the lease up (the fill committed, failed or was cancelled); idempotent, never raises:
        a lease that cannot be deleted expires on its own."""


class BlobBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare the store and recover from a crash (remove leftovers)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and files."""

    @abc.abstractmethod
    async def stat(self, digest: Digest) -> int | None:
        """Size of the committed blob, or None when it is not there."""

    @abc.abstractmethod
    async def begin(self, digest: Digest) -> Upload:
        """Start an upload that will land under ``digest`` on commit."""

    async def put(self, digest: Digest, data: bytes) -> None:
        """Write and commit a whole small blob whose bytes are verified (``storage.blobs``).
        This default is an upload of one write; a backend may do it in fewer steps."""
        upload = await self.begin(digest)
        try:
            upload.write_sync(data)
            await upload.commit()
        except BaseException:
            await upload.abort()
            raise

    @abc.abstractmethod
    async def delete(self, digest: Digest) -> bool:
        """Remove a committed blob; False when it was not there."""

    @abc.abstractmethod
    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        """Stream committed bytes."""

    @abc.abstractmethod
    async def read_small(self, digest: Digest) -> bytes:
        """A whole small blob (manifests, configs)."""

    @abc.abstractmethod
    def list(self) -> AsyncIterator[tuple[Digest, int]]:
        """Every committed blob with its size (fsck, GC, rebuild)."""

    def local_path(self, digest: Digest) -> Path | None:
        """A path for sendfile when the bytes are on a local disk."""
        return None

    async def open_body(self, digest: Digest) -> BlockingBody | None:
        """The whole blob from a remote store, for a thread to copy to a client past the event
        loop; None when this backend has no such path (``read`` is the one that always works).
        Raises ``BlobUnknown`` or the store's error before anything is sent."""
        return None

    async def redirect_url(self, digest: Digest) -> str | None:
        """A short-lived URL a client may fetch the bytes from directly."""
        return None

    async def writable(self) -> bool:
        """Readiness: can a new blob be written now?"""
        return True

    # Replicas: several processes on one store (see storage.backends.s3) -----

    async def acquire_fill_lease(self, digest: Digest) -> FillLease | None:
        """The lease to fetch ``digest`` upstream, or None when another process holds it."""
        return FillLease()

    async def wait_for(self, digest: Digest) -> int | None:
        """After a lost lease: the blob's size once another process committed it, or
        None when that process gave up (its lease was released or expired)."""
        return await self.stat(digest)

    @property
    def shared(self) -> ReplicaIndex | None:
        """The tag and image records of the replicas on this store; None when this process is alone."""
        return None

    async def acquire_sweep_lease(self) -> FillLease | None:
        """The right to sweep a shared store, or None while another process sweeps it."""
        return FillLease()

    def list_with_times(self) -> AsyncIterator[tuple[Digest, int, float]]:
        """Every committed blob with its size and commit time (the store's clock, epoch seconds)."""
        raise NotImplementedError

    async def stat_with_time(self, digest: Digest) -> tuple[int, float] | None:
        """Size and commit time (the store's clock) of a committed blob, or None."""
        raise NotImplementedError

    async def now(self) -> float:
        """The store's clock (commit times in ``list_with_times`` are on it)."""
        return time.time()


class ReplicaIndex(abc.ABC):
    """Tag and image records every replica on a store can see.

    SQLite stays each replica's local index; these records are what the
    replicas agree on. ``upstream``/``repository`` are validated names. A
    missing record is None (or absent from a listing), never an error; a store
    that cannot answer raises ``StoreUnavailable``.
    """

    @abc.abstractmethod
    async def put_image(self, upstream: str, repository: str, digest: str, media_type: str) -> None: ...

    @abc.abstractmethod
    async def get_image(self, upstream: str, repository: str, digest: str) -> str | None:
        """The media type of a recorded image, or None."""

    @abc.abstractmethod
    async def put_tag(self, upstream: str, repository: str, tag: str, digest: str, checked_at: float) -> None: ...

    @abc.abstractmethod
    async def get_tag(self, upstream: str, repository: str, tag: str) -> tuple[str, float] | None:
        """(manifest digest, time last confirmed upstream) of a recorded tag, or None."""

    @abc.abstractmethod
    async def delete_image(self, upstream: str, repository: str, digest: str) -> None:
        """Remove the image record and every tag record pointing at it."""

    @abc.abstractmethod
    async def delete_tag(self, upstream: str, repository: str, tag: str) -> None:
        """Remove one tag record (``rmi name:tag`` while other tags keep the image)."""

    @abc.abstractmethod
    def tags(self) -> AsyncIterator[tuple[str, str, str, str, float]]:
        """Every tag record as (upstream, repository, tag, manifest digest, time last confirmed)."""

    def seen(self, upstream: str, repository: str, name: str) -> bool:
        """Whether this process saw the record of an image digest or tag ``name`` in the store
        (it wrote or listed it): then its absence now means another replica removed it."""
        return False

    @abc.abstractmethod
    def images(self) -> AsyncIterator[tuple[str, str, str]]:
        """Every recorded image as (upstream, repository, manifest digest): GC's shared truth."""
