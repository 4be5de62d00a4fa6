"""Benchmark regcache against the distribution registry and nginx on this machine.

    python bench/run.py [--quick] [--cases NAME,...]

Starts everything on 127.0.0.1 under one temporary directory (removed at the
end): a distribution registry seeded with test images (the upstream, also
"distribution serving its own content"), the same storage behind a request
counter, distribution as a pull-through proxy, regcache in front of the
upstream, a second regcache behind a paced link (nginx ``limit_rate``) for the
coalescing case, and nginx serving regcache's blob files (the hardware limit).
Prints one row per comparison, then the whole table as markdown. No asserts:
this measures, the tests prove.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the project root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cases, fills, notify, outage, ranges, save_load
from bench.peers import REPO_ROOT, Distribution, Floor, Nginx, Regcache
from bench.report import Row, cells, markdown, not_available
from tests.support import images as image_builder
from tests.support.images import build_big_layer, build_image, build_layer
from tests.support.seed import SeededImage, seed_upstream

CASES = {
    "warm": cases.warm_blob,
    "cold": cases.cold_blob,
    "coalesced": cases.coalesced_blob,
    "manifests": cases.manifests,
    "pulls": cases.image_pulls,
    "fills": fills.small_fills,
    "save-load": save_load.save_load,
    "memory": cases.memory,
    "upstream-hangs": outage.upstream_hangs,
    "ranges": ranges.ranges,
    "notify-hung": notify.notify_hung,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short runs: a smoke test, not figures")
    p.add_argument("--big-mib", type=int, help="size of the big layer (default 1024, quick 8)")
    p.add_argument("--mid-mib", type=int, help="size of the paced-link layer (default 128, quick 4)")
    p.add_argument("--small-layers", type=int, help="layers of the many-layer image (default 40, quick 4)")
    p.add_argument("--repeats", type=int, help="runs per figure, best taken (default 3, quick 1)")
    p.add_argument("--seconds", type=float, help="duration of each wrk run (default 3, quick 1)")
    p.add_argument("--wan-mib-per-s", type=int, default=32, help="pace of the upstream link in the coalescing case")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--workdir", type=Path, help="where to put everything (default: a new temporary directory)")
    p.add_argument("--regcache-tree", type=Path, default=REPO_ROOT,
                   help="run regcache from this source tree (e.g. a worktree of an older commit, for an A/B)")
    p.add_argument("--direct-io", action="store_true",
                   help="regcache with storage.direct_io on (a big blob's spool around the page cache)")
    args = p.parse_args(argv)
    defaults = (8, 4, 4, 1, 1.0) if args.quick else (1024, 128, 40, 3, 3.0)
    if args.quick:
        # Its figures mean nothing, so its waits for an idle machine are short: beside other
        # work (the test suite's second worker) each one would otherwise last its whole timeout.
        cases.QUIET_TIMEOUT = 0.3
        cases.QUIET_WINDOW = 0.1
    for name, default in zip(("big_mib", "mid_mib", "small_layers", "repeats", "seconds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"unknown cases: {', '.join(sorted(unknown))}")
    return args


def say(message: str) -> None:
    print(message, flush=True)


def build_images(work: Path, args: argparse.Namespace) -> dict[str, object]:
    # The big image is a Docker schema2 image with a gzip layer, the one kind that
    # `skopeo copy` can write to a docker-archive without rewriting it. Its random
    # bytes do not compress, so gzip stores them (level 0): seconds instead of ~40 s per GiB.
    image_builder._BIG_GZIP_LEVEL = 0
    big = build_big_layer(work / "big.gz", args.big_mib, seed=1, compression="gzip")
    # zstd gives up on random bytes fast as well.
    mid = build_big_layer(work / "mid.zst", args.mid_mib, seed=2, compression="zstd")
    rng = random.Random(3)
    small_layers = [build_layer({f"srv/layer{i}.bin": rng.randbytes(48 * 1024)}) for i in range(args.small_layers)]
    starter_layers = [build_layer({f"srv/starter{i}.bin": rng.randbytes(48 * 1024)}) for i in range(args.small_layers)]
    return {
        "bench/big:1": build_image(extra_layers=[big], media_style="docker"),
        "bench/mid:1": build_image(extra_layers=[mid]),
        "bench/small:1": build_image(extra_layers=small_layers),
        # The same shape with other bytes: what a cache served before the pull measured.
        "bench/starter:1": build_image(extra_layers=starter_layers),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="regcache-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[Distribution | Regcache | Floor | Nginx] = []

    def start(peer):  # type: ignore[no-untyped-def]
        started.append(peer)
        return peer.start()

    rows: list[Row] = []
    try:
        t0 = time.monotonic()
        say(f"building images (big {args.big_mib} MiB, mid {args.mid_mib} MiB, {args.small_layers} small layers)")
        images = build_images(workdir / "layers", args)
        upstream = start(Distribution(workdir / "upstream"))
        seeded: dict[str, SeededImage] = seed_upstream(upstream.registry, workdir / "seed", images)  # type: ignore[arg-type]
        shutil.rmtree(workdir / "seed", ignore_errors=True)
        shutil.rmtree(workdir / "layers", ignore_errors=True)
        counted = start(Distribution(workdir / "counted", count=True, storage=upstream.registry.storage_dir))
        dproxy = start(Distribution(workdir / "dproxy", proxy_of=upstream.url))
        # Only when asked: a tree from before the setting would refuse the key.
        storage = {"storage": {"direct_io": True}} if args.direct_io else {}
        regcache = start(Regcache(workdir / "regcache", upstream.url, tree=args.regcache_tree, settings=storage))
        wan_rate = args.wan_mib_per_s * 2**20
        wan = Regcache(workdir / "regcache-wan", "http://pending", tree=args.regcache_tree, settings=storage)
        floor = start(Floor(workdir / "floor", upstream.url, direct=args.direct_io))
        floor_spool = start(Floor(workdir / "floor-spool", upstream.url, direct=args.direct_io, send_from="spool"))
        nginx = start(Nginx(workdir / "nginx", regcache.data_dir, wan.data_dir, counted.url, wan_rate))
        wan.upstream_url = nginx.throttle_url
        start(wan)
        say(f"peers up in {time.monotonic() - t0:.1f} s")
        bench = cases.Bench(
            workdir=workdir,
            upstream=upstream,
            counted=counted,
            dproxy=dproxy,
            regcache=regcache,
            floor=floor,
            floor_spool=floor_spool,
            wan_regcache=wan,
            nginx=nginx,
            big=seeded["bench/big:1"],
            mid=seeded["bench/mid:1"],
            small=seeded["bench/small:1"],
            starter=seeded["bench/starter:1"],
            repeats=args.repeats,
            wrk_seconds=args.seconds,
            wan_rate=wan_rate,
            say=say,
            quick=args.quick,
        )
        for name in args.cases.split(","):
            t = time.monotonic()
            try:
                found = CASES[name](bench)
            except Exception as exc:  # a broken case must not hide the others' figures
                traceback.print_exc()
                found = [not_available(name, f"failed: {type(exc).__name__}: {exc}"[:200])]
            for row in found:
                say(" | ".join(cells(row)))
            say(f"  ({name}: {time.monotonic() - t:.1f} s)")
            rows.extend(found)
    finally:
        for peer in reversed(started):
            try:
                peer.stop()
            except Exception:
                traceback.print_exc()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    say("")
    say(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
