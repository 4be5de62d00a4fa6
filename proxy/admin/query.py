"""Which cached images a docker-style request means: names, references, filters.

This follows dockerd's own rules so that ``regcache images`` answers what
``docker images`` would for the same images:

- names are *familiar*: a repository of the default upstream is shown as
  clients name it (``alpine`` for Docker Hub's ``library/alpine``), others
  with the upstream in front, as the catalog does;
- ``reference=`` patterns use Go's ``path.Match`` (``*`` never crosses
  ``/``) against ``name:tag`` and then against the bare name, and only the
  references that match are kept on the image;
- ``dangling=true`` means no tag points at the image any more (``false``
  keeps every image that has a name, as dockerd does);
  ``before=``/``since=`` compare creation times strictly;
- ``IMAGE`` arguments are ``name[:tag]`` (``latest`` by default),
  ``name@digest``, a bare digest, or a prefix of the image ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.errors import AdminConflict, AdminInvalid, AdminNotFound
from proxy.pull.routing import Router
from storage.errors import RegcacheError
from storage.index.listing import CachedImage
from storage.oci.reference import ImageReference

FILTERS = ("dangling", "before", "since", "reference", "upstream")


def familiar_name(router: Router, upstream: str, repository: str) -> str:
    name = router.client_name(upstream, repository)
    if router.default.name == upstream and router.default.is_docker_hub and name.startswith("library/"):
        rest = name.removeprefix("library/")
        if "/" not in rest:
            return rest
    return name


def created_epoch(created: str | None) -> float | None:
    """RFC 3339 (with nanoseconds, as Go writes it) to seconds, or None."""
    if not created:
        return None
    text = created.strip().replace("Z", "+00:00").replace("z", "+00:00")
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)", text)
    if match:  # Python parses at most microseconds
        frac = (match.group(2) or "")[:7]
        text = match.group(1) + frac + match.group(3)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's ``path.Match`` syntax as a regular expression; a malformed pattern is an error."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= len(pattern):
                raise AdminInvalid(f"bad pattern {pattern!r}: trailing backslash")
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = i + 1
            negate = end < len(pattern) and pattern[end] == "^"
            if negate:
                end += 1
            body = []
            while end < len(pattern) and pattern[end] != "]":
                if pattern[end] == "\\" and end + 1 < len(pattern):
                    end += 1
                body.append(re.escape(pattern[end]) if pattern[end] != "-" else "-")
                end += 1
            if end >= len(pattern) or not body:
                raise AdminInvalid(f"bad pattern {pattern!r}: unterminated character class")
            out.append(("[^/" if negate else "[") + "".join(body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Ref:
    """One name an image is known by: ``name:tag`` or ``name@digest``."""

    upstream: str
    repository: str
    name: str  # familiar
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else f"{self.name}@{self.digest}"


def refs_of(image: CachedImage, router: Router) -> list[Ref]:
    refs = [
        Ref(t.upstream, t.repository, familiar_name(router, t.upstream, t.repository), tag=t.tag) for t in image.tags
    ]
    refs += [Ref(u, r, familiar_name(router, u, r), digest=image.digest) for u, r in image.repositories]
    return sorted(refs, key=lambda r: str(r))


def parse_filters(values: list[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for value in values:
        key, sep, arg = value.partition("=")
        if not sep or key not in FILTERS:
            raise AdminInvalid(f"invalid filter '{value}'")
        filters.setdefault(key, []).append(arg)
    for arg in filters.get("dangling", []):
        if arg not in ("true", "false"):
            raise AdminInvalid(f"invalid filter 'dangling={arg}'")
    return filters


class Resolver:
    """Finds the image an ``IMAGE`` argument names, as docker's daemon does."""

    def __init__(self, images: list[CachedImage], router: Router) -> None:
        self.images = images
        self.router = router

    def find(self, text: str) -> tuple[CachedImage, Ref | None]:
        """The image, and the reference the text named (None for an ID or bare digest)."""
        text = text.strip()
        if re.fullmatch(r"(sha256:)?[0-9a-f]{64}", text):
            found = self._by_id(text)
            if found is None:
                raise AdminNotFound(f"No such image: {text}")
            return found, None
        try:
            ref: ImageReference | None = ImageReference.parse(text)
        except RegcacheError:
            ref = None
        if ref is not None:
            found_ref = self._by_reference(ref)
            if found_ref is not None:
                return found_ref
        # Names first, then image ID prefixes, as dockerd looks them up.
        if re.fullmatch(r"[0-9a-f]{1,63}", text):
            found = self._by_id(text)
            if found is not None:
                return found, None
        raise AdminNotFound(f"No such image: {text}")

    def _by_reference(self, ref: ImageReference) -> tuple[CachedImage, Ref] | None:
        name = f"{ref.registry}/{ref.name}" if ref.registry else ref.name
        for image in self.images:
            for known in refs_of(image, self.router):
                if not self._same_name(known, name):
                    continue
                if ref.digest is not None and known.digest == str(ref.digest):
                    return image, known
                if ref.digest is None and known.tag == (ref.tag or "latest"):
                    return image, known
        return None

    def _same_name(self, known: Ref, name: str) -> bool:
        if known.name == name:
            return True
        # "library/alpine" and "docker.io/library/alpine" mean "alpine" on a Docker Hub default.
        try:
            route = self.router.resolve(name.removeprefix("docker.io/"))
        except RegcacheError:
            return False
        return (route.upstream_name, route.repository) == (known.upstream, known.repository)

    def _by_id(self, text: str) -> CachedImage | None:
        hex_part = text.removeprefix("sha256:")
        if text.startswith("sha256:") and len(hex_part) == 64:
            matches = [i for i in self.images if hex_part in (_hex(i.image_id), _hex(i.digest))]
        else:
            matches = [i for i in self.images if _hex(i.image_id).startswith(hex_part)]
        if not matches:
            return None
        ids = {i.image_id for i in matches}
        if len(ids) > 1:
            raise AdminConflict(f"conflict: multiple images match {text}; give more of the ID")
        # Several manifests may share one config (the same image in OCI and Docker form).
        return max(matches, key=lambda i: (not i.is_child, len(i.tags)))


def _hex(digest: str) -> str:
    return digest.partition(":")[2] or digest


def select(
    images: list[CachedImage], router: Router, filters: dict[str, list[str]], all_images: bool
) -> list[dict[str, Any]]:
    """docker's ``ImageSummary`` for each image that passes, newest first."""
    resolver = Resolver(images, router)
    before = _bound(resolver, filters.get("before"))
    since = _bound(resolver, filters.get("since"))
    dangling_only = "true" in filters.get("dangling", [])
    patterns = [glob_regex(p) for p in filters.get("reference", [])]
    upstreams = set(filters.get("upstream", []))
    out: list[tuple[float, CachedImage, dict[str, Any]]] = []
    by_digest = {image.digest: image for image in images}
    for image in images:
        if image.subject is not None:
            continue  # a signature, SBOM or attestation: shown under its subject, not as an image
        created = created_epoch(image.created)
        if before is not None and (created is None or created >= before):
            continue
        if since is not None and (created is None or created <= since):
            continue
        if upstreams and not any(u in upstreams for u, _ in image.repositories):
            continue
        refs = [r for r in refs_of(image, router) if not upstreams or r.upstream in upstreams]
        if patterns:
            refs = [r for r in refs if any(p.fullmatch(str(r)) or p.fullmatch(r.name) for p in patterns)]
            if not refs:
                continue
        tags = [str(r) for r in refs if r.tag]
        if image.is_child and not all_images:
            continue
        # dockerd: dangling=true keeps images without a tag; dangling=false drops only images
        # with no name at all, which a cache never has (every image is in a repository).
        if dangling_only and tags:
            continue
        referrers = [by_digest[d] for d in image.referrers if d in by_digest]
        out.append((created or 0.0, image, summary(image, refs, created, referrers)))
    out.sort(key=lambda item: (-item[0], -item[1].last_pulled, item[1].digest))
    return [s for _, _, s in out]


def _bound(resolver: Resolver, values: list[str] | None) -> float | None:
    if not values:
        return None
    image, _ = resolver.find(values[-1])
    created = created_epoch(image.created)
    if created is None:
        raise AdminInvalid(f"{values[-1]}: creation time unknown (its config is not cached)")
    return created


def summary(
    image: CachedImage, refs: list[Ref], created: float | None, referrers: list[CachedImage]
) -> dict[str, Any]:
    return {
        "Id": image.image_id,
        "Digest": image.digest,
        "MediaType": image.media_type,
        "RepoTags": [str(r) for r in refs if r.tag],
        "RepoDigests": [str(r) for r in refs if r.digest],
        "Created": int(created) if created is not None else None,
        "CreatedAt": image.created,
        "Size": image.size,
        "Platform": image.platform,
        "Platforms": [p for _, p in image.children if p],
        "Children": [d for d, _ in image.children],
        "Upstreams": sorted({u for u, _ in image.repositories}),
        "LastPulled": image.last_pulled,
        "LastPulledBy": image.last_pulled_by,
        "Pulls": image.pulls,
        "Pinned": image.pinned,
        "Referrers": [{"Digest": r.digest, "MediaType": r.media_type, "ArtifactType": r.artifact_type}
                      for r in sorted(referrers, key=lambda r: (r.artifact_type or "", r.digest))],
    }
