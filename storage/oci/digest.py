"""Content digests, as the OCI image spec defines them.

A digest is ``algorithm:encoded``. regcache verifies sha256 and sha512; anything
else is refused before it can reach a path or a query.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from storage.errors import DigestInvalid

# Lengths of the hex encoding per algorithm we can verify.
_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")  # fullmatch: "$" would let a trailing newline through


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, encoded = text.partition(":")
        length = _HEX_LENGTHS.get(algorithm)
        if not sep or length is None:
            raise DigestInvalid(f"unsupported digest: {text[:100]!r}")
        if len(encoded) != length or not _HEX.fullmatch(encoded):
            raise DigestInvalid(f"malformed digest: {text[:100]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        """The 12-hex id docker prints."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def is_digest(text: str) -> bool:
    try:
        Digest.parse(text)
    except DigestInvalid:
        return False
    return True
