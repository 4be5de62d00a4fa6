"""The benchmark must keep running: one tiny ``bench/run.py --quick`` pass prints every case.

No figure is checked (timings on a shared machine prove nothing); what this
catches is a bench that rotted: a peer that no longer starts, a case that
raises, a table row that went missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ROWS = (
    "warm 1 MiB blob GET, 1 client",
    "warm 1 MiB blob GET, 8 clients",
    "cold 1 MiB blob GET (throughput)",
    "cold 1 MiB blob GET (time to first byte)",
    "cold 1 MiB blob GET (the next GET, the blob's first read from the store)",
    "cold 1 MiB blob GET (CPU of the whole machine per GiB while the client downloads",
    "cold 1 MiB blob GET, bare verifying relay (bench/floor.py), cold (throughput)",
    "cold 1 MiB blob GET, bare verifying relay sending from its spool (bench/floor.py --send-from spool), cold "
    "(throughput)",
    "32 concurrent cold clients, one blob: upstream fetches",
    "32 concurrent cold clients, one blob: wall time",
    "manifest GET by tag, cached",
    "manifest HEAD by tag, cached",
    "manifest GET by digest, cached",
    "manifest HEAD by digest, cached",
    "skopeo pull, 2 small layers, cold",
    "CPU per cold small-layer fill (3 blobs)",
    "CPU per cold small-layer fill, per-thread clocks (3 blobs, 6 GETs at a time; old cache moved aside)",
    "CPU per cold small-layer fill, per-thread clocks (3 blobs, 6 GETs at a time; old cache deleted just before)",
    "skopeo pull, one 1 MiB layer, warm",
    "save/load of a 1 MiB image",
    "memory: peak RSS, 8 clients pulling 1 MiB, cold",
    "memory: peak RSS, 8 clients pulling 1 MiB, warm",
    "cached-tag GET, upstream healthy, median of 100",
    "cached-tag GET, upstream hung, worst of 100",
    "skopeo pull of a cached image (many small layers), upstream hung",
    "cold 64 KiB suffix range of a 1 MiB blob",
    "cached multi-range GET (64 ranges of 16 KiB) of a 1 MiB blob",
    "skopeo pull, 2 small layers, cold, notification endpoint hung",
)


def _table(argv: list[str]) -> str:
    """Runs a bench script to its end and returns the markdown table it printed last."""
    # Its own session: on a timeout the whole group goes (the registries, nginx and regcache
    # processes the bench started would otherwise outlive the test and hold their ports).
    bench = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        stdout, stderr = bench.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    table = stdout.rpartition("| case | regcache |")[2]
    assert table, stdout[-3000:]
    return table


def test_quick_bench_runs_every_case_and_prints_its_table(tmp_path):
    table = _table([str(ROOT / "bench" / "run.py"), "--quick", "--big-mib", "1", "--mid-mib", "1",
                    "--small-layers", "2", "--seconds", "0.3", "--workdir", str(tmp_path / "bench")])
    for row in EXPECTED_ROWS:
        assert f"| {row}" in table, f"missing row {row!r} in:\n{table}"
    # A case that raised is reported as "failed: ..." instead of its figures.
    assert "failed:" not in table, table


S3_ROWS = (
    "cold GET (client throughput)",
    "cold GET (client throughput of regcache on its filesystem backend",
    "cold GET (GET start -> blob readable in the bucket",
    "cold GET: CPU seconds per GiB, Ceph",
    "warm GET (both stream from the bucket)",
    "warm GET with redirect (307 to a presigned URL, curl -L)",
    "blob GET answered 307",
)


def test_s3_bench_runs_every_case_and_prints_its_table(tmp_path):
    table = _table([str(ROOT / "bench" / "s3.py"), "--size-mib", "2", "--repeats", "1",
                    "--workdir", str(tmp_path / "bench")])
    for row in S3_ROWS:
        assert f"| {row}" in table, f"missing row {row!r} in:\n{table}"
    assert "not available" not in table
