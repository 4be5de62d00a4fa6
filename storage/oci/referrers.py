"""Referrers as data (OCI distribution spec 1.1): the index that lists the manifests whose
``subject`` is a digest, the fallback tag that stands for it on registries without the API,
and the descriptors read out of either.

A descriptor in a referrers index carries the referrer's ``artifactType`` (its own field,
else its config's media type) and its ``annotations``, so a client can choose without
fetching every manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from storage.errors import DigestInvalid, ManifestInvalid
from storage.oci.digest import Digest
from storage.oci.jsonlimits import JSONTooDeep, loads
from storage.oci.manifests import OCI_INDEX

FILTERS_HEADER = "OCI-Filters-Applied"


@dataclass(frozen=True, slots=True)
class Referrer:
    """One entry of a referrers index."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: dict[str, str] | None

    def descriptor(self) -> dict[str, object]:
        out: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


def fallback_tag(subject: Digest) -> str:
    """The tag a registry without the API keeps the referrers index under: ``sha256-<hex>``."""
    return f"{subject.algorithm}-{subject.hex}"


def subject_of_fallback_tag(tag: str) -> Digest | None:
    """The subject a fallback tag stands for, None for any other tag."""
    algorithm, sep, encoded = tag.partition("-")
    if not sep:
        return None
    try:
        return Digest.parse(f"{algorithm}:{encoded}")
    except DigestInvalid:
        return None


def referrer_of(digest: str, media_type: str, data: bytes) -> Referrer:
    """The descriptor of a stored manifest that has a ``subject``, read from its own bytes."""
    try:
        doc = loads(data)
    except (JSONTooDeep, ValueError, UnicodeDecodeError):
        raise ManifestInvalid(f"referrer {digest} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"referrer {digest} is not a JSON object")
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
    return Referrer(digest, media_type, len(data), _text(artifact_type), _annotations(doc.get("annotations")))


def referrers_in_index(data: bytes) -> list[Referrer]:
    """The entries of a referrers index as an upstream (API or fallback tag) served it.

    Entries that are not valid descriptors are dropped: one bad entry must not
    hide the signatures listed next to it.
    """
    try:
        doc = loads(data)
    except (JSONTooDeep, ValueError, UnicodeDecodeError):
        raise ManifestInvalid("referrers index is not valid JSON") from None
    entries = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ManifestInvalid("referrers index has no manifests list")
    out = []
    for raw in entries:
        if not isinstance(raw, dict):
            continue
        size = raw.get("size")
        try:
            digest = str(Digest.parse(str(raw.get("digest", ""))))
        except DigestInvalid:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            continue
        media_type = _text(raw.get("mediaType")) or ""
        out.append(Referrer(digest, media_type, size, _text(raw.get("artifactType")),
                            _annotations(raw.get("annotations"))))
    return out


def referrers_index(referrers: Iterable[Referrer]) -> bytes:
    """The response body: an OCI image index of the referrers' descriptors."""
    manifests = [r.descriptor() for r in referrers]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                      separators=(",", ":")).encode()


def merge(*sources: Iterable[Referrer]) -> list[Referrer]:
    """One entry per digest, the first source's where several list it, in digest order (stable pages)."""
    seen: dict[str, Referrer] = {}
    for source in sources:
        for referrer in source:
            seen.setdefault(referrer.digest, referrer)
    return [seen[d] for d in sorted(seen)]


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _annotations(value: object) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    kept = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return kept or None
