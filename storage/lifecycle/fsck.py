"""Checking the store against its metadata, and repairing what does not agree.

``regcache fsck`` runs with the server stopped (a lock file says whether one
runs). It looks for:

- temp files of fills that never finished (``tmp/``) and stray files under
  ``blobs/`` that are not named like a blob;
- SQLite damage (``PRAGMA integrity_check``), image rows whose manifest row is
  gone, tags that point at no image;
- blob rows whose file is gone, files no row knows (orphans), files whose size
  differs from their row, and, unless ``fast``, files whose sha256 is not
  their name.

Repairs keep the rule that nothing unverified is served: a damaged blob is
removed (a later pull fetches it again), an image whose manifest bytes are gone
is dropped from the cache, an orphan that a manifest references is adopted
(after hashing, unless ``fast``) and any other orphan is removed.

The same code, fast and repairing, is the server's startup recovery: after a
crash it finds the files of fills that committed but were not yet recorded and
the files of a GC pass that had deleted rows but not yet unlinked.

On a store shared by replicas (the S3 backend) most objects belong to other
replicas' images: an object no local row references is not an orphan there,
and only the shared GC (``storage.shared_gc``) deletes from the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storage import paths
from storage.backends.base import BlobBackend
from storage.backends.filesystem import walk_strays
from storage.index.metadata import Metadata
from storage.index.rows import BlobRow
from storage.oci.digest import Digest

LOCK_FILE = "regcache.lock"
HASH_CHUNK = 1024 * 1024

# Exit codes, as fsck(8) has them.
CLEAN, FIXED, UNFIXED, FAILED = 0, 1, 4, 8


class StoreBusy(Exception):
    """Another process holds the store."""


class StoreLock:
    """``<data_dir>/regcache.lock``: servers share it, fsck takes it alone.

    The kernel drops a flock when its process dies, so a SIGKILLed server never
    leaves a stale lock behind.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, exclusive: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = "a running regcache" if exclusive else "regcache fsck"
            raise StoreBusy(f"{self.path.parent} is in use by {holder}") from None
        self._fd = fd

    def try_exclusive(self) -> bool:
        """Upgrade to sole ownership if no other process shares the store."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(slots=True)
class Problem:
    kind: str  # temp, stray, database, dangling_image, dangling_tag, missing, orphan, size, corrupt
    subject: str  # a digest, a path or a table
    detail: str
    action: str = ""  # what the repair did; empty when nothing was done


@dataclass(slots=True)
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    blobs: int = 0
    rows: int = 0
    bytes_verified: int = 0
    verified: bool = False
    repair: bool = False

    @property
    def fixed(self) -> list[Problem]:
        return [p for p in self.problems if p.action]

    @property
    def unfixed(self) -> list[Problem]:
        return [p for p in self.problems if not p.action]

    @property
    def exit_code(self) -> int:
        if not self.problems:
            return CLEAN
        return UNFIXED if self.unfixed else FIXED

    def add(self, kind: str, subject: str, detail: str) -> Problem:
        problem = Problem(kind, subject, detail)
        self.problems.append(problem)
        return problem

    def to_dict(self) -> dict:
        return {
            "consistent": not self.problems,
            "blobs": self.blobs,
            "rows": self.rows,
            "verified": self.verified,
            "bytes_verified": self.bytes_verified,
            "found": len(self.problems),
            "fixed": len(self.fixed),
            "problems": [asdict(p) for p in self.problems],
        }

    def render(self) -> str:
        lines = [f"{p.kind:15} {p.subject}: {p.detail}" + (f" -> {p.action}" if p.action else "")
                 for p in self.problems]
        checked = f"{self.blobs} blob files, {self.rows} blob rows"
        if self.verified:
            checked += f", {self.bytes_verified} bytes hashed"
        lines.append(f"checked {checked}")
        if not self.problems:
            lines.append("store is consistent")
        else:
            lines.append(f"found {len(self.problems)} problem(s), fixed {len(self.fixed)}")
            if self.unfixed and not self.repair:
                lines.append("run with --repair to fix them")
        return "\n".join(lines)


class Checker:
    def __init__(self, root: Path, metadata: Metadata, backend: BlobBackend, *, repair: bool, verify: bool) -> None:
        self.root = root
        self.metadata = metadata
        self.backend = backend
        self.repair = repair
        self.verify = verify
        self.report = FsckReport(verified=verify, repair=repair)

    async def run(self, *, integrity: bool = True, temp: bool = True) -> FsckReport:
        if temp:
            await asyncio.to_thread(self._temp_files)
        if integrity:
            await self._integrity()
        await self._dangling_rows()
        await self._blobs()
        return self.report

    # Files that are not blobs ----------------------------------------------

    def _temp_files(self) -> None:
        tmp = paths.tmp_dir(self.root)
        if tmp.is_dir():
            for entry in sorted(tmp.iterdir()):
                problem = self.report.add("temp", str(entry), "temp file of an unfinished fill")
                if self.repair:
                    _remove(entry)
                    problem.action = "removed"
        if (self.root / paths.BLOBS).is_dir():
            for stray in walk_strays(self.root):
                problem = self.report.add("stray", str(stray), "file under blobs/ that is not named like a blob")
                if self.repair:
                    _remove(stray)
                    problem.action = "removed"

    # SQLite ----------------------------------------------------------------

    async def _integrity(self) -> None:
        for message in (await self.metadata.consistency.integrity_errors())[:20]:
            self.report.add("database", "metadata.db", message)

    async def _dangling_rows(self) -> None:
        for key in await self.metadata.consistency.images_without_manifest():
            problem = self.report.add(
                "dangling_image", key.manifest, f"image row in repository {key.repository_id} has no manifest row"
            )
            if self.repair:
                await self.metadata.consistency.drop_images([key])
                problem.action = "image removed"
        for tag in await self.metadata.consistency.tags_without_image():
            problem = self.report.add(
                "dangling_tag", f"{tag.repository_id}:{tag.tag}", f"tag points at {tag.manifest}, not an image"
            )
            if self.repair:
                await self.metadata.untag(tag.repository_id, tag.tag)
                problem.action = "tag removed"

    # Blob rows against blob files --------------------------------------------

    async def _blobs(self) -> None:
        files = {str(d): size async for d, size in self.backend.list()}
        rows = await self.metadata.blob_sizes()
        self.report.blobs, self.report.rows = len(files), len(rows)
        manifests = await self.metadata.consistency.manifest_digests()
        referenced = await self.metadata.consistency.referenced_digests() | manifests
        hashed: dict[str, bool] = {}
        if self.verify:
            hashed = await self._hash_all(sorted(files))

        for digest, size in sorted(rows.items()):
            if digest not in files:
                problem = self.report.add("missing", digest, "blob row whose file is gone")
                if self.repair:
                    problem.action = await self._forget_blob(digest)
            elif files[digest] != size:
                problem = self.report.add("size", digest, f"file has {files[digest]} bytes, row says {size}")
                if self.repair:
                    await self._delete_file(digest)
                    problem.action = "file removed, " + await self._forget_blob(digest)
            elif hashed.get(digest) is False:
                problem = self.report.add("corrupt", digest, "file content does not hash to its digest")
                if self.repair:
                    await self._delete_file(digest)
                    problem.action = "file removed, " + await self._forget_blob(digest)
        for digest in sorted(manifests - set(files) - set(rows)):
            problem = self.report.add("missing", digest, "manifest row whose file is gone")
            if self.repair:
                problem.action = await self._forget_blob(digest)
        for digest in sorted(set(files) - set(rows)):
            if hashed.get(digest) is False:
                problem = self.report.add("corrupt", digest, "file no row knows, and its content does not match")
                if self.repair:
                    await self._delete_file(digest)
                    problem.action = "file removed"
                continue
            if self.backend.shared is not None and digest not in referenced:
                # A bucket shared by replicas: another replica's blob, or the shared GC's to judge.
                continue
            problem = self.report.add("orphan", digest, "file no row knows")
            if not self.repair:
                continue
            if digest in referenced:
                await self.metadata.restore_blobs([BlobRow(digest, files[digest], time.time(), time.time())])
                problem.action = "adopted (a manifest references it)"
            else:
                await self._delete_file(digest)
                problem.action = "removed"

    async def _hash_all(self, digests: list[str]) -> dict[str, bool]:
        out = {}
        if digests and self.backend.local_path(Digest.parse(digests[0])) is None:
            for digest in digests:
                out[digest], size = await self._hash_remote(Digest.parse(digest))
                self.report.bytes_verified += size
            return out
        loop = asyncio.get_running_loop()
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="fsck-hash") as pool:
            results = await asyncio.gather(*(loop.run_in_executor(pool, self._hash_one, digest) for digest in digests))
        for digest, (ok, size) in zip(digests, results, strict=True):
            out[digest] = ok
            self.report.bytes_verified += size
        return out

    def _hash_one(self, digest_text: str) -> tuple[bool, int]:
        digest = Digest.parse(digest_text)
        path = self.backend.local_path(digest)
        assert path is not None
        hasher = digest.hasher()
        size = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return True, 0  # reported as missing, not as corrupt
        return hasher.hexdigest() == digest.hex, size

    async def _hash_remote(self, digest: Digest) -> tuple[bool, int]:
        hasher = digest.hasher()
        size = 0
        async for chunk in self.backend.read(digest):
            hasher.update(chunk)
            size += len(chunk)
        return hasher.hexdigest() == digest.hex, size

    # Repairs ---------------------------------------------------------------

    async def _delete_file(self, digest_text: str) -> None:
        await self.backend.delete(Digest.parse(digest_text))

    async def _forget_blob(self, digest: str) -> str:
        """Drop a blob's row; a manifest without bytes takes its images with it."""
        images = await self.metadata.consistency.images_of(digest)
        await self.metadata.consistency.drop_images(images)
        await self.metadata.consistency.forget_blob(digest)
        return f"row removed with {len(images)} image(s)" if images else "row removed"


async def fsck(root: Path, backend: BlobBackend, *, repair: bool = False, fast: bool = False) -> FsckReport:
    """The offline check: takes the store lock alone, or raises ``StoreBusy``."""
    if not paths.metadata_path(root).exists():
        raise FileNotFoundError(f"no regcache store in {root} (no {paths.METADATA})")
    lock = StoreLock(root)
    lock.acquire(exclusive=True)
    try:
        metadata = Metadata(paths.metadata_path(root))
        try:
            await metadata.open()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.Error):
                await metadata.close()
            report = FsckReport(repair=repair)
            report.add("database", paths.METADATA, f"cannot be opened: {exc}")
            return report
        try:
            return await Checker(root, metadata, backend, repair=repair, verify=not fast).run()
        finally:
            await metadata.close()
            await backend.close()
    finally:
        lock.release()


async def recover(root: Path, metadata: Metadata, backend: BlobBackend) -> FsckReport:
    """Startup recovery, run only by a server alone on its store: fast, repairing, temp files removed."""
    return await Checker(root, metadata, backend, repair=True, verify=False).run(integrity=False, temp=True)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
