"""Values the index hands out and takes back: image keys, blob rows, the store's summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from storage.index.database import Statement


class RepositoryName(NamedTuple):
    """A repository as the index names it. Writes take the name, not an id: the row is
    made in the transaction that records something in it, so a row always holds something
    (or did, until GC prunes it)."""

    upstream: str
    name: str


@dataclass(frozen=True, slots=True)
class ImageKey:
    """An image row: a manifest as present in a repository."""

    repository_id: int
    manifest: str


@dataclass(frozen=True, slots=True)
class ManifestRow:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True, slots=True)
class BlobRow:
    """A blob as the ``blobs`` table has it; a digest nothing but a manifest row names has no size."""

    digest: str
    size: int | None
    created_at: float | None
    last_access: float | None


@dataclass(frozen=True, slots=True)
class StoreSummary:
    size: int  # bytes of blobs
    blobs: int
    images: int
    pinned: int
    repositories: int  # those that hold an image


def image_removal(key: ImageKey) -> list[Statement]:
    """An image row goes with its tags in that repository: a tag must name an image. The
    referrers check of the image, and of the subject it refers to, goes too: what the cache
    holds for them changed, so the next referrers answer asks the upstream again."""
    args = (key.repository_id, key.manifest)
    return [
        ("DELETE FROM referrer_checks WHERE repository_id = ? AND (subject = ? OR subject IN "
         "(SELECT child FROM manifest_references WHERE manifest = ? AND kind = 'subject'))", (*args, key.manifest)),
        ("DELETE FROM tags WHERE repository_id = ? AND manifest = ?", args),
        ("DELETE FROM images WHERE repository_id = ? AND manifest = ?", args),
    ]
