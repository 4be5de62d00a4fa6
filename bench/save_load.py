"""Save and load of the big image: regcache's /admin/save and /admin/load vs skopeo.

The anchor is what an operator would do without regcache: ``skopeo copy`` from
the registry to a docker-archive, and from that archive into an empty
registry. regcache saves from its own (warm) store and loads into an emptied
store, so both sides write every byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from bench import load
from bench.cases import Bench
from bench.peers import ADMIN_TOKEN, Distribution
from bench.report import Row, not_available, seconds
from tests.support.skopeo import docker_ref


def _curl(args: list[str], timeout: float = 900) -> tuple[int, float]:
    start = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {ADMIN_TOKEN}", "-w", "%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    code = out.stdout.strip()[-3:]
    return (int(code) if code.isdigit() else 0), elapsed


def _save(url: str, image: str, dest: Path) -> tuple[int, float]:
    body = json.dumps({"images": [image]})
    return _curl(
        ["-X", "POST", "-H", "Content-Type: application/json", "-d", body, "-o", str(dest), f"{url}/admin/save"]
    )


def _load(url: str, archive: Path) -> tuple[int, float]:
    # -T streams the file (-d/--data-binary would read it whole into memory first).
    return _curl(
        [
            "-X",
            "POST",
            "-H",
            "Content-Type: application/x-tar",
            "-T",
            str(archive),
            "-o",
            "/dev/null",
            f"{url}/admin/load",
        ]
    )


def save_load(b: Bench) -> list[Row]:
    case = f"save/load of a {b.big.item.layers[-1].size / 2**20:,.0f} MiB image"  # type: ignore[union-attr]
    work = b.workdir / "archives"
    work.mkdir(exist_ok=True)
    probe = work / "probe"
    status, _ = _curl(["-X", "POST", "-d", "{}", "-o", str(probe), f"{b.regcache.url}/admin/save"], timeout=30)
    if status in (0, 401, 404, 405):
        return [not_available(case, f"regcache has no /admin/save here (HTTP {status})")]
    target = Distribution(b.workdir / "load-target").start()
    try:
        ref = f"{b.big.repository}:{b.big.tag}"
        mine, theirs = work / "regcache.tar", work / "skopeo.tar"
        download_url = b.blob_url(b.regcache.url, b.big)
        load.download([download_url])  # the cache holds the image: save reads the store
        save_times, skopeo_save, load_times, skopeo_load = [], [], [], []
        for _ in range(b.repeats):
            status, elapsed = _save(b.regcache.url, ref, mine)
            if status != 200:
                return [not_available(case, f"/admin/save answered {status}")]
            save_times.append(elapsed)
            theirs.unlink(missing_ok=True)
            skopeo_save.append(
                load.skopeo_copy(
                    docker_ref(b.upstream.host, b.big.repository, b.big.tag), f"docker-archive:{theirs}:{ref}"
                )
            )
            b.regcache.reset()
            status, elapsed = _load(b.regcache.url, mine)
            if status != 200:
                return [not_available(case, f"/admin/load answered {status}")]
            load_times.append(elapsed)
            target.reset()
            skopeo_load.append(
                load.skopeo_copy(f"docker-archive:{theirs}", docker_ref(target.host, b.big.repository, b.big.tag))
            )
        return [
            Row(
                f"{case}: save",
                min(save_times),
                seconds(min(save_times)),
                "skopeo copy to docker-archive",
                min(skopeo_save),
                seconds(min(skopeo_save)),
                target=("<=", 1.0),
            ),
            Row(
                f"{case}: load",
                min(load_times),
                seconds(min(load_times)),
                "skopeo copy from docker-archive into distribution",
                min(skopeo_load),
                seconds(min(skopeo_load)),
                target=("<=", 1.0),
            ),
        ]
    finally:
        target.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(target.workdir, ignore_errors=True)
