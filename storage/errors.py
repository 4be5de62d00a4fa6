"""Storage-domain errors.

These are plain types with no notion of HTTP; ``proxy.errors`` maps every one of
them to an OCI error code and status in a single table.
"""

from __future__ import annotations


class RegcacheError(Exception):
    """Base of every error regcache raises on purpose."""

    def __init__(self, message: str = "", detail: object | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        self.message = message or (self.__class__.__doc__ or "").strip().splitlines()[0]
        self.detail = detail


class DigestInvalid(RegcacheError):
    """Provided digest is malformed or uses an unsupported algorithm."""


class NameInvalid(RegcacheError):
    """Invalid repository name."""


class TagInvalid(RegcacheError):
    """Invalid tag or reference."""


class BlobUnknown(RegcacheError):
    """Blob unknown to registry."""


class ManifestUnknown(RegcacheError):
    """Manifest unknown."""


class ManifestInvalid(RegcacheError):
    """Manifest invalid."""


class NameUnknown(RegcacheError):
    """Repository name not known to registry."""


class DigestMismatch(RegcacheError):
    """Content does not match its digest."""


class SizeMismatch(RegcacheError):
    """Content length does not match the expected size."""


class StoreFull(RegcacheError):
    """No space left in the blob store."""


class StoreUnavailable(RegcacheError):
    """The blob store cannot be reached or refused a request."""


class StoreRejected(StoreUnavailable):
    """The store rejected a request it does not understand or support."""


class StoreObjectUnknown(RegcacheError):
    """No object under that key in the store."""


class StoreObjectExists(RegcacheError):
    """A write meant only for a new object found one already there."""


class ImagePinned(RegcacheError):
    """The image is pinned."""


class ArchiveInvalid(RegcacheError):
    """Archive is malformed or unsafe."""


class SpoolAborted(RegcacheError):
    """The blob's fill failed: its spool will never be the blob."""
