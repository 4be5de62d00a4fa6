"""Blobs as files under the data directory (the layout in ``storage.paths``).

Commit is fsync of the temp file, ``os.replace`` into place and fsync of the
directory (a prefix directory made for it is fsynced in its parent first), so
a crash leaves either the whole verified blob or nothing. A small blob put
whole takes the same steps, its temp file made and written in the same job. The
spool file is not handed to the disk early (sync_file_range while filling):
that made a fill as slow as the disk, and clients no longer wait for the
commit's fsync (their last byte goes out once the digest is verified).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path

from storage import directio, paths
from storage.backends.base import BlobBackend, Upload
from storage.errors import BlobUnknown, StoreFull, StoreUnavailable
from storage.jobs import Jobs
from storage.oci.digest import Digest

READ_CHUNK = 1024 * 1024
# Blobs of this algorithm (all that registries use today) find their prefix directory made at start.
PREFIXED_ALGORITHM = "sha256"
# A reservation this small is made on the loop: posix_fallocate of a few blocks (or
# glibc's block-by-block fallback where the filesystem has no fallocate) costs less
# than the hand-off to a thread and back, as the small writes that follow it do.
INLINE_RESERVE = 64 * 1024
# Commits (fsync, rename, directory fsync) run here: one per blob, so the hand-off is
# the light one (storage.jobs). Enough threads that a big blob's slow fsync does not
# hold small ones back.
_COMMITS = Jobs("regcache-commit", max_threads=16)


class FileUpload(Upload):
    def __init__(self, final_path: str, spool_path: str, direct: bool) -> None:
        self.final_path = final_path
        self.spool_path = Path(spool_path)
        self._fd = os.open(spool_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        self._direct_fd: int | None = None  # the same file around the page cache, opened at need
        self.may_direct = direct
        self._try_direct = direct  # until the filesystem refuses
        self._size = 0
        self._closed = False

    def write_sync(self, data: bytes | memoryview) -> None:
        # Written with pwrite at the upload's own offset: followers read the spool file by
        # path and see the bytes as soon as the call returns.
        view = memoryview(data)
        with _full_when_no_room():
            if self._try_direct and directio.aligned(view, self._size):
                view = view[self._write_direct(view):]
            while view:
                written = os.pwrite(self._fd, view, self._size)
                self._size += written
                view = view[written:]

    def _write_direct(self, view: memoryview) -> int:
        """Bytes of ``view`` written around the page cache: all of them, or none where the
        filesystem has no direct I/O (then this upload stops trying)."""
        if self._direct_fd is None:
            self._direct_fd = directio.open_direct(str(self.spool_path), os.O_WRONLY)
            if self._direct_fd is None:
                self._try_direct = False
                return 0
        done = 0
        try:
            while done < len(view):
                written = os.pwrite(self._direct_fd, view[done:], self._size)
                self._size += written
                done += written
                self.direct = True
                if written % directio.ALIGN:
                    break  # a short write left the rest unaligned: the page cache takes it
        except OSError as exc:
            if not directio.refused(exc):
                raise
            self._try_direct = False
        return done

    def _reserve_sync(self, size: int) -> None:
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            if _no_room(exc):
                raise StoreFull(f"no space left on the store's filesystem for {size} bytes") from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    async def reserve(self, size: int) -> None:
        if size <= INLINE_RESERVE:
            self._reserve_sync(size)
        else:
            await asyncio.to_thread(self._reserve_sync, size)

    def _commit_sync(self) -> None:
        with _full_when_no_room():
            os.fsync(self._fd)
        self._close()
        _publish(str(self.spool_path), self.final_path)

    async def commit(self) -> None:
        await _COMMITS.run(self._commit_sync)

    async def abort(self) -> None:
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool_path)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            if self._direct_fd is not None:
                os.close(self._direct_fd)


def _no_room(exc: OSError) -> bool:
    """Whether the filesystem refused a write for want of space (then the store is full)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _full_when_no_room() -> Iterator[None]:
    """A write the filesystem has no room for is ``StoreFull``; any other error passes as it is."""
    try:
        yield
    except OSError as exc:
        if _no_room(exc):
            raise StoreFull("no space left on the store's filesystem") from exc
        raise


def _publish(spool_path: str, final_path: str) -> None:
    """A written and fsynced spool file into place under its digest, durably."""
    directory = os.path.dirname(final_path)
    try:
        os.replace(spool_path, final_path)
    except FileNotFoundError:
        # No prefix directory (sha256's are made at start: another algorithm, or one
        # removed meanwhile), or the spool file is gone, which the second try raises.
        # Renaming first spares every other commit a look at the directory.
        _make_dirs(directory)
        os.replace(spool_path, final_path)
    _fsync_dir(directory)


def _put_sync(spool_path: str, final_path: str, data: bytes) -> None:
    """A whole small blob in one job: written, fsynced and published, or nothing left behind."""
    with _full_when_no_room():
        fd = os.open(spool_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            _publish(spool_path, final_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool_path)
            raise


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _make_dirs(directory: str) -> None:
    """``os.makedirs``, each new directory made durable in its parent, as a committed blob's name is."""
    parent = os.path.dirname(directory)
    if not os.path.isdir(parent):
        _make_dirs(parent)
    try:
        os.mkdir(directory)
    except FileExistsError:
        return
    _fsync_dir(parent)


def _make_prefixes(directory: str) -> None:
    """Every prefix directory of ``directory`` (``00`` to ``ff``), made durable with one fsync.

    Otherwise most fills in a new store are the first under their prefix, and each makes
    it and fsyncs its parent on the way to its rename: two more syscalls that wait on the
    disk, per blob, for the first few hundred blobs. A store that has them costs 256
    failed ``mkdir`` calls here (about a millisecond).
    """
    _make_dirs(directory)
    made = False
    for prefix in range(256):
        try:
            os.mkdir(f"{directory}/{prefix:02x}")
        except FileExistsError:
            continue
        made = True
    if made:
        _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemBackend(BlobBackend):
    name = "filesystem"

    def __init__(self, root: Path, direct_io: bool = False) -> None:
        self.root = root
        self._direct_io = direct_io
        # Paths as strings, built with one format each: pathlib's joins cost ~10 us a
        # blob path, and a cold fill looks its blob up three or four times.
        self._blobs = str(root / paths.BLOBS)
        self._tmp = str(paths.tmp_dir(root))

    def _path(self, digest: Digest) -> str:
        """``paths.blob_path`` as a string."""
        return f"{self._blobs}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    async def start(self) -> None:
        # Temp files a crash left are removed by startup recovery (storage.fsck),
        # which runs only when no other process uses this store: another
        # process's fills in progress must not vanish under it.
        paths.tmp_dir(self.root).mkdir(parents=True, exist_ok=True)
        (self.root / paths.BLOBS).mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_make_prefixes, f"{self._blobs}/{PREFIXED_ALGORITHM}")

    async def stat(self, digest: Digest) -> int | None:
        try:
            return os.stat(self._path(digest)).st_size
        except FileNotFoundError:
            return None

    async def begin(self, digest: Digest) -> Upload:
        try:
            # A temp name needs no more than uuid4's randomness, without its object.
            return FileUpload(self._path(digest), f"{self._tmp}/{os.urandom(16).hex()}", self._direct_io)
        except OSError as exc:
            if _no_room(exc):
                raise StoreFull("no space left on the store's filesystem") from exc
            raise StoreUnavailable(f"cannot start an upload under {self.root}: {exc}") from exc

    async def put(self, digest: Digest, data: bytes) -> None:
        # One trip to a commit thread, where FileUpload takes one for the file and
        # the loop writes it: for a small blob the trips are most of the cost.
        await _COMMITS.run(functools.partial(_put_sync, f"{self._tmp}/{os.urandom(16).hex()}", self._path(digest),
                                             data))

    async def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self._path(digest))
        except FileNotFoundError:
            return False
        return True

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None) -> AsyncGenerator[bytes, None]:
        try:
            fd = os.open(self._path(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not in the store") from None
        try:
            remaining = length if length is not None else os.fstat(fd).st_size - offset
            while remaining > 0:
                chunk = await asyncio.to_thread(os.pread, fd, min(READ_CHUNK, remaining), offset)
                if not chunk:
                    break
                offset += len(chunk)
                remaining -= len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def read_small(self, digest: Digest) -> bytes:
        try:
            return await asyncio.to_thread(_read_file, self._path(digest))
        except FileNotFoundError:
            raise BlobUnknown(f"blob {digest} is not in the store") from None

    async def list(self) -> AsyncIterator[tuple[Digest, int]]:
        entries = await asyncio.to_thread(_walk_blobs, self.root)
        for digest, size in entries:
            yield digest, size

    def local_path(self, digest: Digest) -> Path | None:
        return Path(self._path(digest))

    async def writable(self) -> bool:
        probe = paths.tmp_dir(self.root) / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True


def _walk_blobs(root: Path) -> list[tuple[Digest, int]]:
    out = []
    base = root / paths.BLOBS
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            full = os.path.join(dirpath, name)
            digest = paths.digest_from_path(os.path.relpath(full, root).replace(os.sep, "/"))
            if digest is not None:
                out.append((digest, os.stat(full).st_size))
    return out


def walk_strays(root: Path) -> list[Path]:
    """Files under blobs/ that are not named like a blob (fsck reports them)."""
    out = []
    for dirpath, _dirs, files in os.walk(root / paths.BLOBS):
        for name in files:
            full = os.path.join(dirpath, name)
            if paths.digest_from_path(os.path.relpath(full, root).replace(os.sep, "/")) is None:
                out.append(Path(full))
    return out
