"""Manifests as data: media types, and the descriptors a manifest references.

regcache never rewrites a manifest; it only reads it to learn what it points
at (for linking, reference counting and listing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from storage.errors import DigestInvalid, ManifestInvalid
from storage.oci.digest import Digest
from storage.oci.jsonlimits import JSONTooDeep, loads

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES | {DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED}

# What regcache asks upstreams for: every modern type, so the upstream never
# down-converts, whatever the client that caused the fetch accepts.
UPSTREAM_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1)


@dataclass(frozen=True, slots=True)
class Descriptor:
    digest: Digest
    size: int
    media_type: str
    kind: str  # "config", "layer", "manifest" (index child) or "subject"
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    references: list[Descriptor] = field(default_factory=list)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def config(self) -> Descriptor | None:
        return next((d for d in self.references if d.kind == "config"), None)

    @property
    def layers(self) -> list[Descriptor]:
        return [d for d in self.references if d.kind == "layer"]

    @property
    def children(self) -> list[Descriptor]:
        return [d for d in self.references if d.kind == "manifest"]


def platform_string(platform: object) -> str | None:
    if not isinstance(platform, dict):
        return None
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def parse_descriptor(raw: object, kind: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ManifestInvalid("descriptor is not an object")
    try:
        digest = Digest.parse(str(raw.get("digest", "")))
    except DigestInvalid as exc:
        raise ManifestInvalid(f"descriptor digest: {exc.message}") from None
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"descriptor {digest} has no valid size")
    return Descriptor(digest, size, str(raw.get("mediaType") or ""), kind, platform_string(raw.get("platform")))


def parse_manifest(data: bytes, media_type: str | None = None) -> ParsedManifest:
    """Media type (the document's own field wins over a Content-Type) and references."""
    try:
        doc = loads(data)
    except JSONTooDeep as exc:
        raise ManifestInvalid(f"manifest: {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise ManifestInvalid("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    declared = doc.get("mediaType")
    kind = declared if isinstance(declared, str) and declared else media_type
    if not kind or kind not in MANIFEST_TYPES:
        # OCI allows mediaType to be absent: tell an index from a manifest by shape.
        if "manifests" in doc:
            kind = OCI_INDEX
        elif "layers" in doc or "config" in doc:
            kind = OCI_MANIFEST
        elif doc.get("schemaVersion") == 1:
            kind = DOCKER_SCHEMA1_SIGNED if "signatures" in doc else DOCKER_SCHEMA1
        else:
            raise ManifestInvalid("unknown manifest type")
    refs: list[Descriptor] = []
    if kind in INDEX_TYPES:
        for child in doc.get("manifests") or []:
            refs.append(parse_descriptor(child, "manifest"))
    elif kind in IMAGE_TYPES:
        if "config" in doc:
            refs.append(parse_descriptor(doc["config"], "config"))
        for layer in doc.get("layers") or []:
            refs.append(parse_descriptor(layer, "layer"))
    else:
        # schema1: layers are listed as fsLayers without sizes.
        for layer in doc.get("fsLayers") or []:
            if isinstance(layer, dict):
                try:
                    refs.append(Descriptor(Digest.parse(str(layer.get("blobSum"))), -1, "", "layer"))
                except DigestInvalid:
                    raise ManifestInvalid("schema1 layer digest is malformed") from None
    if isinstance(doc.get("subject"), dict):
        refs.append(parse_descriptor(doc["subject"], "subject"))
    # A layer listed twice (empty layers) is one reference.
    unique = list({(d.digest, d.kind): d for d in refs}.values())
    return ParsedManifest(kind, unique)


def accepts(accept: Sequence[str], media_type: str) -> bool:
    """Whether a client that sent these Accept values can take ``media_type``.

    No Accept at all means "anything" (curl, crane); schema1 clients are long gone.
    """
    if not accept:
        return True
    for value in accept:
        if value in ("*/*", media_type) or (value == "application/json" and media_type in MANIFEST_TYPES):
            return True
    return False


def merge_accept(header_values: list[str]) -> list[str]:
    """Several Accept lines (docker) or one comma list (containerd) -> media types."""
    out: list[str] = []
    for line in header_values:
        for part in line.split(","):
            media = part.split(";", 1)[0].strip()
            if media and media not in out:
                out.append(media)
    return out
