"""Reading 206 answers in tests: single parts and multipart/byteranges, strictly.

A part's length is taken from its ``Content-Range``, not found by looking for the
boundary, so a body whose framing is off by a byte fails here instead of being
read generously.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class Part:
    start: int
    data: bytes
    size: int  # of the whole blob, as the part says


def parts(status: int, headers: Mapping[str, str], body: bytes) -> list[Part]:
    """The parts of a 206 (one for a single range), checked for framing."""
    assert status == 206, status
    content_type = headers["Content-Type"]
    if not content_type.startswith("multipart/byteranges"):
        return [_part(headers["Content-Range"], body)]
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    found, rest, first = [], body, True
    while True:
        opener = (b"" if first else b"\r\n") + b"--" + boundary
        assert rest.startswith(opener), rest[:80]
        rest = rest[len(opener) :]
        if rest == b"--\r\n":
            return found
        head, sep, rest = rest[2:].partition(b"\r\n\r\n")
        assert sep, "part without a header end"
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        match = _CONTENT_RANGE.fullmatch(fields["Content-Range"])
        assert match is not None, fields
        length = int(match.group(2)) - int(match.group(1)) + 1
        found.append(_part(fields["Content-Range"], rest[:length]))
        rest, first = rest[length:], False


def _part(content_range: str, data: bytes) -> Part:
    match = _CONTENT_RANGE.fullmatch(content_range)
    assert match is not None, content_range
    start, last, size = (int(g) for g in match.groups())
    assert len(data) == last - start + 1, (content_range, len(data))
    return Part(start, data, size)


def covered(found: list[Part]) -> list[tuple[int, int]]:
    """The positions the parts carry, as merged (start, stop) spans; ``check_against``
    says whether the bytes there are right."""
    spans: list[tuple[int, int]] = []
    for start, stop in sorted((p.start, p.start + len(p.data)) for p in found):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((start, stop))
    return spans


def check_against(blob: bytes, found: list[Part]) -> None:
    """Every part is the blob's own bytes at its place."""
    for part in found:
        assert part.size == len(blob)
        assert part.data == blob[part.start : part.start + len(part.data)], part.start
