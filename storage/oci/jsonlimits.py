"""JSON from untrusted sources, with a bound on nesting.

``json.loads`` recurses once per level of nesting, so a body of 50,000 ``[``
raises RecursionError, which no caller expects (it is not a ValueError) and
which would surface as a 500. ``loads`` measures the nesting first, outside
any string, and refuses a document deeper than ``MAX_DEPTH`` with
``JSONTooDeep``, a ValueError, so every ``except ValueError`` that turns bad
JSON into a typed error (ManifestInvalid, ArchiveInvalid, AdminInvalid,
UpstreamError) covers it too.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

# Real manifests, indexes, image configs and admin bodies nest under ten levels.
MAX_DEPTH = 64

# A JSON string, escapes included (the unrolled form is linear, with no backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _open in b"[{":
    _STEP[_open] = 1
for _close in b"]}":
    _STEP[_close] = -1


class JSONTooDeep(ValueError):
    """The document nests deeper than the limit."""


def depth(data: bytes) -> int:
    """How deep ``data`` nests: brackets outside strings, counted without recursion."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads``, refusing nesting deeper than ``max_depth`` before it can recurse."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Fewer opening brackets than the limit cannot nest past it: most documents stop here.
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(raw) > max_depth:
        raise JSONTooDeep(f"JSON nests deeper than {max_depth} levels")
    return json.loads(data)
