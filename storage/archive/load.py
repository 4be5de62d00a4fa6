"""The archives ``load`` accepts, read as hostile input.

Accepted: OCI image layouts (``index.json``: regcache's own ``save``, docker 25+,
``podman save --format oci-archive``, skopeo ``oci-archive:``) and docker's
``manifest.json`` archives (the legacy ``docker save`` layout with
``<id>/layer.tar``, skopeo and podman ``docker-archive:``). When both indexes
are present the OCI one wins: it carries the registry's manifests byte for
byte, so every digest survives the trip.

A docker archive carries no registry manifest at all, only a config and layer
files, so the manifest is synthesized: a Docker schema2 manifest (compact JSON,
fixed key order) whose layers are the files exactly as archived. Layers that
``docker save`` wrote uncompressed stay uncompressed (media type
``...rootfs.diff.tar``): their digest is then the config's own ``diff_id``,
independent of any compressor's version or level, so loading the same image
twice, or into two caches, gives the same manifest digest. Gzipping them would
save space but tie every digest to this machine's zlib; the original registry
digests cannot be recovered either way.

The stream is read once. Members named ``blobs/<algorithm>/<hex>`` go straight
into the blob store through a verifying writer (their name is their digest);
small metadata files stay in memory (bounded); anything else (``layer.tar``)
is spooled to the data directory's ``tmp`` while being hashed, then copied
into the store through a verifying writer once something references it.
Links are aliases for other members and may not leave the archive. What is
kept per member until the end is bounded while streaming: the number of
members, the length of their names, and the metadata held in memory. Nothing
reaches the metadata here: ``LoadResult`` lists what to record, and the caller
commits it in one transaction, or calls ``remove`` to take out the blobs this
load wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from storage.archive.save import CONTAINERD_NAME, REF_NAME
from storage.archive.tar import GZIP_MAGIC, ZSTD_MAGIC, ByteSource, TarReader, decompressed
from storage.blobs import BlobStore
from storage.errors import ArchiveInvalid, DigestInvalid, DigestMismatch, ManifestInvalid, SizeMismatch
from storage.oci.digest import Digest
from storage.oci.jsonlimits import JSONTooDeep, loads
from storage.oci.manifests import (
    DOCKER_MANIFEST,
    IMAGE_TYPES,
    INDEX_TYPES,
    OCI_MANIFEST,
    ParsedManifest,
    parse_descriptor,
    parse_manifest,
)

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

# What a load keeps per member (its name, digest and where its bytes are) lives
# until the end of the archive, when the indexes can be read; these bound it.
# A save of hundreds of images has a few thousand members, with short names.
MAX_MEMBERS = 20_000
MAX_MEMBER_NAME = 1024
MAX_LINK_HOPS = 32


@dataclass(frozen=True, slots=True)
class LoadedManifest:
    digest: str
    size: int
    parsed: ParsedManifest


@dataclass(slots=True)
class LoadedImage:
    names: list[str]  # as the archive names the image (RepoTags, containerd name, ref.name)
    digest: str  # the manifest or index to tag
    image_id: str  # docker's image ID: the config digest (the index digest for an index)
    manifests: list[LoadedManifest]  # children before parents; the last one is ``digest``


@dataclass(slots=True)
class LoadResult:
    images: list[LoadedImage] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)  # every referenced blob: digest -> size
    written: int = 0  # blobs this load added to the store
    skipped: int = 0  # blobs the store already had


@dataclass(slots=True)
class _Content:
    digest: Digest
    size: int
    data: bytes | None = None  # small members, kept in memory
    spool: Path | None = None  # spooled, not yet in the store
    stored: bool = False


def _blob_member_digest(name: str) -> Digest | None:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return None
    try:
        return Digest.parse(f"{parts[1]}:{parts[2]}")
    except DigestInvalid:
        return None


def _is_small(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in ("index.json", "manifest.json", "repositories", "oci-layout", "json", "VERSION") or base.endswith(
        ".json"
    )


class ArchiveLoader:
    def __init__(
        self,
        store: BlobStore,
        tmp_dir: Path,
        *,
        max_metadata: int = 4 * 1024 * 1024,
        max_members: int = MAX_MEMBERS,
        max_buffered: int = 32 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.max_metadata = max_metadata  # one metadata file
        self.max_members = max_members
        self.max_buffered = max_buffered  # all metadata files held in memory together
        self._buffered = 0
        self.spool_dir = tmp_dir / f"load-{uuid.uuid4().hex}"
        self._entries: dict[str, _Content] = {}
        self._links: dict[str, str] = {}
        self._written: set[Digest] = set()
        self.result = LoadResult()

    # Reading the stream ----------------------------------------------------------------

    async def read(self, chunks: AsyncIterator[bytes]) -> LoadResult:
        """Read, verify and store the archive's blobs; say what to record. Raises ArchiveInvalid."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        reader = TarReader(ByteSource(decompressed(chunks)))
        count = 0
        while (member := await reader.next()) is not None:
            count += 1
            if count > self.max_members:
                raise ArchiveInvalid(f"archive has more than {self.max_members} members")
            if member.kind == "dir":
                continue
            if len(member.name) > MAX_MEMBER_NAME or len(member.target or "") > MAX_MEMBER_NAME:
                raise ArchiveInvalid(f"member {member.name[:100]!r}: name or link longer than {MAX_MEMBER_NAME}")
            if member.name in self._entries or member.name in self._links:
                raise ArchiveInvalid(f"member {member.name!r} appears twice")
            if member.kind in ("symlink", "hardlink"):
                assert member.target is not None
                self._links[member.name] = member.target
                continue
            digest = _blob_member_digest(member.name)
            if digest is not None:
                self._entries[member.name] = await self._store_member(member.name, member.size, digest, reader)
            elif _is_small(member.name):
                self._entries[member.name] = await self._buffer_member(member.name, member.size, reader)
            else:
                self._entries[member.name] = await self._spool_member(member.size, reader)
        if "index.json" in self._entries or "index.json" in self._links:
            await self._read_oci_layout()
        elif "manifest.json" in self._entries or "manifest.json" in self._links:
            await self._read_docker_archive()
        else:
            raise ArchiveInvalid("not an image archive: neither index.json (OCI layout) nor manifest.json (docker)")
        if not self.result.images:
            raise ArchiveInvalid("archive contains no images")
        self.result.written = len(self._written)
        return self.result

    async def _store_member(self, name: str, size: int, digest: Digest, reader: TarReader) -> _Content:
        stored = await self.store.stat(digest)
        if stored is not None:
            # Already verified in the store: the archive's copy is read past, not trusted.
            async for _ in reader.data():
                pass
            self.result.skipped += 1
            return _Content(digest, stored, stored=True)
        writer = await self.store.writer(digest, size)
        try:
            async for chunk in reader.data():
                await writer.write(chunk)
            await writer.finish()
        except (DigestMismatch, SizeMismatch) as exc:
            await writer.abort()
            raise ArchiveInvalid(f"{name}: content does not match its digest ({exc.message})") from None
        except BaseException:
            await writer.abort()
            raise
        self._written.add(digest)
        return _Content(digest, size, stored=True)

    async def _buffer_member(self, name: str, size: int, reader: TarReader) -> _Content:
        if size > self.max_metadata:
            raise ArchiveInvalid(f"{name} is {size} bytes, too large for image metadata ({self.max_metadata})")
        self._buffered += size
        if self._buffered > self.max_buffered:
            raise ArchiveInvalid(f"the archive's metadata files add up to more than {self.max_buffered} bytes")
        parts = [chunk async for chunk in reader.data()]
        data = b"".join(parts)
        return _Content(Digest.of(data), len(data), data=data)

    async def _spool_member(self, size: int, reader: TarReader) -> _Content:
        path = self.spool_dir / f"{len(self._entries)}"
        hasher = hashlib.sha256()
        with open(path, "xb") as out:

            def write(chunk: bytes) -> None:
                hasher.update(chunk)
                out.write(chunk)

            async for chunk in reader.data():
                await asyncio.to_thread(write, chunk)
        return _Content(Digest("sha256", hasher.hexdigest()), size, spool=path)

    # Members by name and by digest ------------------------------------------------------

    def _resolve(self, name: str, referrer: str) -> _Content:
        seen = 0
        while name in self._links:
            seen += 1
            if seen > MAX_LINK_HOPS:
                raise ArchiveInvalid(f"link loop at {name!r}")
            name = self._links[name]
        content = self._entries.get(name)
        if content is None:
            raise ArchiveInvalid(f"{referrer} refers to {name!r}, which is not in the archive")
        return content

    def _find(self, digest: Digest) -> _Content | None:
        name = f"blobs/{digest.algorithm}/{digest.hex}"
        if name not in self._entries and name not in self._links:
            return None
        return self._resolve(name, "index")

    async def _bytes(self, content: _Content, what: str) -> bytes:
        if content.size > self.max_metadata:
            raise ArchiveInvalid(f"{what} is {content.size} bytes, too large ({self.max_metadata})")
        if content.data is not None:
            return content.data
        if content.spool is not None:
            return await asyncio.to_thread(content.spool.read_bytes)
        return await self.store.read_small(content.digest)

    async def _head(self, content: _Content) -> bytes:
        if content.data is not None:
            return content.data[:4]
        if content.spool is not None:
            with open(content.spool, "rb") as f:
                return f.read(4)
        async for chunk in self.store.read(content.digest, 0, min(4, content.size)):
            return chunk
        return b""

    async def _ensure_stored(self, content: _Content) -> None:
        if content.stored:
            return
        if await self.store.stat(content.digest) is None:
            writer = await self.store.writer(content.digest, content.size)
            try:
                if content.data is not None:
                    await writer.write(content.data)
                else:
                    assert content.spool is not None
                    with open(content.spool, "rb") as f:
                        while chunk := await asyncio.to_thread(f.read, 1024 * 1024):
                            await writer.write(chunk)
                await writer.finish()
            except BaseException:
                await writer.abort()
                raise
            self._written.add(content.digest)
        else:
            self.result.skipped += 1
        content.stored = True

    async def _json(self, name: str) -> object:
        data = await self._bytes(self._resolve(name, "archive"), name)
        try:
            return loads(data)
        except JSONTooDeep as exc:
            raise ArchiveInvalid(f"{name}: {exc}") from None
        except (ValueError, UnicodeDecodeError):
            raise ArchiveInvalid(f"{name} is not valid JSON") from None

    # OCI image layout ------------------------------------------------------------------

    async def _read_oci_layout(self) -> None:
        index = await self._json("index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ArchiveInvalid("index.json has no manifests list")
        for raw in manifests:
            digest, size, media_type = _descriptor(raw, "index.json")
            collected: list[LoadedManifest] = []
            image_id = await self._walk(digest, size, media_type, collected)
            self.result.images.append(LoadedImage(_oci_names(raw), str(digest), image_id, collected))

    async def _walk(self, digest: Digest, size: int, media_type: str, out: list[LoadedManifest]) -> str:
        """Verify one manifest and what it references; children land in ``out`` before parents."""
        content = self._find(digest)
        if content is None:
            raise ArchiveInvalid(f"manifest {digest} is listed but not in the archive")
        _check_size(content, size, digest)
        try:
            parsed = parse_manifest(await self._bytes(content, f"manifest {digest}"), media_type or None)
        except ManifestInvalid as exc:
            raise ArchiveInvalid(f"manifest {digest}: {exc.message}") from None
        image_id = str(digest)
        if parsed.media_type in INDEX_TYPES:
            for child in parsed.children:
                # An index may list platforms the archive does not carry: pull-through fetches those.
                if self._find(child.digest) is not None and all(m.digest != str(child.digest) for m in out):
                    await self._walk(child.digest, child.size, child.media_type, out)
        elif parsed.media_type in IMAGE_TYPES:
            for ref in parsed.references:
                if ref.kind not in ("config", "layer"):
                    continue
                blob = self._find(ref.digest)
                if blob is None:
                    if "foreign" in ref.media_type or "nondistributable" in ref.media_type:
                        continue
                    raise ArchiveInvalid(f"{ref.kind} {ref.digest} of manifest {digest} is not in the archive")
                _check_size(blob, ref.size, ref.digest)
                await self._ensure_stored(blob)
                self.result.blobs[str(ref.digest)] = blob.size
            if parsed.config is not None:
                image_id = str(parsed.config.digest)
        else:
            raise ArchiveInvalid(f"manifest {digest} is {parsed.media_type}, which cannot be loaded")
        await self._ensure_stored(content)
        out.append(LoadedManifest(str(digest), content.size, parsed))
        return image_id

    # docker save ------------------------------------------------------------------------

    async def _read_docker_archive(self) -> None:
        entries = await self._json("manifest.json")
        if not isinstance(entries, list):
            raise ArchiveInvalid("manifest.json is not a list")
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
                raise ArchiveInvalid("manifest.json entry without a Config")
            layers = entry.get("Layers") or []
            tags = entry.get("RepoTags") or []
            if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
                raise ArchiveInvalid("manifest.json Layers is not a list of paths")
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ArchiveInvalid("manifest.json RepoTags is not a list of names")
            manifest = await self._synthesize(entry["Config"], layers)
            config_digest = str(manifest.parsed.config.digest) if manifest.parsed.config else manifest.digest
            self.result.images.append(LoadedImage(list(tags), manifest.digest, config_digest, [manifest]))

    async def _synthesize(self, config_path: str, layer_paths: list[str]) -> LoadedManifest:
        config = self._resolve(config_path, "manifest.json")
        try:
            doc = loads(await self._bytes(config, config_path))
            diff_ids = doc["rootfs"]["diff_ids"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            raise ArchiveInvalid(f"{config_path} is not an image config with rootfs.diff_ids") from None
        if not isinstance(diff_ids, list):
            raise ArchiveInvalid(f"{config_path}: rootfs.diff_ids is not a list")
        if len(diff_ids) != len(layer_paths):
            raise ArchiveInvalid(f"{config_path} lists {len(diff_ids)} diff_ids for {len(layer_paths)} layers")
        layers = []
        oci = False
        for path, diff_id in zip(layer_paths, diff_ids, strict=True):
            layer = self._resolve(path, "manifest.json")
            head = await self._head(layer)
            if head.startswith(GZIP_MAGIC):
                media_type = DOCKER_LAYER_GZIP
            elif head.startswith(ZSTD_MAGIC):
                media_type, oci = OCI_LAYER + "+zstd", True
            else:
                media_type = DOCKER_LAYER
                if str(layer.digest) != diff_id:
                    raise ArchiveInvalid(
                        f"layer {path} hashes to {layer.digest}, but the config's diff_id is {diff_id}"
                    )
            layers.append((media_type, layer))
        for _, layer in layers:
            await self._ensure_stored(layer)
            self.result.blobs[str(layer.digest)] = layer.size
        await self._ensure_stored(config)
        self.result.blobs[str(config.digest)] = config.size
        if oci:
            # Docker's schema2 has no zstd layer type: say it in OCI terms.
            rename = {DOCKER_LAYER: OCI_LAYER, DOCKER_LAYER_GZIP: OCI_LAYER + "+gzip"}
            layers = [(rename.get(m, m), layer) for m, layer in layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                "size": config.size,
                "digest": str(config.digest),
            },
            "layers": [{"mediaType": m, "size": layer.size, "digest": str(layer.digest)} for m, layer in layers],
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        content = _Content(Digest.of(data), len(data), data=data)
        await self._ensure_stored(content)
        return LoadedManifest(str(content.digest), len(data), parse_manifest(data))

    # Cleaning up -----------------------------------------------------------------------

    @property
    def written(self) -> set[str]:
        """Blobs this load added to the store."""
        return {str(d) for d in self._written}

    async def remove(self, digests: set[str]) -> None:
        """Delete blobs this load wrote: a rejected load's, or junk that no image references."""
        for digest in list(self._written):
            if str(digest) in digests:
                await self.store.delete(digest)
                self._written.discard(digest)

    def unreferenced(self) -> set[str]:
        """Blobs this load wrote that no loaded image references (junk members)."""
        referenced = set(self.result.blobs)
        for image in self.result.images:
            referenced.update(m.digest for m in image.manifests)
        return {str(d) for d in self._written} - referenced

    async def close(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.spool_dir, True)


def _descriptor(raw: object, where: str) -> tuple[Digest, int, str]:
    """A descriptor as manifests read it; in an archive its faults are the archive's."""
    try:
        descriptor = parse_descriptor(raw, "archive")
    except ManifestInvalid as exc:
        raise ArchiveInvalid(f"{where}: {exc.message}") from None
    return descriptor.digest, descriptor.size, descriptor.media_type


def _check_size(content: _Content, declared: int, digest: Digest) -> None:
    if content.size != declared:
        raise ArchiveInvalid(f"blob {digest} is {content.size} bytes, but its descriptor declares {declared}")


def _oci_names(raw: dict) -> list[str]:
    annotations = raw.get("annotations")
    if not isinstance(annotations, dict):
        return []
    full = annotations.get(CONTAINERD_NAME)
    if isinstance(full, str) and full:
        return [full]
    ref = annotations.get(REF_NAME)
    # A bare ref.name is only a tag (docker 25 writes them so): no repository to put it in.
    if isinstance(ref, str) and (":" in ref or "/" in ref):
        return [ref]
    return []
