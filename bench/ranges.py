"""Ranges, as lazy pullers ask for them: a cold suffix range behind a paced upstream, and
a cached multi-range request.

The cold row is the time to a range's last byte. Its anchors are the upstream
answering the same range itself through the same paced link (what a client
without a cache gets), and the distribution registry's proxy behind that link,
which answers any request for a blob it lacks with the whole blob.
"""

from __future__ import annotations

from bench.cases import Bench, _committed, _layer, _mib, _size, quiet
from bench.load import best, download
from bench.peers import Distribution
from bench.report import Row, seconds

SUFFIX = 64 * 1024
# The multi-range request: this many ranges of RANGE_BYTES spread over the blob.
RANGE_COUNT = 64
RANGE_BYTES = 16 * 1024


def ranges(b: Bench) -> list[Row]:
    digest = _layer(b.big)
    size = _size(b.big)
    suffix = [f"Range: bytes=-{SUFFIX}"]
    direct_url = b.blob_url(b.nginx.throttle_url, b.big)  # the upstream's own 206 over the paced link
    direct = best([download([direct_url], headers=suffix) for _ in range(b.repeats)])
    runs = []
    for _ in range(b.repeats):
        b.wan_regcache.reset()
        quiet()
        runs.append(download([b.blob_url(b.wan_regcache.url, b.big)], headers=suffix))
    cold = best(runs)
    b.wan_regcache.reset()  # stops the background fill of the last run
    dproxy = Distribution(b.workdir / "dproxy-wan", proxy_of=b.nginx.throttle_url).start()
    try:
        # One run: it moves the whole blob over the paced link.
        whole = download([b.blob_url(dproxy.url, b.big)], headers=suffix)
    finally:
        dproxy.stop()
    case = f"cold 64 KiB suffix range of a {_mib(b.big)} blob, upstream paced to {b.wan_rate / 2**20:,.0f} MiB/s"
    ok = "" if cold.ok and direct.ok else ", some requests failed"
    cold_s, direct_s = cold.downloads[0].total, direct.downloads[0].total
    rows = [
        Row(case, cold_s, seconds(cold_s), "the upstream's own 206 over the same link", direct_s, seconds(direct_s),
            compare="ratio", note=f"time to last byte{ok}"),
        Row(case, cold_s, seconds(cold_s), "1.2 x the upstream's own 206", 1.2 * direct_s, seconds(1.2 * direct_s),
            compare="diff", target=("<=", 0.010), note="target: within 1.2x + 10 ms"),
        Row(case, cold_s, seconds(cold_s), "distribution's proxy over the same link", whole.downloads[0].total,
            seconds(whole.downloads[0].total), compare="ratio",
            note=f"time to last byte; distribution sent {whole.bytes:,} bytes (status {whole.downloads[0].status})"),
    ]
    # Cached: regcache's store vs distribution serving its own copy of the blob.
    download([b.blob_url(b.regcache.url, b.big)])
    _committed(b.regcache, digest)
    step = size // RANGE_COUNT
    multi = ["Range: bytes=" + ",".join(f"{i * step}-{i * step + RANGE_BYTES - 1}" for i in range(RANGE_COUNT))]
    tries = max(b.repeats, 5)
    ours = best([download([b.blob_url(b.regcache.url, b.big)], headers=multi) for _ in range(tries)])
    theirs = best([download([b.blob_url(b.upstream.url, b.big)], headers=multi) for _ in range(tries)])
    ok = "" if ours.ok and theirs.ok else ", some requests failed"
    rows.append(Row(
        f"cached multi-range GET ({RANGE_COUNT} ranges of {RANGE_BYTES // 1024} KiB) of a {_mib(b.big)} blob",
        ours.downloads[0].total, seconds(ours.downloads[0].total), "distribution serving the same blob",
        theirs.downloads[0].total, seconds(theirs.downloads[0].total), compare="ratio", target=("<=", 1.2),
        note=f"time to last byte{ok}"))
    return rows
