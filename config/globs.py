"""Repository globs as access rules write them: ``library/*``, ``myorg/**``.

A glob is matched against a repository name that routing has already validated
against the distribution spec's grammar (lower case, no empty or dot components),
so a rule never sees ``..``, ``//``, ``%2F`` or a trailing slash. The grammar of a
glob is just as strict, and checked when the settings load: a glob in upper
case, with ``..`` or an empty component could never match a valid name, and a
rule that silently matches nothing is a hole in an allow list's owner's mind.

- ``*`` matches within one path component (``library/*`` matches ``library/busybox``,
  not ``library/a/b``);
- ``**`` as a whole component matches one or more components at the end
  (``myorg/**``: anything under ``myorg/``, not ``myorg`` itself), or zero or more
  in the middle (``myorg/**/tools``); ``**`` alone matches every repository.
"""

from __future__ import annotations

import re
from functools import lru_cache

_COMPONENT = re.compile(r"^[a-z0-9._*-]+$")


def check_glob(pattern: str) -> str:
    """``pattern`` if it is a valid glob, else ValueError saying what is wrong."""
    if not pattern:
        raise ValueError("a repository glob must not be empty")
    if pattern != pattern.lower():
        raise ValueError(f"repository glob {pattern!r}: repository names are lower case")
    for component in pattern.split("/"):
        if not component:
            raise ValueError(f"repository glob {pattern!r}: empty path component (leading, trailing or double '/')")
        if component in (".", ".."):
            raise ValueError(f"repository glob {pattern!r}: '.' and '..' are not repository names")
        if not _COMPONENT.match(component):
            raise ValueError(f"repository glob {pattern!r}: only a-z, 0-9, '.', '_', '-', '*' and '/'")
        if "**" in component and component != "**":
            raise ValueError(f"repository glob {pattern!r}: '**' must be a whole path component")
    return pattern


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    check_glob(pattern)
    components = pattern.split("/")
    parts: list[str] = []
    for index, component in enumerate(components):
        last = index == len(components) - 1
        if component == "**":
            # At the end: at least one component; elsewhere: any number, each with its '/'.
            parts.append(r"[^/]+(?:/[^/]+)*" if last else r"(?:[^/]+/)*")
            continue
        parts.append("[^/]*".join(re.escape(piece) for piece in component.split("*")))
        if not last:
            parts.append("/")
    return re.compile("".join(parts))


def matches(pattern: str, repository: str) -> bool:
    return compile_glob(pattern).fullmatch(repository) is not None
