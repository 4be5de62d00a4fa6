"""docker's way of showing images: units, relative times, and one row per name.

Sizes and durations follow docker's go-units (sizes in 1000-based units with
three significant digits, "3 days ago"); times as Go's ``Time.String()``.
Rows follow docker's CLI: an image gives one row per repository and tag
(with ``--digests``, per digest too), an untagged image one ``<none>`` row.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

_SIZE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
NONE = "<none>"

IMAGE_HEADERS = {
    "ID": "IMAGE ID",
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
    "LastPulled": "LAST PULLED",
    "LastPulledBy": "LAST PULLED BY",
    "Pulls": "PULLS",
    "Platforms": "PLATFORMS",
    "Pinned": "PINNED",
    "Upstream": "UPSTREAM",
}


def human_size(size: float, precision: int = 3) -> str:
    """go-units ``HumanSizeWithPrecision``: 1000-based, ``%.3g``."""
    unit = 0
    while size >= 1000.0 and unit < len(_SIZE_UNITS) - 1:
        size /= 1000.0
        unit += 1
    return f"{size:.{precision}g}{_SIZE_UNITS[unit]}"


def human_duration(seconds: float) -> str:
    """go-units ``HumanDuration``."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def since(epoch: float | None, now: float | None = None) -> str:
    if not epoch:
        return "N/A"
    return human_duration((now if now is not None else time.time()) - epoch) + " ago"


def go_time(epoch: float | None) -> str:
    """Go's ``time.Unix(t, 0).String()`` in the local zone: ``2024-01-01 00:00:00 +0000 UTC``."""
    if not epoch:
        return "N/A"
    moment = datetime.fromtimestamp(int(epoch)).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %z ") + (moment.tzname() or "")


def short_id(image_id: str) -> str:
    return image_id.partition(":")[2][:12] if ":" in image_id else image_id[:12]


def _split_ref(ref: str, sep: str) -> tuple[str, str]:
    if sep == ":":
        slash = ref.rfind("/")
        colon = ref.rfind(":")
        if colon > slash:
            return ref[:colon], ref[colon + 1 :]
        return ref, ""
    name, _, rest = ref.partition("@")
    return name, rest


def image_rows(
    images: Sequence[Mapping[str, Any]], *, digests: bool, no_trunc: bool, now: float | None = None
) -> list[dict[str, Any]]:
    """docker's ``imageFormat``: rows for the template, in docker's order, deterministic."""
    rows: list[dict[str, Any]] = []
    for image in images:
        entries: list[tuple[str, str, str]] = []
        tags: dict[str, list[str]] = {}
        repo_digests: dict[str, list[str]] = {}
        for ref in image.get("RepoTags") or []:
            name, tag = _split_ref(ref, ":")
            tags.setdefault(name, []).append(tag)
        for ref in image.get("RepoDigests") or []:
            name, digest = _split_ref(ref, "@")
            repo_digests.setdefault(name, []).append(digest)
        if not tags and not repo_digests:
            entries.append((NONE, NONE, NONE))
        for name, repo_tags in tags.items():
            found = repo_digests.pop(name, [])
            for tag in repo_tags:
                if digests and found:
                    entries += [(name, tag, d) for d in found]
                else:
                    entries.append((name, tag, NONE))
        for name, found in repo_digests.items():
            if digests:
                entries += [(name, NONE, d) for d in found]
            else:
                entries.append((name, NONE, ""))
        for repository, tag, digest in entries:
            rows.append(_row(image, repository, tag, digest, no_trunc, now))
    return rows


def _row(
    image: Mapping[str, Any], repository: str, tag: str, digest: str, no_trunc: bool, now: float | None
) -> dict[str, Any]:
    image_id = image.get("Id") or ""
    created = image.get("Created")
    platforms = image.get("Platforms") or []
    return {
        "ID": image_id if no_trunc else short_id(image_id),
        "Repository": repository,
        "Tag": tag,
        "Digest": digest,
        "CreatedSince": since(created, now),
        "CreatedAt": go_time(created),
        "Size": human_size(image.get("Size") or 0),
        "LastPulled": since(image.get("LastPulled"), now),
        # user:NAME, token:NAME, admin:NAME, upstream:NAME or anonymous; N/A before any client pulled it.
        "LastPulledBy": image.get("LastPulledBy") or "N/A",
        "Pulls": image.get("Pulls", 0),
        "Platforms": ",".join(platforms) if platforms else (image.get("Platform") or ""),
        "Pinned": bool(image.get("Pinned")),
        "Upstream": ",".join(image.get("Upstreams") or []),
        # docker's {{json .}} keys for the columns regcache has no equivalent of.
        "Containers": "N/A",
        "SharedSize": "N/A",
        "UniqueSize": "N/A",
        "VirtualSize": human_size(image.get("Size") or 0),
    }


def default_images_format(*, digests: bool, quiet: bool, show_platforms: bool, pulled_by: bool = False) -> str:
    if quiet:
        return "{{.ID}}"
    columns = ["{{.Repository}}", "{{.Tag}}"]
    if digests:
        columns.append("{{.Digest}}")
    columns += ["{{.ID}}", "{{.CreatedSince}}", "{{.Size}}", "{{.LastPulled}}"]
    if pulled_by:
        columns.append("{{.LastPulledBy}}")
    columns.append("{{.Pulls}}")
    if show_platforms:
        columns.append("{{.Platforms}}")
    return "table " + "\\t".join(columns)
