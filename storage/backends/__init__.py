"""Where blob bytes live. One small interface, a filesystem and an object-store implementation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.backends.base import BlobBackend, Upload

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["BlobBackend", "Upload", "make_backend"]


def make_backend(settings: Settings) -> BlobBackend:
    """The backend the settings name; the server and ``regcache fsck`` both open the store through it."""
    if settings.storage.backend == "s3":
        from storage.backends.s3.backend import S3Backend  # optional dependency

        assert settings.storage.s3 is not None
        return S3Backend(settings.storage.s3, settings.data_dir)
    from storage.backends.filesystem import FilesystemBackend

    return FilesystemBackend(settings.data_dir, direct_io=settings.storage.direct_io)
