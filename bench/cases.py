"""The cases of the benchmark, each measured against its anchors in the same run.

A case function takes the ``Bench`` (running peers, seeded images, sizes) and
returns ``Row``s; it never asserts. Cold runs empty the cache first
(``reset``), warm runs pull once before measuring.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.load import best, download
from bench.peers import Distribution, Floor, Nginx, Regcache
from bench.report import Row, megabytes, per_second, rate, seconds
from tests.support.seed import SeededImage
from tests.support.skopeo import docker_ref

SCRATCH = Path("/dev/shm")  # memory, where the machine has it

MANIFEST_ACCEPT = (
    "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"
)


@dataclass
class Bench:
    workdir: Path
    upstream: Distribution  # distribution serving its own content
    counted: Distribution  # the same storage behind a request counter
    dproxy: Distribution  # distribution as a pull-through cache of ``upstream``
    regcache: Regcache  # regcache in front of ``upstream``
    floor: Floor  # the bare verifying relay in front of ``upstream`` (bench.floor)
    floor_spool: Floor  # the same, sending each batch from the spool once written, as regcache does
    wan_regcache: Regcache  # regcache in front of ``counted`` through a paced link
    nginx: Nginx  # serves ``regcache``'s store as static files
    big: SeededImage  # one big layer
    mid: SeededImage  # one medium layer, for the paced-link case
    small: SeededImage  # many small layers
    starter: SeededImage  # like ``small``, other bytes: what a cache served before the pull measured
    repeats: int
    wrk_seconds: float
    wan_rate: int
    say: Callable[[str], None]
    quick: bool = False  # a smoke test, not figures: cases may give up on a hung peer sooner

    @staticmethod
    def blob_url(base: str, image: SeededImage, digest: str | None = None) -> str:
        return f"{base}/v2/{image.repository}/blobs/{digest or _layer(image)}"


def _layer(image: SeededImage) -> str:
    return image.blob_digests[-1]


def _size(image: SeededImage) -> int:
    return image.item.layers[-1].size  # type: ignore[union-attr]


def _committed(regcache: Regcache, digest: str, timeout: float = 60) -> None:
    # Clients get the last byte once the digest is verified; the file lands after its fsync.
    deadline = time.monotonic() + timeout
    while not regcache.blob_file(digest).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# How long ``quiet`` waits for an idle machine, and over how long a window it judges: a
# --quick run is a smoke test, not figures, and must end soon on a machine that other work
# keeps busy (most of a quick run's time was these windows).
QUIET_TIMEOUT = 30.0
QUIET_WINDOW = 0.5


def quiet(busy_below: float = 0.25, timeout: float | None = None) -> None:
    """Wait (bounded) until the machine's CPUs are mostly idle (not waiting on the disk) over ``QUIET_WINDOW``."""
    timeout = QUIET_TIMEOUT if timeout is None else timeout

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3]  # iowait counts as busy: a commit's fsync is still going on
        return sum(fields) - idle, idle

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0, idle0 = busy_idle()
        time.sleep(QUIET_WINDOW)
        busy1, idle1 = busy_idle()
        total = (busy1 - busy0) + (idle1 - idle0)
        if total and (busy1 - busy0) / total < busy_below:
            return


def _mib(image: SeededImage) -> str:
    return f"{_size(image) / 2**20:,.0f} MiB"


# -------------------------------------------------------------------- blobs


def warm_blob(b: Bench) -> list[Row]:
    regcache_url = b.blob_url(b.regcache.url, b.big)
    dproxy_url = b.blob_url(b.dproxy.url, b.big)
    for url in (regcache_url, dproxy_url):
        download([url])  # warm both caches
    _committed(b.regcache, _layer(b.big))
    # Distribution finishes a second upstream fetch (a 1 GiB write) in the
    # background: whoever is measured first must not share the cores with it.
    quiet()
    hex_ = _layer(b.big).split(":", 1)[1]
    nginx_url = f"{b.nginx.url}/blobs/sha256/{hex_[:2]}/{hex_}"
    rows = []
    peers = [("regcache", regcache_url), ("dproxy", dproxy_url), ("nginx", nginx_url)]
    for clients in (1, 8):
        runs: dict[str, list[load.Transfer]] = {name: [] for name, _ in peers}
        for repeat in range(b.repeats):
            # Each peer goes first once: a burst of other work on the machine hits all alike.
            for name, url in peers[repeat % len(peers) :] + peers[: repeat % len(peers)]:
                runs[name].append(download([url] * clients))
        figures = {name: best(found).throughput for name, found in runs.items()}
        case = f"warm {_mib(b.big)} blob GET, {clients} client{'s' if clients > 1 else ''}"
        reg = figures["regcache"]
        rows.append(
            Row(
                case,
                reg,
                rate(reg),
                "distribution proxy, warm",
                figures["dproxy"],
                rate(figures["dproxy"]),
                target=(">=", 1.0),
            )
        )
        rows.append(
            Row(case, reg, rate(reg), "nginx, same file", figures["nginx"], rate(figures["nginx"]), target=(">=", 0.9))
        )
    return rows


def cold_blob(b: Bench) -> list[Row]:
    direct = best([download([b.blob_url(b.upstream.url, b.big)]) for _ in range(b.repeats)])
    peers: list[tuple[str, Regcache | Distribution | Floor]] = [
        ("regcache", b.regcache), ("dproxy", b.dproxy), ("floor", b.floor), ("floor-spool", b.floor_spool)]
    runs: dict[str, list[load.Transfer]] = {name: [] for name, _ in peers}
    # CPU of the serving process from the request until it is idle again: distribution
    # stores the blob with a second upstream GET after its client is served.
    cpu: dict[str, list[float]] = {name: [] for name, _ in peers}
    # CPU of the whole machine while the client downloads (upstream, proxy, curl, kernel): on
    # two cores the client's pace is bounded by what its bytes cost there.
    path: dict[str, list[float]] = {name: [] for name, _ in peers}
    first: dict[str, list[load.Transfer]] = {name: [] for name, _ in peers}
    for repeat in range(b.repeats):
        # Each goes first in turn; each starts on an idle machine (distribution's
        # background store of the previous blob, a commit's fsync, done).
        turn = repeat % len(peers)
        for name, peer in peers[turn:] + peers[:turn]:
            peer.reset()
            quiet()
            url = b.blob_url(peer.url, b.big)
            used, machine = load.cpu_seconds(peer.pids()), load.machine_cpu_seconds()
            runs[name].append(download([url]))
            path[name].append(load.machine_cpu_seconds() - machine)
            quiet()
            cpu[name].append(load.cpu_seconds(peer.pids()) - used)
            # The blob's first read from the store: regcache's spool went around the page
            # cache (storage.directio), distribution's background store through it. The bare
            # relays keep nothing to serve.
            if not isinstance(peer, Floor):
                first[name].append(download([url]))
    cold, dcold, floor = best(runs["regcache"]), best(runs["dproxy"]), best(runs["floor"])
    floor_spool = best(runs["floor-spool"])
    case = f"cold {_mib(b.big)} blob GET"
    size = _size(b.big)
    hashing, writing = _sha256_rate(size), _new_file_rate(b.workdir, size)
    gib = size / 2**30
    return [
        Row(case, cold.throughput, rate(cold.throughput), "distribution proxy, cold", dcold.throughput,
            rate(dcold.throughput), target=(">=", 1.0), note="throughput"),
        Row(
            case,
            cold.throughput,
            rate(cold.throughput),
            "direct GET from upstream",
            direct.throughput,
            rate(direct.throughput),
            target=(">=", 0.9),
            note="throughput",
        ),
        Row(
            case,
            cold.ttfb,
            seconds(cold.ttfb),
            "direct GET from upstream",
            direct.ttfb,
            seconds(direct.ttfb),
            compare="diff",
            target=("<=", 0.050),
            note="time to first byte",
        ),
        Row(case, min(cpu["regcache"]) / gib, seconds(min(cpu["regcache"]) / gib), "distribution proxy, cold",
            min(cpu["dproxy"]) / gib, seconds(min(cpu["dproxy"]) / gib), compare="ratio", target=("<=", 1.0),
            note="CPU of the serving process per GiB, serving and storing"),
        Row(case, best(first["regcache"]).throughput, rate(best(first["regcache"]).throughput),
            "distribution proxy, cold", best(first["dproxy"]).throughput, rate(best(first["dproxy"]).throughput),
            note="the next GET, the blob's first read from the store"),
        Row(case, min(path["regcache"]) / gib, seconds(min(path["regcache"]) / gib), "distribution proxy, cold",
            min(path["dproxy"]) / gib, seconds(min(path["dproxy"]) / gib), compare="ratio",
            note="CPU of the whole machine per GiB while the client downloads (2 cores: 2 s per s)"),
        # The bare verifying relay: receive, hash, write and send on threads of their own, the
        # last byte after the digest, nothing else. Beside the distribution proxy it says what
        # the design can reach here; beside regcache, what regcache's own code costs.
        Row(case, cold.throughput, rate(cold.throughput), FLOOR, floor.throughput, rate(floor.throughput),
            note="throughput"),
        Row(f"{case}, {FLOOR}", floor.throughput, rate(floor.throughput), "distribution proxy, cold",
            dcold.throughput, rate(dcold.throughput), note="throughput"),
        Row(f"{case}, {FLOOR}", min(path["floor"]) / gib, seconds(min(path["floor"]) / gib),
            "distribution proxy, cold", min(path["dproxy"]) / gib, seconds(min(path["dproxy"]) / gib),
            compare="ratio", note="CPU of the whole machine per GiB while the client downloads (2 cores: 2 s per s)"),
        # Sending what was written, read back from the spool, as regcache does, instead of the
        # receive buffers: what that choice costs, without regcache's code around it.
        Row(case, cold.throughput, rate(cold.throughput), FLOOR_SPOOL, floor_spool.throughput,
            rate(floor_spool.throughput), note="throughput"),
        Row(f"{case}, {FLOOR_SPOOL}", floor_spool.throughput, rate(floor_spool.throughput),
            "distribution proxy, cold", dcold.throughput, rate(dcold.throughput), note="throughput"),
        Row(f"{case}, {FLOOR_SPOOL}", min(path["floor-spool"]) / gib, seconds(min(path["floor-spool"]) / gib),
            "distribution proxy, cold", min(path["dproxy"]) / gib, seconds(min(path["dproxy"]) / gib),
            compare="ratio", note="CPU of the whole machine per GiB while the client downloads (2 cores: 2 s per s)"),
        Row(case, cold.throughput, rate(cold.throughput), "sha256 on one core (every byte is verified)",
            hashing, rate(hashing), note="throughput vs a limit of this machine"),
        Row(case, cold.throughput, rate(cold.throughput), "writing a new file of this size (page cache)",
            writing, rate(writing), note="throughput vs a limit of this machine"),
    ]


FLOOR = "bare verifying relay (bench/floor.py), cold"
FLOOR_SPOOL = "bare verifying relay sending from its spool (bench/floor.py --send-from spool), cold"


def _sha256_rate(size: int) -> float:
    block = os.urandom(1024 * 1024)
    hasher = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(size // len(block)):
        hasher.update(block)
    return (size // len(block)) * len(block) / (time.perf_counter() - start)


def _new_file_rate(workdir: Path, size: int) -> float:
    block = os.urandom(1024 * 1024)
    path = workdir / "write-probe"
    start = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    elapsed = time.perf_counter() - start
    path.unlink()
    return (size // len(block)) * len(block) / elapsed


def coalesced_blob(b: Bench) -> list[Row]:
    """One blob, 32 clients at once, upstream behind a paced link.

    The wall time can only approach the single client's while the proxy's
    egress keeps up with 32 times the upstream's pace; the nginx row (the same
    32 clients on a warm file) shows this machine's egress floor.
    """
    url = b.blob_url(b.wan_regcache.url, b.mid)
    digest = _layer(b.mid)

    def cold(clients: int) -> tuple[load.Transfer, int]:
        b.wan_regcache.reset()
        b.counted.registry.reset_requests()
        quiet()
        transfer = download([url] * clients)
        return transfer, b.counted.registry.blob_gets(digest)

    # Best of the repeats on both sides; the fetch count is the worst seen.
    singles, runs = [cold(1) for _ in range(b.repeats)], [cold(32) for _ in range(b.repeats)]
    single, single_fetches = best([t for t, _ in singles]), max(n for _, n in singles)
    many, fetches = best([t for t, _ in runs]), max(n for _, n in runs)
    hex_ = digest.split(":", 1)[1]
    _committed(b.wan_regcache, digest)
    floor = download([f"{b.nginx.url}/wan/blobs/sha256/{hex_[:2]}/{hex_}"] * 32)
    ok = "" if many.ok and single.ok else ", some clients failed"
    note = f"{_mib(b.mid)}, upstream link paced to {single.throughput / 2**20:,.0f} MiB/s{ok}"
    case = "32 concurrent cold clients, one blob"
    return [
        Row(
            f"{case}: upstream fetches",
            fetches,
            str(fetches),
            "single cold client",
            single_fetches,
            str(single_fetches),
            compare="value",
            target=("==", 1),
            note=note,
        ),
        Row(
            f"{case}: wall time",
            many.wall,
            seconds(many.wall),
            "single cold client",
            single.wall,
            seconds(single.wall),
            compare="ratio",
            target=("<=", 1.2),
            note=note,
        ),
        Row(
            f"{case}: wall time",
            many.wall,
            seconds(many.wall),
            "nginx, 32 clients, same file warm",
            floor.wall,
            seconds(floor.wall),
            compare="ratio",
            note="the machine's egress floor",
        ),
    ]


# -------------------------------------------------------------------- manifests


def manifests(b: Bench) -> list[Row]:
    image = b.small
    rows = []
    for kind, reference in (("tag", image.tag), ("digest", image.digest)):
        path = f"/v2/{image.repository}/manifests/{reference}"
        for peer in (b.regcache, b.dproxy):
            download([peer.url + path])  # cached from here on
        for method in ("GET", "HEAD"):
            figures = {
                name: load.requests_per_second(base + path, method, [MANIFEST_ACCEPT], b.wrk_seconds)
                for name, base in (("regcache", b.regcache.url), ("dproxy", b.dproxy.url), ("own", b.upstream.url))
            }
            reg = figures["regcache"]
            bad = sum(f.bad for f in figures.values())
            note = f"50 connections, {'wrk' if method == 'GET' and b.wrk_seconds >= 1 else 'hey'}" + (
                f", {bad} bad answers" if bad else ""
            )
            case = f"manifest {method} by {kind}, cached"
            proxy_target = (">=", 10.0) if kind == "tag" else None
            rows.append(
                Row(
                    case,
                    reg.requests_per_second,
                    per_second(reg.requests_per_second),
                    "distribution proxy",
                    figures["dproxy"].requests_per_second,
                    per_second(figures["dproxy"].requests_per_second),
                    target=proxy_target,
                    note=note,
                )
            )
            rows.append(
                Row(
                    case,
                    reg.requests_per_second,
                    per_second(reg.requests_per_second),
                    "distribution, own content",
                    figures["own"].requests_per_second,
                    per_second(figures["own"].requests_per_second),
                    target=(">=", 1.0),
                    note=note,
                )
            )
    return rows


# -------------------------------------------------------------------- skopeo


def _pull_seconds(b: Bench, host: str, image: SeededImage) -> float:
    # Many small files go to memory: removing them from the bench's disk before each pull
    # would slow the caches' next file creations (bench.peers.forget).
    many_files = image is b.small or image is b.starter
    dest = (SCRATCH if many_files and SCRATCH.is_dir() else b.workdir) / f"pulled-{os.getpid()}"
    shutil.rmtree(dest, ignore_errors=True)
    # A cache commits a blob (fsync, metadata) after its client has the last
    # byte, and distribution writes in the background: each pull starts on an idle machine.
    quiet()
    try:
        return load.skopeo_copy(docker_ref(host, image.repository, image.tag), f"dir:{dest}")
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _pull_with_cpu(b: Bench, host: str, image: SeededImage, pids: list[int]) -> tuple[float, float]:
    """A pull's seconds, and the CPU seconds ``pids`` spent on it until the machine is quiet again."""
    used = load.cpu_seconds(pids)
    pulled = _pull_seconds(b, host, image)
    quiet()
    return pulled, load.cpu_seconds(pids) - used


def image_pulls(b: Bench) -> list[Row]:
    rows = []
    for label, image in (
        (f"{len(b.small.blob_digests) - 1} small layers", b.small),
        (f"one {_mib(b.big)} layer", b.big),
    ):
        direct = min(_pull_seconds(b, b.upstream.host, image) for _ in range(b.repeats))
        cold, warm, dcold, dwarm = [], [], [], []
        # Each proxy's CPU seconds over each pull, until it is idle again (commits included).
        cold_cpu, warm_cpu, dcold_cpu, dwarm_cpu = [], [], [], []
        first_cpu = []  # regcache's CPU over the starter's pull, the first after a start
        # The small image's caches are moved aside, not deleted (bench.peers.forget), and
        # go with the work directory at the end; a big layer's files are few, and too big to keep.
        aside = b.workdir / "trash" if image is b.small else None
        for _ in range(b.repeats):
            b.regcache.reset(aside)
            # A cache serves cold pulls for weeks after it started: the process has served
            # before the pull measured (the first pull after a start, with its one-off
            # warm-up, is its own figure below).
            _, used = _pull_with_cpu(b, b.regcache.host, b.starter, b.regcache.pids())
            first_cpu.append(used)
            for seconds_, cpu in ((cold, cold_cpu), (warm, warm_cpu)):
                pulled, used = _pull_with_cpu(b, b.regcache.host, image, b.regcache.pids())
                seconds_.append(pulled)
                cpu.append(used)
            b.dproxy.reset(aside)
            _pull_seconds(b, b.dproxy.host, b.starter)
            for seconds_, cpu in ((dcold, dcold_cpu), (dwarm, dwarm_cpu)):
                pulled, used = _pull_with_cpu(b, b.dproxy.host, image, b.dproxy.pids())
                seconds_.append(pulled)
                cpu.append(used)
        # Many small layers: a cold pull as fast as the upstream itself; one big layer: within 10 %.
        cold_target = 1.0 if image is b.small else 1.1
        for state, mine, theirs, target in (("cold", min(cold), min(dcold), cold_target),
                                            ("warm", min(warm), min(dwarm), 1.0)):
            case = f"skopeo pull, {label}, {state}"
            rows.append(
                Row(case, mine, seconds(mine), "direct from upstream", direct, seconds(direct), target=("<=", target))
            )
            rows.append(
                Row(
                    case,
                    mine,
                    seconds(mine),
                    f"distribution proxy, {state}",
                    theirs,
                    seconds(theirs),
                    target=("<=", 1.0),
                )
            )
        if image is b.small:
            # What a fill adds: the cold pull's CPU less the warm pull's (the same client
            # requests, answered from disk), per blob the cold pull fetched.
            fills = len(image.blob_digests)
            per_fill = max(0.0, min(cold_cpu) - min(warm_cpu)) / fills
            theirs = max(0.0, min(dcold_cpu) - min(dwarm_cpu)) / fills
            case = f"CPU per cold small-layer fill ({fills} blobs)"
            rows.append(Row(case, per_fill, seconds(per_fill), compare="value", target=("<=", 0.0015),
                            target_label="<= 1.5 ms",
                            note=f"cold pull {seconds(min(cold_cpu))}, warm {seconds(min(warm_cpu))} of CPU; "
                                 f"the same cold pull as the first after a start: {seconds(min(first_cpu))}"))
            rows.append(Row(case, per_fill, seconds(per_fill), "distribution proxy", theirs, seconds(theirs),
                            note=f"its cold pull {seconds(min(dcold_cpu))}, warm {seconds(min(dwarm_cpu))} of CPU"))
    return rows


# -------------------------------------------------------------------- memory


def memory(b: Bench) -> list[Row]:
    url = b.blob_url(b.regcache.url, b.big)
    b.regcache.reset()
    idle = load.RssSampler(b.regcache.pids)
    with idle:
        time.sleep(0.2)
    rows = []
    for state in ("cold", "warm"):
        with load.RssSampler(b.regcache.pids) as sampler:
            transfer = download([url] * 8)
        note = f"one blob: a fill and 7 followers when cold; idle {megabytes(idle.peak)}" + (
            "" if transfer.ok else ", some clients failed"
        )
        rows.append(
            Row(
                f"memory: peak RSS, 8 clients pulling {_mib(b.big)}, {state}",
                sampler.peak,
                megabytes(sampler.peak),
                compare="value",
                target=("<=", 150e6),
                target_label="<= 150 MB",
                note=note,
            )
        )
    return rows
