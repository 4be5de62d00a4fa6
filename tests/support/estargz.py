"""eStargz layers, built and read the way stargz-snapshotter's ``estargz`` package does.

An eStargz blob is an ordinary gzip-compressed tar (its gzip members concatenated),
laid out so a lazy puller can fetch single files by range:

- each regular file's content (each chunk of it) starts a gzip member of its own; the
  tar headers and padding around it sit in the members before and after;
- the table of contents, a tar entry ``stargz.index.json`` (JSON: every entry, and for
  each chunk its ``offset``, the blob offset of the gzip member it starts), is the last
  member but one;
- the last member is the 51-byte footer: an empty gzip member whose header's Extra field
  (subfield ``SG``) holds ``%016xSTARGZ`` with the TOC member's offset.

A lazy puller reads the footer with a suffix range, then the TOC range it names, then the
ranges of the chunks it needs, and decompresses each member on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass

TOC_TAR_NAME = "stargz.index.json"
FOOTER_SIZE = 51
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
_FOOTER_SUBFIELD = re.compile(rb"([0-9a-f]{16})STARGZ")


def _gzip_member(data: bytes, extra: bytes | None = None, level: int = 6) -> bytes:
    """One gzip member (RFC 1952), as Go's compress/gzip writes it (MTIME 0, OS 255)."""
    flags = 0x04 if extra is not None else 0
    xfl = {9: 2, 1: 4}.get(level, 0)
    header = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, flags, 0, xfl, 255)
    if extra is not None:
        header += struct.pack("<H", len(extra)) + extra
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def footer(toc_offset: int) -> bytes:
    subfield = f"{toc_offset:016x}STARGZ".encode()
    extra = b"SG" + struct.pack("<H", len(subfield)) + subfield
    member = _gzip_member(b"", extra, level=0)
    assert len(member) == FOOTER_SIZE, len(member)
    return member


def toc_offset(footer_bytes: bytes) -> int:
    """The TOC member's offset, from the blob's last 51 bytes."""
    if len(footer_bytes) != FOOTER_SIZE or footer_bytes[:2] != b"\x1f\x8b" or not footer_bytes[3] & 0x04:
        raise ValueError("not an eStargz footer")
    (xlen,) = struct.unpack_from("<H", footer_bytes, 10)
    extra = footer_bytes[12 : 12 + xlen]
    if extra[:2] != b"SG":
        raise ValueError("footer without the SG subfield")
    match = _FOOTER_SUBFIELD.fullmatch(extra[4:])
    if match is None:
        raise ValueError("footer subfield is not %016xSTARGZ")
    return int(match.group(1), 16)


@dataclass(frozen=True)
class Layer:
    blob: bytes
    toc_digest: str  # sha256 of the TOC JSON (the ``containerd.io/snapshot/stargz/toc.digest`` annotation)
    diff_id: str  # sha256 of the uncompressed tar

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def build(files: dict[str, bytes], chunk_size: int = 4 * 1024 * 1024) -> Layer:
    """An eStargz layer holding ``files`` (regular files, mode 0644), each file's content
    split into gzip members of at most ``chunk_size`` bytes, as estargz.Build does."""
    blob = bytearray()
    uncompressed = hashlib.sha256()
    pending = bytearray()  # tar bytes not yet in a gzip member (headers, padding)
    entries: list[dict[str, object]] = []

    def close_member() -> None:
        if pending:
            blob.extend(_gzip_member(bytes(pending)))
            uncompressed.update(pending)
            pending.clear()

    everything = {NO_PREFETCH_LANDMARK: b"\x0f", **files}
    for name, content in everything.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(content), 0o644
        pending.extend(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        entry: dict[str, object] = {"name": name, "type": "reg", "size": len(content), "mode": 0o644,
                                    "digest": "sha256:" + hashlib.sha256(content).hexdigest()}
        if not content:
            entries.append(entry)
        for chunk_offset in range(0, len(content), chunk_size):
            chunk = content[chunk_offset : chunk_offset + chunk_size]
            close_member()
            part = dict(entry) if chunk_offset == 0 else {"name": name, "type": "chunk"}
            part.update({"offset": len(blob), "chunkOffset": chunk_offset,
                         "chunkDigest": "sha256:" + hashlib.sha256(chunk).hexdigest()})
            if len(chunk) == chunk_size:  # the last chunk, when shorter, runs to the file's end
                part["chunkSize"] = chunk_size
            entries.append(part)
            blob.extend(_gzip_member(chunk))
            uncompressed.update(chunk)
        if len(content) % tarfile.BLOCKSIZE:
            pending.extend(b"\0" * (tarfile.BLOCKSIZE - len(content) % tarfile.BLOCKSIZE))
    close_member()
    toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
    toc_at = len(blob)
    toc_tar = io.BytesIO()
    with tarfile.open(fileobj=toc_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(TOC_TAR_NAME)
        info.size, info.mode = len(toc), 0o644
        tar.addfile(info, io.BytesIO(toc))
    blob.extend(_gzip_member(toc_tar.getvalue()))
    uncompressed.update(toc_tar.getvalue())
    blob.extend(footer(toc_at))
    return Layer(bytes(blob), "sha256:" + hashlib.sha256(toc).hexdigest(), "sha256:" + uncompressed.hexdigest())


def read_toc(member: bytes) -> dict[str, object]:
    """The TOC JSON from the bytes of its gzip member (the range from the footer's offset to
    the footer)."""
    tar_bytes = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(member)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        found = tar.extractfile(TOC_TAR_NAME)
        assert found is not None
        toc: dict[str, object] = json.loads(found.read())
    return toc


def chunk_spans(toc: dict[str, object], toc_at: int) -> dict[tuple[str, int], tuple[int, int, int]]:
    """(name, chunk offset) -> (blob offset, stop, chunk length) of every chunk's gzip
    member: it runs to the next chunk's member, or to the TOC."""
    entries = [e for e in toc["entries"] if isinstance(e, dict)]  # type: ignore[attr-defined]
    sizes = {e["name"]: int(e["size"]) for e in entries if e["type"] == "reg"}
    chunks = [e for e in entries if "offset" in e]
    starts = [*sorted({int(e["offset"]) for e in chunks}), toc_at]
    spans = {}
    for e in chunks:
        start, chunk_offset = int(e["offset"]), int(e.get("chunkOffset", 0))
        length = int(e.get("chunkSize") or sizes[e["name"]] - chunk_offset)
        spans[(str(e["name"]), chunk_offset)] = (start, starts[starts.index(start) + 1], length)
    return spans


def chunk_content(member_bytes: bytes, length: int) -> bytes:
    """A chunk's content: the first ``length`` bytes its member (or members, the chunk's
    own then the headers that follow it) decompress to."""
    out = bytearray()
    rest = member_bytes
    while rest and len(out) < length:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += inflate.decompress(rest)
        rest = inflate.unused_data
    return bytes(out[:length])
