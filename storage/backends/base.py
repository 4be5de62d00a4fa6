"""The blob backend interface.

A backend stores immutable byte strings under digest keys. It does not hash
and it does not decide whether bytes are right: ``storage.blobs`` does that and
only calls ``Upload.commit`` once the digest has been verified. What a backend
must guarantee is that nothing is readable under a digest key before commit.

Every upload spools to a local file as it goes; followers of a fill in progress
read that file while it grows, whatever backend the bytes end up in.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from pathlib import Path

from storage.digest import Digest


class Upload(abc.ABC):
    """One blob being written. Bytes go to ``spool_path`` in order."""

    spool_path: Path

    @abc.abstractmethod
    def write_sync(self, data: bytes) -> None:
        """Append bytes; called from a worker thread."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the verified bytes visible under the digest (atomically)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Forget everything written; idempotent."""


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

    @abc.abstractmethod
    async def delete(self, digest: Digest) -> bool:
        """Remove a committed blob; False when it was not there."""

    @abc.abstractmethod
    def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
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

    async def redirect_url(self, digest: Digest) -> str | None:
        """A short-lived URL a client may fetch the bytes from directly."""
        return None

    async def writable(self) -> bool:
        """Readiness: can a new blob be written now?"""
        return True
