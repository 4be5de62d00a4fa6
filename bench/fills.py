"""CPU per cold small-blob fill, from each thread's own clock.

The pull rows (``cases.image_pulls``) count CPU from ``/proc/PID/stat``, in
10 ms clock ticks: over 41 blobs that is a quarter of a millisecond per fill
of granularity, and skopeo's own pace mixes in. Here a client in this process
GETs the small image's manifest, then every blob, six at a time, from a cache
that has already served one pull of the same shape; each thread's
``/proc/PID/task/TID/schedstat`` (nanoseconds) is read before and after, until
the machine is idle again. A fill is what the cold pass costs more than the
warm one that follows, per blob. Threads that end between two readings take
their time with them: regcache's pools and distribution's goroutine threads
live as long as their process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.cases import Bench, quiet
from bench.peers import Distribution, Regcache
from bench.report import Row, seconds
from tests.support.seed import SeededImage

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
AT_ONCE = 6  # skopeo's default for layers


def thread_seconds(pids: Sequence[int]) -> dict[tuple[int, int], float]:
    """CPU seconds of every live thread of ``pids``, by (pid, tid)."""
    found = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    found[(pid, int(tid))] = int(f.read().split()[0]) / 1e9
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


async def _pull(base: str, image: SeededImage) -> None:
    """The manifest, then every blob of ``image``, ``AT_ONCE`` at a time; bodies read and dropped."""
    at_once = asyncio.Semaphore(AT_ONCE)
    async with aiohttp.ClientSession() as session:

        async def get(path: str, headers: dict[str, str] | None = None) -> None:
            async with at_once, session.get(f"{base}/v2/{image.repository}/{path}", headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{path}: {resp.status}")
                async for _ in resp.content.iter_chunked(1 << 20):
                    pass

        await get(f"manifests/{image.tag}", {"Accept": ACCEPT})
        await asyncio.gather(*(get(f"blobs/{digest}") for digest in image.blob_digests))


def _pass(base: str, image: SeededImage, pids: Sequence[int]) -> tuple[float, float]:
    """CPU seconds ``pids`` spent on one pass over ``image``, until the machine is idle again:
    all their threads, and the main thread of their process group's leader (regcache's event
    loop: ``serve`` runs in a session of its own)."""
    leader = os.getpgid(pids[0])
    quiet()
    before = thread_seconds(pids)
    asyncio.run(_pull(base, image))
    quiet()
    spent = {task: now - before.get(task, 0.0) for task, now in thread_seconds(pids).items()}
    return sum(spent.values()), spent.get((leader, leader), 0.0)


def _per_fill(b: Bench, proxy: Regcache | Distribution, image: SeededImage,
              aside: Path | None) -> tuple[float, float]:
    """CPU seconds per blob the cold pass cost more than the warm one, on a cache just emptied:
    every thread's, and the main thread's alone."""
    proxy.reset(aside)
    pids = proxy.pids()
    asyncio.run(_pull(proxy.url, b.starter))  # a cache that has served before
    (cold, cold_main), (warm, warm_main) = _pass(proxy.url, image, pids), _pass(proxy.url, image, pids)
    blobs = len(image.blob_digests)
    return max(0.0, cold - warm) / blobs, max(0.0, cold_main - warm_main) / blobs


def small_fills(b: Bench) -> list[Row]:
    """The caches emptied by moving their trees aside (``bench.peers.forget``), then, for the
    same figure as it was measured before, by deleting them just before the pull."""
    image = b.small
    fills = len(image.blob_digests)
    trash = b.workdir / "trash"
    proxies: tuple[tuple[str, Regcache | Distribution], ...] = (("regcache", b.regcache), ("dproxy", b.dproxy))
    per_fill: dict[tuple[str, bool], list[float]] = {
        (name, moved): [] for name, _ in proxies for moved in (True, False)
    }
    on_loop: dict[bool, list[float]] = {True: [], False: []}  # regcache's event-loop thread alone
    # Every run with the old tree moved aside first: a deletion slows the inode allocations
    # of the next minute. The moved trees go with the bench's work directory, at its end.
    for moved in (True, False):
        for _ in range(b.repeats):
            for name, proxy in proxies:
                total, main = _per_fill(b, proxy, image, trash if moved else None)
                per_fill[(name, moved)].append(total)
                if name == "regcache":
                    on_loop[moved].append(main)
    rows = []
    for moved in (True, False):
        mine, theirs = min(per_fill[("regcache", moved)]), min(per_fill[("dproxy", moved)])
        emptied = "old cache moved aside" if moved else "old cache deleted just before"
        case = f"CPU per cold small-layer fill, per-thread clocks ({fills} blobs, {AT_ONCE} GETs at a time; {emptied})"
        spread = ", ".join(seconds(v) for v in per_fill[("regcache", moved)])
        if moved:
            loop = ", ".join(seconds(v) for v in on_loop[moved])
            rows.append(Row(case, mine, seconds(mine), compare="value", target=("<=", 0.0015),
                            target_label="<= 1.5 ms", note=f"runs: {spread}; of which the event loop's thread: {loop}"))
        rows.append(Row(case, mine, seconds(mine), "distribution proxy", theirs, seconds(theirs),
                        note=f"runs: {spread} against " + ", ".join(seconds(v) for v in per_fill[("dproxy", moved)])))
    return rows
