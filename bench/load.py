"""Load generators and meters: curl for blobs, wrk for small requests, /proc for memory.

Every peer gets exactly the same client, so a figure differs only by the
server that produced it. curl writes to /dev/null and reports its own timings.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import skopeo

_CURL_FORMAT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n"


@dataclass(frozen=True)
class Download:
    status: int
    size: int
    ttfb: float  # seconds to the first body byte, connection included
    total: float


@dataclass(frozen=True)
class Transfer:
    """Several clients started together; ``wall`` runs from the first start to the last end."""

    downloads: tuple[Download, ...]
    wall: float

    @property
    def ok(self) -> bool:
        return all(d.status in (200, 206) for d in self.downloads)

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.downloads)

    @property
    def throughput(self) -> float:
        """Bytes per second over all clients."""
        return self.bytes / self.wall if self.wall > 0 else 0.0

    @property
    def ttfb(self) -> float:
        return max(d.ttfb for d in self.downloads)


def download(urls: Sequence[str], timeout: float = 600, headers: Sequence[str] = (), follow: bool = False) -> Transfer:
    """GET every URL at the same time, one curl process each, with the same ``headers``;
    ``follow`` follows redirects (the times then include the redirect's round trip)."""
    start = time.perf_counter()
    sent = [arg for header in headers for arg in ("-H", header)] + (["-L"] if follow else [])
    procs = [
        subprocess.Popen(
            ["curl", "-sS", "--max-time", str(int(timeout)), *sent, "-o", "/dev/null", "-w", _CURL_FORMAT, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for url in urls
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout + 10)
        fields = out.decode().split()
        if len(fields) != 4:
            results.append(Download(0, 0, 0.0, 0.0))
            continue
        results.append(Download(int(fields[0]), int(fields[1]), float(fields[2]), float(fields[3])))
    return Transfer(tuple(results), time.perf_counter() - start)


def best(runs: Sequence[Transfer]) -> Transfer:
    """The fastest of several runs: noise on a shared machine only ever slows a run down."""
    good = [r for r in runs if r.ok] or list(runs)
    return min(good, key=lambda r: r.wall)


@dataclass(frozen=True)
class Rate:
    requests_per_second: float
    bad: int  # non-2xx answers plus socket errors


def wrk(url: str, *, headers: Sequence[str] = (), seconds: float = 3, connections: int = 50) -> Rate:
    """GET requests per second over ``connections`` keep-alive connections (wrk, 2 threads)."""
    args = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s*(\d+)", out))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        bad += sum(int(n) for n in errors.groups())
    return Rate(float(rps.group(1)) if rps else 0.0, bad)


def hey(
    url: str, *, method: str = "HEAD", headers: Sequence[str] = (), seconds: float = 3, connections: int = 50,
    expect: int = 200,
) -> Rate:
    """Like ``wrk`` for methods wrk cannot measure: wrk waits for a HEAD response's body.
    ``expect`` other than 200 (a 307) also stops hey from following redirects."""
    args = ["hey", "-z", f"{max(100, round(seconds * 1000))}ms", "-c", str(connections), "-m", method]
    if expect != 200:
        args.append("-disable-redirects")
    for header in headers:
        args += ["-H", header]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    bad = sum(int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out) if code != str(expect))
    errors = out.partition("Error distribution:")[2]
    bad += sum(int(n) for n in re.findall(r"\[(\d+)\]\s", errors))
    return Rate(float(rps.group(1)) if rps else 0.0, bad)


def requests_per_second(url: str, method: str, headers: Sequence[str], seconds: float) -> Rate:
    if method == "GET" and seconds >= 1:  # wrk runs whole seconds only
        return wrk(url, headers=headers, seconds=seconds)
    return hey(url, method=method, headers=headers, seconds=seconds)


class RssSampler:
    """Peak and mean of the summed resident set of some processes, sampled from /proc."""

    def __init__(self, pids: Callable[[], Sequence[int]], interval: float = 0.02) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples: list[int] = []

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(sum(rss_bytes(pid) for pid in self._pids()))
            self._stop.wait(self._interval)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmRSS:\s*(\d+) kB", status, re.M)
    return int(found.group(1)) * 1024 if found else 0


def machine_cpu_seconds() -> float:
    """CPU time every process on the machine has used so far, the kernel's included (all but
    idle and iowait in ``/proc/stat``): on 2 cores, at most 2 s per second."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time these processes have used so far, threads that have ended included.

    From ``/proc/PID/stat`` (user + system, in clock ticks): a fill's own threads
    end with it, and the per-thread ``schedstat`` clocks would lose their time.
    """
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def skopeo_copy(src: str, dest: str, timeout: float = 900) -> float:
    """Seconds for one ``skopeo copy`` (TLS off, no credentials, digests preserved)."""
    start = time.perf_counter()
    skopeo.copy(src, dest, timeout=timeout)
    return time.perf_counter() - start
