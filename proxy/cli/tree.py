"""``regcache images --tree``: each image with its platforms and its referrers (signatures,
SBOMs, attestations) grouped by artifact type, drawn as a tree."""

from __future__ import annotations

from typing import Any


def render_tree(images: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for image in images:
        names = image.get("RepoTags") or image.get("RepoDigests") or [image["Digest"]]
        lines.append(f"{', '.join(names)}  {image['Digest']}")
        sections: list[tuple[str, list[tuple[str, list[str]]]]] = []
        children, platforms = image.get("Children") or [], image.get("Platforms") or []
        if children:
            # Platforms lists only children that name one: pair them only when every child does.
            labels = platforms if len(platforms) == len(children) else ["?"] * len(children)
            sections.append(("platforms", [(f"{p}  {d}", []) for p, d in zip(labels, children, strict=True)]))
        groups: dict[str, list[str]] = {}
        for referrer in image.get("Referrers") or []:
            kind = referrer.get("ArtifactType") or referrer.get("MediaType") or "?"
            groups.setdefault(kind, []).append(referrer["Digest"])
        if groups:
            sections.append(("referrers", [(kind, digests) for kind, digests in sorted(groups.items())]))
        for i, (title, entries) in enumerate(sections):
            last_section = i == len(sections) - 1
            lines.append(f"{'└── ' if last_section else '├── '}{title}")
            indent = "    " if last_section else "│   "
            for j, (label, leaves) in enumerate(entries):
                last_entry = j == len(entries) - 1
                lines.append(f"{indent}{'└── ' if last_entry else '├── '}{label}")
                inner = indent + ("    " if last_entry else "│   ")
                lines += [f"{inner}{'└── ' if k == len(leaves) - 1 else '├── '}{leaf}" for k, leaf in enumerate(leaves)]
    return "".join(line + "\n" for line in lines)
