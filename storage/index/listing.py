"""The cache as a list of images: what ``images`` shows, read from the metadata.

An image here is a stored manifest (or index) with every repository and tag
that points at it, like docker's image summary: the ID is the config digest,
the size is what a pull transfers (config plus layers, compressed), and the
creation time comes from the image config. That time is not known when the
manifest is recorded (the config blob may arrive later or never), so it is
read from the stored config blob the first time a listing needs it and kept
in ``manifests.created``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage.blobs import BlobStore
from storage.errors import BlobUnknown, DigestInvalid, ManifestInvalid
from storage.index.database import Database
from storage.oci.digest import Digest
from storage.oci.jsonlimits import loads
from storage.oci.manifests import INDEX_TYPES
from storage.oci.referrers import referrer_of

if TYPE_CHECKING:
    from storage.index.metadata import Metadata

log = logging.getLogger("regcache.listing")

# A config blob larger than this is not an image config worth parsing for a date.
MAX_CONFIG_READ = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RepoTag:
    upstream: str
    repository: str
    tag: str


@dataclass(slots=True)
class CachedImage:
    digest: str  # manifest or index digest
    media_type: str
    config_digest: str | None
    created: str | None  # RFC 3339, from the image config
    size: int  # compressed bytes a pull transfers
    platform: str | None
    repositories: list[tuple[str, str]] = field(default_factory=list)  # (upstream, name) holding it
    tags: list[RepoTag] = field(default_factory=list)
    children: list[tuple[str, str | None]] = field(default_factory=list)  # index: (digest, platform)
    parents: list[str] = field(default_factory=list)  # indexes that list this manifest
    subject: str | None = None  # a referrer (signature, SBOM, fallback tag index): what it refers to
    artifact_type: str | None = None  # a referrer's, when its manifest could be read
    referrers: list[str] = field(default_factory=list)  # cached manifests whose subject this is
    first_pulled: float = 0.0
    last_pulled: float = 0.0
    last_pulled_by: str | None = None  # the identity of the latest client pull, as the access log names it
    pulls: int = 0
    pinned: bool = False

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def image_id(self) -> str:
        """docker's image ID: the config digest; an index is known by its own digest."""
        return self.config_digest or self.digest

    @property
    def is_child(self) -> bool:
        """Present only as a platform of a cached index (docker's intermediate image)."""
        return bool(self.parents) and not self.tags


@dataclass(frozen=True, slots=True)
class ImageInRepository:
    """One image row with its repository and its manifest's details."""

    upstream: str
    repository: str
    digest: str
    first_pulled: float
    last_pulled: float
    last_pulled_by: str | None
    pulls: int
    pinned: bool
    media_type: str
    config_digest: str | None
    content_size: int | None
    created: str | None
    platform: str | None


class ListingQueries:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def images(self) -> list[ImageInRepository]:
        rows = await self._db.all(
            "SELECT r.upstream, r.name, i.manifest, i.first_pulled, i.last_pulled, i.last_pulled_by, i.pull_count, "
            "i.pinned, m.media_type, m.config_digest, m.content_size, m.created, m.platform "
            "FROM images i JOIN repositories r ON r.id = i.repository_id JOIN manifests m ON m.digest = i.manifest "
            "ORDER BY r.upstream, r.name",
        )
        return [
            ImageInRepository(upstream, name, digest, first, last, by, pulls, bool(pinned), *manifest)
            for upstream, name, digest, first, last, by, pulls, pinned, *manifest in rows
        ]

    async def tags(self) -> list[tuple[RepoTag, str]]:
        """Every tag with the manifest it points at."""
        rows = await self._db.all(
            "SELECT r.upstream, r.name, t.tag, t.manifest FROM tags t JOIN repositories r ON r.id = t.repository_id "
            "ORDER BY r.upstream, r.name, t.tag",
        )
        return [(RepoTag(upstream, name, tag), digest) for upstream, name, tag, digest in rows]

    async def index_children(self) -> list[tuple[str, str, str | None]]:
        """(index, child manifest, its platform)."""
        return await self._db.all("SELECT manifest, child, platform FROM manifest_references WHERE kind = 'manifest'")

    async def child_blobs(self) -> list[tuple[str, str, int | None]]:
        """(child manifest of an index, config or layer, its descriptor's size)."""
        return await self._db.all(
            "SELECT manifest, child, size FROM manifest_references WHERE kind IN ('config', 'layer') "
            "AND manifest IN (SELECT child FROM manifest_references WHERE kind = 'manifest')",
        )


async def list_images(metadata: Metadata, store: BlobStore | None = None) -> list[CachedImage]:
    """Every image in the cache with its tags, sizes and access statistics."""
    images: dict[str, CachedImage] = {}
    for row in await metadata.listing.images():
        image = images.get(row.digest)
        if image is None:
            image = images[row.digest] = CachedImage(
                row.digest, row.media_type, row.config_digest, row.created, row.content_size or 0, row.platform,
                first_pulled=row.first_pulled,
            )
        image.repositories.append((row.upstream, row.repository))
        image.first_pulled = min(image.first_pulled, row.first_pulled)
        if row.last_pulled_by is not None and (image.last_pulled_by is None or row.last_pulled >= image.last_pulled):
            image.last_pulled_by = row.last_pulled_by  # the repository pulled most recently tells who
        image.last_pulled = max(image.last_pulled, row.last_pulled)
        image.pulls += row.pulls
        image.pinned = image.pinned or row.pinned
    for tag, digest in await metadata.listing.tags():
        if digest in images:
            images[digest].tags.append(tag)
    for parent, child, platform in await metadata.listing.index_children():
        if parent in images:
            images[parent].children.append((child, platform))
            if child in images:
                images[child].parents.append(parent)
    for subject, referrer in await metadata.referrers.edges():
        if referrer in images:
            images[referrer].subject = subject
            if subject in images:
                images[subject].referrers.append(referrer)
    if store is not None:
        await _learn_created(metadata, store, [i for i in images.values() if i.created is None and i.config_digest])
        await _learn_artifact_types(store, [i for i in images.values() if i.subject is not None])
    await _index_details(metadata, images)
    return list(images.values())


async def _learn_created(metadata: Metadata, store: BlobStore, pending: list[CachedImage]) -> None:
    for image in pending:
        assert image.config_digest is not None
        try:
            digest = Digest.parse(image.config_digest)
            size = await store.stat(digest)
            if size is None or size > MAX_CONFIG_READ:
                continue
            config = loads(await store.read_small(digest))
        except (BlobUnknown, DigestInvalid, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(config, dict):
            continue
        created = config.get("created") if isinstance(config.get("created"), str) else None
        platform = None
        if isinstance(config.get("os"), str) and isinstance(config.get("architecture"), str):
            platform = f"{config['os']}/{config['architecture']}"
            if isinstance(config.get("variant"), str) and config["variant"]:
                platform += f"/{config['variant']}"
        image.created = created or image.created
        image.platform = image.platform or platform
        if created or platform:
            await metadata.set_manifest_details(image.digest, created, platform)


async def _learn_artifact_types(store: BlobStore, referrers: list[CachedImage]) -> None:
    for image in referrers:
        try:
            data = await store.read_small(Digest.parse(image.digest))
            image.artifact_type = referrer_of(image.digest, image.media_type, data).artifact_type
        except (BlobUnknown, DigestInvalid, ManifestInvalid):
            continue


async def _index_details(metadata: Metadata, images: dict[str, CachedImage]) -> None:
    """An index: created is its newest child's, size the distinct blobs of the children cached."""
    indexes = [i for i in images.values() if i.is_index]
    if not indexes:
        return
    blob_sizes: dict[str, dict[str, int]] = {}
    for manifest, child, size in await metadata.listing.child_blobs():
        blob_sizes.setdefault(manifest, {})[child] = max(size or 0, 0)
    for index in indexes:
        distinct: dict[str, int] = {}
        created: list[str] = []
        for child, _ in index.children:
            distinct.update(blob_sizes.get(child, {}))
            known = images.get(child)
            if known is not None and known.created:
                created.append(known.created)
        index.size = sum(distinct.values())
        index.created = max(created) if created else index.created
