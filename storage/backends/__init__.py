"""Where blob bytes live. One small interface, a filesystem and an object-store implementation."""

from storage.backends.base import BlobBackend, Upload

__all__ = ["BlobBackend", "Upload"]
