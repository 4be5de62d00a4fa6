"""Blob throughput of 1, 2 and 3 regcache replicas on one S3 bucket vs one filesystem regcache.

    python bench/s3_replicas.py [--size-mib 32] [--requests 48] [--concurrency 12]

Starts on 127.0.0.1, under one temporary directory removed at the end: a
distribution registry seeded with one image holding a big random layer (the
upstream), a single-node Ceph RADOS Gateway (tests/support/ceph.py), a
filesystem-backed regcache and three S3-backed regcache replicas on one bucket.
Every cache is warmed first, so this measures hits: GETs of the layer spread
round-robin over the replicas under test, by concurrent clients. Prints MB/s and
the ratio to the filesystem regcache, side by side, from one run. Everything
shares this machine's cores, so the ratios say what one host can do, not what N
hosts would.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from tests.support.ceph import CephRGW
from tests.support.images import build_big_layer, build_image
from tests.support.regcache import RegcacheProcess
from tests.support.registry import Registry
from tests.support.seed import seed_upstream

REPOSITORY = "bench/big"


async def fetch_all(urls: list[str], requests: int, concurrency: int) -> tuple[float, int]:
    """(seconds, bytes) for ``requests`` GETs spread round-robin over ``urls``."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(urls[i % len(urls)])
    received = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal received
        while not queue.empty():
            url = queue.get_nowait()
            async with session.get(url) as r:
                r.raise_for_status()
                async for chunk in r.content.iter_chunked(1 << 20):
                    received += len(chunk)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - started, received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="regcache-bench-s3-") as tmp:
        work = Path(tmp)
        layer = build_big_layer(work / "big.tar.gz", args.size_mib)
        image = build_image(base_layers=[layer])
        servers: list[RegcacheProcess] = []
        with Registry(work / "upstream", count_requests=False) as upstream, CephRGW(work / "ceph") as rgw:
            seed_upstream(upstream, work / "seed", {f"{REPOSITORY}:1": image})
            bucket = rgw.make_bucket()
            entry = {"name": "upstream.bench", "url": upstream.url, "default": True}
            quiet = {"log": {"level": "warning", "format": "json"}}
            s3 = {"storage": {"backend": "s3", "s3": rgw.s3_settings(bucket)}, **quiet}
            try:
                filesystem = RegcacheProcess(work / "fs", [entry], settings=quiet).start()
                servers.append(filesystem)
                replicas = [RegcacheProcess(work / f"s3-{i}", [entry], settings=s3).start() for i in range(3)]
                servers += replicas
                digest = layer.digest
                path = f"/v2/{REPOSITORY}/blobs/{digest}"
                for server in servers:  # warm every cache (the S3 replicas share one fill)
                    asyncio.run(fetch_all([server.url + path], 1, 1))
                rows = [("filesystem, 1 replica", [filesystem])] + [
                    (f"s3 (rgw), {n} replica{'s' if n > 1 else ''}", replicas[:n]) for n in (1, 2, 3)
                ]
                results = []
                for name, targets in rows:
                    seconds, received = asyncio.run(
                        fetch_all([t.url + path for t in targets], args.requests, args.concurrency)
                    )
                    results.append((name, received / seconds / 1e6))
            finally:
                for server in servers:
                    server.stop()
    base = results[0][1]
    print(f"blob hits: {args.requests} GETs of a {args.size_mib} MiB layer, {args.concurrency} concurrent clients")
    print(f"{'store':<24} {'MB/s':>10} {'vs filesystem':>14}")
    for name, rate in results:
        print(f"{name:<24} {rate:>10.1f} {rate / base:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
