"""regcache's S3 mode beside the distribution registry's s3 driver, on one Ceph RGW.

    python bench/s3.py [--size-mib 1024] [--repeats 3] [--cases cold,warm,redirect]

Starts on 127.0.0.1, under one temporary directory removed at the end: a
distribution registry seeded with one image holding a big random layer (the
upstream), a single-node Ceph RADOS Gateway (tests/support/ceph.py), regcache
with ``storage.backend: s3`` and the distribution registry as a pull-through
proxy of the same upstream with its own s3 driver (default settings), each on a
bucket of its own in that gateway. Both get the same client (curl to
/dev/null); every figure is the best of the repeats, the peers taking turns at
going first.

- cold: each run starts a peer afresh on a new, empty bucket with no local
  state. Throughput is curl's; "readable" runs from the GET's start until a HEAD
  of the blob's key in the peer's bucket answers (polled every 50 ms). The
  distribution proxy streams the upstream's bytes to its client unverified and
  stores the blob with a second upstream GET in the background; regcache
  verifies the digest before the client's last byte and completes its multipart
  upload only after that.
  A third peer, regcache on its filesystem backend (no object store at all),
  gives the bound of regcache's verified path (hash, spool, send) here.
- warm: both stream the stored blob from the bucket to the client.
- redirect: both answer 307 to a presigned URL of the bucket (regcache
  ``storage.s3.redirect: true``, distribution's default), curl follows it.
  Then the 307 alone, with hey: answers per second and CPU per answer, what a
  replica spends per blob request in redirect mode.

CPU: user plus system seconds per GiB (``/proc/PID/stat``) of the proxy, of
Ceph (radosgw, OSD, monitor) and of the upstream, from a run's start until
every process involved is idle again (a cold fill's upload and distribution's
background store included), least of the repeats. Ceph's idle CPU rate,
measured at start, is taken off its figure. This machine's cores are shared by
all of them and the client, so the CPU figures are what say how the work
scales, not the throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

if __package__ in (None, ""):  # run as a script: the project root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import Transfer, cpu_seconds, download, hey
from bench.peers import Regcache
from bench.report import MIB, Row, cells, markdown, per_second, rate, seconds
from storage import paths
from storage.oci.digest import Digest
from tests.support import images as image_builder
from tests.support.ceph import CephRGW
from tests.support.images import build_big_layer, build_image
from tests.support.registry import Registry
from tests.support.seed import SeededImage, seed_upstream

GIB = 1024 * MIB
CASES = ("cold", "warm", "redirect")
ANCHOR = "distribution proxy, s3 driver, same RGW"
POLL = 0.05


def say(message: str) -> None:
    print(message, flush=True)


class Side(Protocol):
    """One proxy under test, on a bucket of its own."""

    name: str
    bucket: str  # "" when it keeps its blobs elsewhere

    @property
    def url(self) -> str: ...

    def pids(self) -> list[int]: ...

    def key(self, digest: str) -> str: ...

    def fresh(self, bucket: str) -> None: ...

    def redirect(self, on: bool) -> None: ...

    def stop(self) -> None: ...


class RegcacheFilesystem:
    """regcache on its filesystem backend: a cold fill with no object store at all, the bound of
    what regcache's verified path (hash, spool, send) gives a client on this machine."""

    name = "regcache-fs"
    bucket = ""

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        self.peer = Regcache(workdir, upstream_url)

    @property
    def url(self) -> str:
        return self.peer.url

    def pids(self) -> list[int]:
        return self.peer.pids()

    def key(self, digest: str) -> str:
        return ""

    def fresh(self, bucket: str) -> None:
        self.peer.reset()

    def redirect(self, on: bool) -> None:
        pass

    def stop(self) -> None:
        self.peer.stop()


class RegcacheS3(RegcacheFilesystem):
    name = "regcache"

    def __init__(self, workdir: Path, upstream_url: str, rgw: CephRGW, bucket: str) -> None:
        self.rgw = rgw
        self.bucket = bucket
        self._redirect = False
        self.peer = Regcache(workdir, upstream_url, settings=self._settings())

    def _settings(self) -> dict[str, Any]:
        return {"storage": {"backend": "s3", "s3": self.rgw.s3_settings(self.bucket, redirect=self._redirect)}}

    def key(self, digest: str) -> str:
        return paths.blob_key(Digest.parse(digest))

    def fresh(self, bucket: str) -> None:
        self.bucket = bucket
        self.peer.settings = self._settings()
        self.peer.reset()  # no SQLite index, no spool: nothing of the last run is known

    def redirect(self, on: bool) -> None:
        self._redirect = on
        self.peer.settings = self._settings()
        self.peer.stop()
        self.peer.start()


class DistributionS3:
    name = "distribution"

    def __init__(self, workdir: Path, upstream_url: str, rgw: CephRGW, bucket: str) -> None:
        self.rgw = rgw
        self.bucket = bucket
        self._redirect = False
        self.registry = Registry(
            workdir, proxy_remote_url=upstream_url, count_requests=False, extra_config=self._config()
        )

    def _config(self) -> dict[str, Any]:
        s3 = {
            "accesskey": self.rgw.access_key,
            "secretkey": self.rgw.secret_key,
            "region": "us-east-1",
            "regionendpoint": self.rgw.endpoint,  # also selects path-style addressing
            "bucket": self.bucket,
            "secure": False,
            "v4auth": True,
        }
        return {"storage": {"filesystem": None, "s3": s3, "redirect": {"disable": not self._redirect}}}

    @property
    def url(self) -> str:
        return self.registry.url

    def pids(self) -> list[int]:
        return [] if self.registry.pid is None else [self.registry.pid]

    def key(self, digest: str) -> str:
        algorithm, hex_ = digest.split(":", 1)
        return f"docker/registry/v2/blobs/{algorithm}/{hex_[:2]}/{hex_}/data"

    def fresh(self, bucket: str) -> None:
        self.bucket = bucket  # its only state is in the bucket (the proxy's scheduler state too)
        self.registry.extra_config = self._config()
        self.registry.restart()

    def redirect(self, on: bool) -> None:
        self._redirect = on
        self.registry.extra_config = self._config()
        self.registry.restart()

    def start(self) -> DistributionS3:
        self.registry.start()
        return self

    def stop(self) -> None:
        self.registry.stop()


@dataclass(frozen=True)
class Run:
    transfer: Transfer
    readable: float | None  # seconds from the GET's start until the blob was readable in the bucket
    proxy_cpu: float
    ceph_cpu: float
    upstream_cpu: float


class Meter:
    """CPU of the proxy, Ceph and the upstream around one run."""

    def __init__(self, rgw: CephRGW, upstream: Registry) -> None:
        self.rgw = rgw
        self.upstream = upstream
        self.ceph_idle = 0.0  # Ceph's CPU seconds per second with nothing to do

    def measure_idle(self, span: float = 3.0) -> None:
        before, started = cpu_seconds(self.rgw.pids()), time.monotonic()
        time.sleep(span)
        self.ceph_idle = (cpu_seconds(self.rgw.pids()) - before) / (time.monotonic() - started)

    def _upstream_pids(self) -> list[int]:
        pid = self.upstream.pid
        return [] if pid is None else [pid]

    def snapshot(self, side: Side) -> tuple[float, float, float, float]:
        return (
            time.monotonic(),
            cpu_seconds(side.pids()),
            cpu_seconds(self.rgw.pids()),
            cpu_seconds(self._upstream_pids()),
        )

    def settle(self, side: Side, timeout: float = 300) -> None:
        """Returns once the proxy, Ceph and the upstream have used under 2 % of a core over half
        a second: a cold fill's upload and distribution's background store are over."""
        pids = [*side.pids(), *self.rgw.pids(), *self._upstream_pids()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = cpu_seconds(pids)
            time.sleep(0.5)
            if cpu_seconds(pids) - before <= 0.01 + self.ceph_idle * 0.5:
                return

    def run(self, side: Side, transfer: Callable[[], Transfer], key: str | None) -> Run:
        """``transfer`` measured with the CPU it costs; ``key``: poll the bucket until it is readable."""
        self.settle(side)
        t0, proxy0, ceph0, up0 = self.snapshot(side)
        done: list[Transfer] = []
        client = threading.Thread(target=lambda: done.append(transfer()))
        client.start()
        readable = None if key is None else _readable_after(self.rgw, side.bucket, key, t0)
        client.join()
        self.settle(side)
        t1, proxy1, ceph1, up1 = self.snapshot(side)
        ceph = max(0.0, ceph1 - ceph0 - self.ceph_idle * (t1 - t0))
        return Run(done[0], readable, proxy1 - proxy0, ceph, up1 - up0)


def _readable_after(rgw: CephRGW, bucket: str, key: str, t0: float, timeout: float = 600) -> float | None:
    client = rgw.client()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # botocore's ClientError: a 404 until it is there
            client.head_object(Bucket=bucket, Key=key)
            return time.monotonic() - t0
        time.sleep(POLL)
    return None


def alternating(sides: Sequence[Side], repeats: int, one: Callable[[Side], Run]) -> dict[str, list[Run]]:
    """``repeats`` runs of each side, each side going first in turn."""
    runs: dict[str, list[Run]] = {side.name: [] for side in sides}
    for repeat in range(repeats):
        turn = repeat % len(sides)
        for side in [*sides[turn:], *sides[:turn]]:
            found = one(side)
            runs[side.name].append(found)
            say(f"  {side.name:<12} {_describe(found)}")
    return runs


def _describe(run: Run) -> str:
    size = run.transfer.bytes
    readable = "" if run.readable is None else f", readable after {seconds(run.readable)}"
    status = "" if run.transfer.ok else f" (status {[d.status for d in run.transfer.downloads]})"
    per_gib = GIB / size if size else 0.0
    return (
        f"{rate(run.transfer.throughput)} in {seconds(run.transfer.wall)}{readable}; CPU per GiB: "
        f"proxy {run.proxy_cpu * per_gib:.2f} s, ceph {run.ceph_cpu * per_gib:.2f} s, "
        f"upstream {run.upstream_cpu * per_gib:.2f} s{status}"
    )


def _good(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.transfer.ok] or runs


def throughput_rows(case: str, runs: dict[str, list[Run]], note: str) -> list[Row]:
    reg = max(r.transfer.throughput for r in _good(runs["regcache"]))
    dist = max(r.transfer.throughput for r in _good(runs["distribution"]))
    return [Row(case, reg, rate(reg), ANCHOR, dist, rate(dist), target=(">=", 1.0), note=note)]


def bound_rows(case: str, runs: dict[str, list[Run]]) -> list[Row]:
    fs = max(r.transfer.throughput for r in _good(runs["regcache-fs"]))
    dist = max(r.transfer.throughput for r in _good(runs["distribution"]))
    return [Row(case, fs, rate(fs), ANCHOR, dist, rate(dist),
                note="client throughput of regcache on its filesystem backend, no object store: "
                     "the bound of its verified path here")]


def readable_rows(case: str, runs: dict[str, list[Run]], size: int) -> list[Row]:
    def fastest(side: str) -> float:
        times = [r.readable for r in _good(runs[side]) if r.readable is not None]
        return size / min(times) if times else 0.0

    reg, dist = fastest("regcache"), fastest("distribution")
    return [Row(case, reg, rate(reg), ANCHOR, dist, rate(dist), target=(">=", 1.0),
                note="GET start -> blob readable in the bucket, size / time")]


def cpu_rows(case: str, runs: dict[str, list[Run]], size: int, upstream: bool = False) -> list[Row]:
    """CPU per GiB of the proxy and of Ceph, and of the upstream when it is asked (cold)."""
    rows = []
    kinds: list[tuple[str, Callable[[Run], float]]] = [
        ("proxy process", lambda r: r.proxy_cpu), ("Ceph (radosgw, OSD, mon)", lambda r: r.ceph_cpu)
    ]
    if upstream:
        kinds.append(("upstream registry", lambda r: r.upstream_cpu))
    for what, pick in kinds:
        reg = min(pick(r) for r in _good(runs["regcache"])) * GIB / size
        dist = min(pick(r) for r in _good(runs["distribution"])) * GIB / size
        rows.append(Row(f"{case}: CPU seconds per GiB, {what}", reg, f"{reg:.2f} s", ANCHOR, dist, f"{dist:.2f} s",
                        note="lower is better"))
    return rows


ANSWER_CONNECTIONS = 50
ANSWER_SECONDS = 3.0


@dataclass(frozen=True)
class Answers:
    per_second: float
    proxy_ms: float  # CPU per answer
    ceph_ms: float


def answers(meter: Meter, side: Side, path: str) -> Answers:
    """The blob GET's 307 alone, many times over: what a replica spends per request in redirect mode."""
    meter.settle(side)
    t0, proxy0, ceph0, _ = meter.snapshot(side)
    found = hey(side.url + path, method="GET", seconds=ANSWER_SECONDS, connections=ANSWER_CONNECTIONS, expect=307)
    t1, proxy1, ceph1, _ = meter.snapshot(side)
    count = found.requests_per_second * ANSWER_SECONDS or 1.0
    ceph = max(0.0, ceph1 - ceph0 - meter.ceph_idle * (t1 - t0))
    made = Answers(found.requests_per_second, (proxy1 - proxy0) * 1000 / count, ceph * 1000 / count)
    say(f"  {side.name:<12} {made.per_second:,.0f} answers/s, CPU per answer: proxy {made.proxy_ms:.2f} ms, "
        f"ceph {made.ceph_ms:.2f} ms{f' ({found.bad} not 307)' if found.bad else ''}")
    return made


def answer_rows(runs: dict[str, list[Answers]]) -> list[Row]:
    case = f"blob GET answered 307 (hey, {ANSWER_CONNECTIONS} connections, not followed)"
    reg, dist = runs["regcache"], runs["distribution"]
    best_reg, best_dist = max(a.per_second for a in reg), max(a.per_second for a in dist)
    rows = [Row(case, best_reg, per_second(best_reg), ANCHOR, best_dist, per_second(best_dist), target=(">=", 1.0))]
    for what, pick in (("proxy process", lambda a: a.proxy_ms), ("Ceph (radosgw, OSD, mon)", lambda a: a.ceph_ms)):
        r, d = min(pick(a) for a in reg), min(pick(a) for a in dist)
        rows.append(Row(f"{case}: CPU ms per answer, {what}", r, f"{r:.2f} ms", ANCHOR, d, f"{d:.2f} ms",
                        note="lower is better"))
    return rows


def build(work: Path, size_mib: int) -> dict[str, object]:
    # Random bytes do not compress: gzip stores them (level 0), seconds instead of ~40 s per GiB.
    image_builder._BIG_GZIP_LEVEL = 0
    big = build_big_layer(work / "big.gz", size_mib, seed=random.randrange(1 << 30), compression="gzip")
    return {"bench/big:1": build_image(extra_layers=[big], media_style="docker")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--workdir", type=Path, help="where to put everything (default: a new temporary directory)")
    args = parser.parse_args(argv)
    wanted = args.cases.split(",")
    if set(wanted) - set(CASES):
        parser.error(f"unknown cases: {', '.join(sorted(set(wanted) - set(CASES)))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="regcache-bench-s3-"))
    rows: list[Row] = []
    sides: list[Side] = []
    # Room for a warm copy on each side, a cold one in progress and distribution's upload copy.
    memstore = max(2 * GIB, 6 * args.size_mib * MIB)
    try:
        say(f"building a {args.size_mib} MiB layer")
        images = build(workdir / "layers", args.size_mib)
        with Registry(workdir / "upstream", count_requests=False) as upstream, \
                CephRGW(workdir / "ceph", memstore_bytes=memstore) as rgw:
            seeded: SeededImage = seed_upstream(upstream, workdir / "seed", images)["bench/big:1"]  # type: ignore[arg-type]
            shutil.rmtree(workdir / "seed", ignore_errors=True)
            shutil.rmtree(workdir / "layers", ignore_errors=True)
            digest = seeded.blob_digests[-1]
            size = seeded.item.layers[-1].size  # type: ignore[union-attr]
            path = f"/v2/{seeded.repository}/blobs/{digest}"
            regcache = RegcacheS3(workdir / "regcache", upstream.url, rgw, rgw.make_bucket())
            sides.append(regcache)
            regcache.peer.start()
            distribution = DistributionS3(workdir / "distribution", upstream.url, rgw, rgw.make_bucket()).start()
            sides.append(distribution)
            meter = Meter(rgw, upstream)
            meter.measure_idle()
            say(f"Ceph idle: {meter.ceph_idle:.3f} CPU s/s")

            def cold(side: Side) -> Run:
                if not side.bucket:  # regcache's filesystem bound: no bucket to swap
                    side.fresh("")
                    return meter.run(side, lambda: download([side.url + path]), None)
                old = side.bucket
                side.fresh(rgw.make_bucket())
                rgw.empty_bucket(old)  # the last run's copy would fill the OSD's RAM
                return meter.run(side, lambda: download([side.url + path]), side.key(digest))

            def warm(follow: bool) -> Callable[[Side], Run]:
                return lambda side: meter.run(side, lambda: download([side.url + path], follow=follow), None)

            if "cold" in wanted:
                say(f"cold {args.size_mib} MiB blob GET, fresh buckets")
                bound = RegcacheFilesystem(workdir / "regcache-fs", upstream.url)
                bound.peer.start()
                try:
                    runs = alternating([*sides, bound], args.repeats, cold)
                finally:
                    bound.stop()
                rows += throughput_rows("cold GET", runs, "client throughput")
                rows += bound_rows("cold GET", runs)
                rows += readable_rows("cold GET", runs, size)
                rows += cpu_rows("cold GET", runs, size, upstream=True)
            for side in sides:  # warm rows start from a stored blob on each side
                if _readable_after(rgw, side.bucket, side.key(digest), time.monotonic(), timeout=1) is None:
                    say(f"  {side.name:<12} {_describe(cold(side))} (filling the bucket for the warm rows)")
            if "warm" in wanted:
                say("warm GET, streamed from the bucket")
                runs = alternating(sides, args.repeats, warm(False))
                rows += throughput_rows("warm GET", runs, "both stream from the bucket")
                rows += cpu_rows("warm GET", runs, size)
            if "redirect" in wanted:
                for side in sides:
                    side.redirect(True)
                say("warm GET, 307 to a presigned URL, curl -L")
                runs = alternating(sides, args.repeats, warm(True))
                rows += throughput_rows("warm GET with redirect", runs, "307 to a presigned URL, curl -L")
                rows += cpu_rows("warm GET with redirect", runs, size)
                say(f"307 answers, hey, {ANSWER_CONNECTIONS} connections, not followed")
                rows += answer_rows({side.name: [answers(meter, side, path) for _ in range(args.repeats)]
                                     for side in sides})
            for side in sides:
                side.stop()
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                side.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    say("")
    for row in rows:
        say(" | ".join(cells(row)))
    say("")
    say(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
