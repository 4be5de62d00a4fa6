"""Repository names, tags and image references (distribution's reference grammar)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage.errors import NameInvalid, TagInvalid
from storage.oci.digest import Digest

# From the distribution spec: path components separated by "/", each
# [a-z0-9]+ joined by ".", "_", "__" or one or more "-".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
# Always fullmatch: with match and "$", a trailing newline would pass.
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# A registry host as distribution's reference grammar has it (DNS labels or an
# IPv6 literal in brackets), with an optional port.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
# distribution caps the whole name at 255 characters.
MAX_NAME_LENGTH = 255


def validate_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise NameInvalid(f"invalid repository name: {name[:300]!r}")
    return name


def validate_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise TagInvalid(f"invalid tag: {tag[:200]!r}")
    return tag


def validate_registry(host: str) -> str:
    if not _REGISTRY.fullmatch(host):
        raise NameInvalid(f"invalid registry name: {host[:300]!r}")
    return host


def is_tag(text: str) -> bool:
    return bool(_TAG.fullmatch(text))


@dataclass(frozen=True, slots=True)
class ManifestReference:
    """What follows ``/manifests/``: a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> ManifestReference:
        if ":" in text:
            return cls(digest=Digest.parse(text))
        return cls(tag=validate_tag(text))

    def __str__(self) -> str:
        return str(self.digest) if self.digest else str(self.tag)


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A user-facing image reference: ``[registry/]name[:tag][@digest]``.

    ``registry`` is only set when the first component looks like a host
    (contains "." or ":" or is "localhost"), as docker decides it.
    """

    registry: str | None
    name: str
    tag: str | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        rest = text
        digest = None
        if "@" in rest:
            rest, _, d = rest.partition("@")
            digest = Digest.parse(d)
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], validate_tag(rest[colon + 1 :])
        registry = None
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, rest = validate_registry(first), remainder
        return cls(registry, validate_name(rest), tag, digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.name}" if self.registry else self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
