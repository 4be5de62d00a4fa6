"""Blobs, fill leases and replica records in an S3-compatible bucket."""

from storage.backends.s3.backend import S3Backend

__all__ = ["S3Backend"]
