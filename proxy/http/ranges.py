"""Byte ranges of a blob (RFC 9110 section 14): the ``Range`` header, resolved, framed.

Every blob response takes its ranges from here, whatever holds the bytes (a
file, an object store, a fill's spool, the upstream), so a range means the same
on a cold, a filling and a cached blob.

Choices the RFC leaves to the server, and why:

- A ``Range`` that cannot be parsed, names another unit or asks for more than
  ``MAX_RANGES`` ranges is ignored and the whole blob is sent (14.2 allows it):
  a client always gets correct bytes, never an error for an odd header.
- Ranges that start past the end are dropped; if none is left the answer is
  416 with ``Content-Range: bytes */<size>`` (15.5.17).
- Overlapping ranges are coalesced (15.3.7.2): the answer never carries a byte
  twice, so many overlapping ranges cannot make a response larger than the blob.
  Ranges that do not overlap keep the order the client asked for.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

from proxy.errors import RangeNotSatisfiable

# podman's zstd:chunked partial pulls merge their chunks into at most 1024 ranges
# per request (containers/storage pkg/chunked): that many must be honoured.
MAX_RANGES = 1024
# Positions are capped here: past the end of any blob, and int() of a few thousand
# digits would be slow (Python refuses longer ones).
_FAR = 10**19
OCTET_STREAM = "application/octet-stream"
CRLF = "\r\n"


@dataclass(frozen=True, slots=True)
class RangeSpec:
    """One ``range-spec`` as asked: ``first-last``, ``first-`` (last None) or ``-suffix`` (first None)."""

    first: int | None
    last: int | None

    def resolve(self, size: int) -> ByteRange | None:
        """The bytes this asks for in a blob of ``size`` bytes; None when it asks for none."""
        if self.first is None:
            assert self.last is not None
            length = min(self.last, size)
            return ByteRange(size - length, length) if length else None
        if self.first >= size:
            return None
        stop = size if self.last is None else min(self.last + 1, size)
        return ByteRange(self.first, stop - self.first)

    def __str__(self) -> str:
        return f"{'' if self.first is None else self.first}-{'' if self.last is None else self.last}"


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``length`` (>= 1) bytes from ``start``."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{size}"


def parse(value: str | None) -> tuple[RangeSpec, ...] | None:
    """The ranges a ``Range`` header asks for; None when it is absent or to be ignored."""
    if value is None:
        return None
    unit, sep, ranges = value.partition("=")
    if not sep or unit.lower() != "bytes":  # case-insensitive (RFC 9110 14.1), no spaces
        return None
    specs: list[RangeSpec] = []
    for element in ranges.split(","):
        element = element.strip(" \t")
        if not element:
            continue  # the list syntax (RFC 9110 5.6.1) allows empty elements
        spec = _spec(element)
        if spec is None or len(specs) == MAX_RANGES:
            return None
        specs.append(spec)
    return tuple(specs) or None


def _spec(element: str) -> RangeSpec | None:
    text_first, sep, text_last = element.partition("-")
    if not sep:
        return None
    first, last = _position(text_first), _position(text_last)
    if first is None and last is None:
        return None
    if first is None:
        return RangeSpec(None, last) if text_first == "" else None
    if last is None and text_last != "":
        return None
    if last is not None and last < first:
        return None  # invalid (14.1.1): the whole header is ignored
    return RangeSpec(first, last)


def _position(text: str) -> int | None:
    # isascii: str.isdigit() also accepts digits int() refuses or reads differently.
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return _FAR if len(digits) > len(str(_FAR)) else min(int(digits), _FAR)


def resolve(specs: tuple[RangeSpec, ...], size: int) -> list[ByteRange]:
    """The ranges to send from a blob of ``size`` bytes; RangeNotSatisfiable when there are none."""
    found = [r for r in (spec.resolve(size) for spec in specs) if r is not None]
    if not found:
        raise RangeNotSatisfiable(size)
    return _coalesced(found)


def _coalesced(ranges: list[ByteRange]) -> list[ByteRange]:
    ordered = sorted(ranges, key=lambda r: r.start)
    if all(a.stop <= b.start for a, b in itertools.pairwise(ordered)):
        return ranges
    merged = [ordered[0]]
    for r in ordered[1:]:
        last = merged[-1]
        if r.start < last.stop:
            merged[-1] = ByteRange(last.start, max(last.stop, r.stop) - last.start)
        else:
            merged.append(r)
    return merged


class Multipart:
    """The framing of a ``multipart/byteranges`` body (RFC 9110 14.6), laid out as Go's
    net/http does it (which is what the distribution registry sends)."""

    def __init__(self, ranges: list[ByteRange], size: int, part_type: str = OCTET_STREAM) -> None:
        self.ranges = ranges
        # Random, so that no blob can contain it by design; 128 bits make an accident moot.
        self.boundary = secrets.token_hex(16)
        # Each part after the first starts with the CRLF that ends the one before.
        self.heads = [
            f"{'--' if i == 0 else CRLF + '--'}{self.boundary}{CRLF}"
            f"Content-Range: {r.content_range(size)}{CRLF}Content-Type: {part_type}{CRLF}{CRLF}".encode()
            for i, r in enumerate(ranges)
        ]
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"

    @property
    def content_length(self) -> int:
        return sum(len(h) for h in self.heads) + sum(r.length for r in self.ranges) + len(self.tail)
