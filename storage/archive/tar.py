"""Tar streams for image archives: headers out, members in, never a whole member in memory.

Writing: ``member_header`` gives the header block(s) of one member, so the
writer can stream blob files behind them and know the archive's exact size in
advance. Reading: ``TarReader`` walks a byte stream member by member and
refuses anything an image archive has no business containing (absolute or
escaping paths, device files, links that leave the archive). Compression of
the whole stream is told from magic bytes, never from a file name.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import posixpath
import tarfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal, Protocol, cast

import zstandard

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

from storage.errors import ArchiveInvalid

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
CHUNK = 1024 * 1024
# Extended headers (pax, GNU long names) are metadata, not content: small.
MAX_EXTENDED_HEADER = 64 * 1024

Compression = Literal["gzip", "zstd"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --------------------------------------------------------------------------- writing


def member_header(name: str, size: int = 0, *, directory: bool = False) -> bytes:
    """The header of a member; fixed owner, mode and time so the same save gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = 0 if directory else size
    info.mtime = 0
    info.uname = info.gname = ""
    # PAX only adds an extended header when a value does not fit ustar (sizes >= 8 GiB).
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class StreamCompressor(Protocol):
    """What ``zlib.compressobj`` and zstandard's ``compressobj`` have in common."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


def compressor(kind: Compression | None) -> StreamCompressor | None:
    """An object with ``compress(bytes)`` and ``flush()`` for the whole stream, or None."""
    if kind is None:
        return None
    if kind == "gzip":
        return zlib.compressobj(6, zlib.DEFLATED, 31)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3).compressobj()
    raise ValueError(f"unknown compression {kind!r}")


async def compressed(chunks: AsyncIterator[bytes], kind: Compression | None) -> AsyncIterator[bytes]:
    comp = compressor(kind)
    if comp is None:
        async for chunk in chunks:
            yield chunk
        return
    async for chunk in chunks:
        # zlib and zstd release the GIL: compress beside the event loop.
        out = await asyncio.to_thread(comp.compress, chunk)
        if out:
            yield out
    tail = comp.flush()
    if tail:
        yield tail


# --------------------------------------------------------------------------- reading bytes


class ByteSource:
    """Exact reads over an async iterator of chunks (an offset into the current chunk avoids copies)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks.__aiter__()
        self._buffer = b""
        self._offset = 0
        self._eof = False
        self.position = 0

    @property
    def _available(self) -> int:
        return len(self._buffer) - self._offset

    async def _more(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buffer = self._buffer[self._offset :] + chunk if self._available else chunk
        self._offset = 0
        return True

    def _take(self, n: int) -> bytes:
        out = self._buffer[self._offset : self._offset + n]
        self._offset += len(out)
        self.position += len(out)
        return out

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        while self._available < n and await self._more():
            pass
        return self._take(n)

    async def read_some(self, n: int) -> bytes:
        """At least one byte (unless at the end), at most ``n``, without joining chunks."""
        if not self._available and not await self._more():
            return b""
        return self._take(n)

    async def read_exact(self, n: int, what: str) -> bytes:
        out = await self.read(n)
        if len(out) != n:
            raise ArchiveInvalid(f"archive is truncated (in {what})")
        return out

    async def peek(self, n: int) -> bytes:
        while self._available < n and await self._more():
            pass
        return self._buffer[self._offset : self._offset + n]


class _BlockingInput(io.RawIOBase):
    """A file object that a decompressor in a worker thread reads; bytes come from the event loop."""

    def __init__(self, source: ByteSource, loop: asyncio.AbstractEventLoop) -> None:
        self._source = source
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        # A view released on return: RawIOBase.read resizes its bytearray after this.
        with memoryview(buffer) as view:
            future = asyncio.run_coroutine_threadsafe(self._source.read_some(len(view)), self._loop)
            data = future.result()
            view[: len(data)] = data
        return len(data)


async def decompressed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The archive's tar bytes, whether it came plain, gzip- or zstd-compressed.

    Decompression runs in a worker thread that reads bounded pieces, so a small
    hostile input that expands enormously never lands in memory at once.
    """
    source = ByteSource(chunks)
    magic = await source.peek(4)
    if magic.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif magic.startswith(ZSTD_MAGIC):
        kind = "zstd"
    else:
        while True:
            chunk = await source.read_some(CHUNK)
            if not chunk:
                return
            yield chunk
    raw = _BlockingInput(source, asyncio.get_running_loop())
    if kind == "gzip":
        reader: gzip.GzipFile | zstandard.ZstdDecompressionReader = gzip.GzipFile(
            fileobj=io.BufferedReader(raw, CHUNK), mode="rb"
        )
    else:
        # zstandard's stub asks for IO[bytes]; the reader only ever calls read() on its source.
        source_file = cast(IO[bytes], raw)
        reader = zstandard.ZstdDecompressor().stream_reader(source_file, read_size=CHUNK, read_across_frames=True)
    try:
        while True:
            try:
                chunk = await asyncio.to_thread(reader.read, CHUNK)
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
                raise ArchiveInvalid(f"archive's {kind} stream is corrupt or truncated: {exc}") from None
            if not chunk:
                return
            yield chunk
    finally:
        reader.close()


# --------------------------------------------------------------------------- reading members


@dataclass(frozen=True, slots=True)
class Member:
    name: str  # normalised: relative, no "." or ".." components, no trailing slash
    kind: Literal["file", "dir", "symlink", "hardlink"]
    size: int = 0
    target: str | None = None  # for links: the archive path the link resolves to


def normalise(name: str, what: str = "member") -> str:
    """An archive path made relative and clean; anything that could escape is refused."""
    if "\0" in name:
        raise ArchiveInvalid(f"{what} name contains NUL")
    if name.startswith("/"):
        raise ArchiveInvalid(f"{what} {name[:200]!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveInvalid(f"{what} {name[:200]!r} escapes the archive (path traversal)")
    return "/".join(parts)


def link_target(member_name: str, linkname: str, *, symbolic: bool) -> str:
    """Where a link points inside the archive; links that leave it are refused."""
    if not linkname or linkname.startswith("/"):
        raise ArchiveInvalid(f"link {member_name[:200]!r} points outside the archive ({linkname[:200]!r})")
    base = posixpath.dirname(member_name) if symbolic else ""
    joined = posixpath.normpath(posixpath.join(base, linkname))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise ArchiveInvalid(f"link {member_name[:200]!r} points outside the archive ({linkname[:200]!r})")
    return normalise(joined, "link target")


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveInvalid("malformed pax header") from None
        if length <= 0 or pos + length > len(data):
            raise ArchiveInvalid("malformed pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class TarReader:
    """Members of a tar stream, one at a time; the caller reads each file's data before the next."""

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self._remaining = 0  # data bytes of the current member not yet read
        self._pad = 0

    async def next(self) -> Member | None:
        await self._skip_rest()
        overrides: dict[str, str] = {}
        while True:
            block = await self.source.read(BLOCK)
            if not block:
                raise ArchiveInvalid("archive is truncated (no end-of-archive marker)")
            if len(block) < BLOCK:
                raise ArchiveInvalid("archive is truncated (in a member header)")
            if block == b"\0" * BLOCK:
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise ArchiveInvalid(f"not a tar archive, or a corrupt header: {exc}") from None
            try:
                size = int(overrides.pop("size", info.size))
            except ValueError:
                raise ArchiveInvalid("malformed size in a pax header") from None
            if size < 0:
                raise ArchiveInvalid("member with a negative size")
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                if size > MAX_EXTENDED_HEADER:
                    raise ArchiveInvalid("extended tar header is too large")
                data = await self.source.read_exact(size + (-size % BLOCK), "an extended header")
                data = data[:size]
                if info.type == tarfile.XHDTYPE:
                    overrides.update(_pax_records(data))
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    overrides["path"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif info.type == tarfile.GNUTYPE_LONGLINK:
                    overrides["linkpath"] = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue  # global pax headers carry nothing an image archive needs
            raw_name = overrides.get("path", info.name)
            name = normalise(raw_name)
            linkname = overrides.get("linkpath", info.linkname)
            if info.type in _FILE_TYPES:
                self._remaining, self._pad = size, -size % BLOCK
                return Member(name, "file", size)
            if info.type == tarfile.DIRTYPE:
                self._remaining, self._pad = size, -size % BLOCK
                return Member(name, "dir")
            if info.type == tarfile.SYMTYPE:
                return Member(name, "symlink", 0, link_target(name, linkname, symbolic=True))
            if info.type == tarfile.LNKTYPE:
                return Member(name, "hardlink", 0, link_target(name, linkname, symbolic=False))
            kinds = {
                tarfile.CHRTYPE: "a character device",
                tarfile.BLKTYPE: "a block device",
                tarfile.FIFOTYPE: "a fifo",
            }
            what = kinds.get(info.type, f"of unsupported type {info.type!r}")
            raise ArchiveInvalid(f"member {raw_name[:200]!r} is {what}; image archives hold only files and links")

    async def data(self) -> AsyncIterator[bytes]:
        """The current member's bytes in chunks."""
        while self._remaining > 0:
            chunk = await self.source.read_some(min(CHUNK, self._remaining))
            if not chunk:
                raise ArchiveInvalid("archive is truncated (in a member's data)")
            self._remaining -= len(chunk)
            yield chunk
        if self._pad:
            await self.source.read_exact(self._pad, "member padding")
            self._pad = 0

    async def _skip_rest(self) -> None:
        async for _ in self.data():
            pass
