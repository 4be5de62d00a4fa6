"""The "upstream hangs" case: a cache during its upstream's bad hours.

The upstream is the seeded distribution registry behind the test relay, which
can switch to accepting connections and answering nothing (connections already
open included), the way a registry behind a broken load balancer fails.
regcache (``tag_ttl`` 1 s, other settings at their defaults) and the
distribution registry's proxy both cache the many-layer image through that
relay; then, with the upstream healthy and with it hung, each gets 100
sequential GETs of the cached tag (median and worst latency) and a whole-image
skopeo pull. A request or pull that takes longer than ``PATIENCE`` is given up
(kubelet and the daemons give up well before); a series stops after
``GIVE_UP_AFTER`` such requests in a row, and its figures then read "> PATIENCE"
(a pull: ``PULL_PATIENCE``). A ``--quick`` run gives up sooner.
"""

from __future__ import annotations

import shutil
import statistics
import time
import urllib.error
import urllib.request

from bench import load
from bench.cases import MANIFEST_ACCEPT, Bench, quiet
from bench.peers import Distribution, Regcache
from bench.report import Row, seconds
from tests.support.skopeo import docker_ref

GETS = 100
PATIENCE = 5.0  # per GET; a pull gets PULL_PATIENCE
PULL_PATIENCE = 20.0
# A --quick run is a smoke test: the distribution proxy's hung GETs and pull are given up sooner.
QUICK_PATIENCE, QUICK_PULL_PATIENCE = 1.0, 5.0
GIVE_UP_AFTER = 2
TAG_TTL = 1.0


def _get_seconds(url: str, patience: float) -> float:
    """One GET's latency; ``patience`` when it did not answer in time (or failed)."""
    name, _, value = MANIFEST_ACCEPT.partition(": ")
    request = urllib.request.Request(url, headers={name: value})
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=patience) as response:
            response.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return patience
    return time.perf_counter() - began


def _tag_latencies(url: str, patience: float) -> list[float]:
    found: list[float] = []
    for _ in range(GETS):
        found.append(_get_seconds(url, patience))
        if found[-GIVE_UP_AFTER:] == [patience] * GIVE_UP_AFTER:
            break
    return found


def _pull(b: Bench, host: str, patience: float) -> float:
    dest = b.workdir / "pulled-outage"
    shutil.rmtree(dest, ignore_errors=True)
    quiet()
    try:
        ref = docker_ref(host, b.small.repository, b.small.tag)
        return load.skopeo_copy(ref, f"dir:{dest}", timeout=patience)
    except RuntimeError:  # skopeo stuck or failing (SkopeoError): no pull
        return patience
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _shown(value: float, limit: float) -> str:
    return f"> {limit:g} s (gave up)" if value >= limit else seconds(value)


def upstream_hangs(b: Bench) -> list[Row]:
    relay = Distribution(b.workdir / "outage-relay", count=True, storage=b.upstream.registry.storage_dir)
    mine = Regcache(b.workdir / "outage-regcache", "http://pending", upstream={"tag_ttl": f"{TAG_TTL:g}s"})
    theirs = Distribution(b.workdir / "outage-dproxy", proxy_of="http://pending")
    started: list[Distribution | Regcache] = []
    patience, pull_patience = (QUICK_PATIENCE, QUICK_PULL_PATIENCE) if b.quick else (PATIENCE, PULL_PATIENCE)
    try:
        started.append(relay.start())
        mine.upstream_url = relay.url
        theirs.registry.proxy_remote_url = relay.url
        started += [mine.start(), theirs.start()]
        peers = {"regcache": mine, "distribution proxy": theirs}
        for peer in peers.values():
            _pull(b, peer.host, PULL_PATIENCE)  # the whole image is cached from here on
        figures: dict[tuple[str, str], tuple[list[float], float]] = {}
        for state in ("healthy", "hung"):
            if state == "hung":
                relay.registry.hang()
            time.sleep(TAG_TTL)  # every cached tag is past its TTL
            for name, peer in peers.items():
                url = f"{peer.url}/v2/{b.small.repository}/manifests/{b.small.tag}"
                figures[(name, state)] = (_tag_latencies(url, patience), _pull(b, peer.host, pull_patience))
                b.say(f"  {name}, upstream {state}: done")
        return _rows(figures, patience, pull_patience)
    finally:
        for peer in reversed(started):
            if peer is relay:
                relay.registry.answer_again()  # held connections close, so the proxies stop at once
            peer.stop()


def _rows(figures: dict[tuple[str, str], tuple[list[float], float]], patience: float,
          pull_patience: float) -> list[Row]:
    rows = []
    for state in ("healthy", "hung"):
        (mine, my_pull), (theirs, their_pull) = figures[("regcache", state)], figures[("distribution proxy", state)]
        for label, pick in (("median", statistics.median), ("worst", max)):
            a, d = pick(mine), pick(theirs)
            note = f"distribution proxy: stopped after {len(theirs)} GETs" if len(theirs) < GETS else ""
            rows.append(Row(f"cached-tag GET, upstream {state}, {label} of {GETS}", a, _shown(a, patience),
                            "distribution proxy", d, _shown(d, patience), target=("<=", 1.0), note=note))
        rows.append(Row(f"skopeo pull of a cached image (many small layers), upstream {state}",
                        my_pull, _shown(my_pull, pull_patience), "distribution proxy", their_pull,
                        _shown(their_pull, pull_patience), target=("<=", 1.0)))
    return rows
