"""SIGHUP reloads the access rules of a running ``regcache serve`` from its config file.

The real distribution registry is the upstream; alice (htpasswd) pulls through regcache while
the test rewrites the rules and signals the process: a rule added or removed decides her next
request, and a file that does not load leaves the rules as they were, with a log line.
"""

from __future__ import annotations

import base64
import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import yaml

from tests.support.regcache import RegcacheProcess
from tests.support.registry import bcrypt_hash
from tests.support.seed import ALPHA, BETA

PASSWORD = "alice-reload-pw"
ALICE = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}
RELOADED = "access rules reloaded"
FAILED = "config reload failed, keeping the old access rules"


def get_manifest(server: RegcacheProcess, image: Any) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{server.url}/v2/{image.repository}/manifests/{image.tag}",
                                     headers={**ALICE, "Accept": image.media_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def rewrite(server: RegcacheProcess, change: Any) -> None:
    config = yaml.safe_load(server.config_path.read_text())
    change(config)
    server.config_path.write_text(yaml.safe_dump(config))


def sighup(server: RegcacheProcess, expect: str) -> None:
    """Signal the process and wait until it logged the outcome ``expect`` once more."""
    assert server.process is not None
    before = server.log_text().count(expect)
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while server.log_text().count(expect) == before:
        assert server.process.poll() is None, server.log_text()[-2000:]
        assert time.monotonic() < deadline, f"{expect!r} not logged:\n{server.log_text()[-2000:]}"
        time.sleep(0.02)


def test_sighup_reloads_access_rules_and_a_broken_file_keeps_the_old_ones(upstream, seeded, regcache_factory, tmp_path):
    alpha, beta = seeded[ALPHA], seeded[BETA]
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt_hash(PASSWORD)}\n")
    server = regcache_factory(
        [{"name": "docker.io", "url": upstream.url, "default": True, "prefetch": 0}],
        settings={"auth": {"htpasswd": str(htpasswd)},
                  "access": {"users": {"alice": [{"repositories": ["library/alpha"]}]}}},
    )
    assert get_manifest(server, alpha)[0] == 200
    assert get_manifest(server, beta)[0] == 403

    # A rule added: beta is hers from the next request on.
    rewrite(server, lambda c: c["access"]["users"]["alice"][0]["repositories"].append("library/beta"))
    sighup(server, RELOADED)
    assert get_manifest(server, beta)[0] == 200

    # A deny list added and her beta rule removed: both images are refused, cached as they are.
    def tighten(config: dict[str, Any]) -> None:
        config["upstreams"][0]["deny"] = ["library/alpha"]
        config["access"]["users"]["alice"][0]["repositories"] = ["library/alpha"]

    rewrite(server, tighten)
    sighup(server, RELOADED)
    status, body = get_manifest(server, alpha)
    assert status == 403
    assert body["errors"][0]["code"] == "DENIED"
    assert "upstream docker.io" in body["errors"][0]["message"]
    assert get_manifest(server, beta)[0] == 403
    tight = yaml.safe_load(server.config_path.read_text())

    # Files that do not load (the first would let both in): the old rules stay, and the log says so.
    def broken(config: dict[str, Any]) -> None:
        config["upstreams"][0]["deny"] = []
        config["access"]["users"]["alice"] = [{"repositories": ["**"], "upstreem": "docker.io"}]

    rewrite(server, broken)
    sighup(server, FAILED)
    assert get_manifest(server, alpha)[0] == 403
    assert get_manifest(server, beta)[0] == 403
    server.config_path.write_text("upstreams: [\n")  # not YAML at all
    sighup(server, FAILED)
    assert get_manifest(server, alpha)[0] == 403

    # Mended, the file is taken again: the deny list gone, alpha is hers once more.
    tight["upstreams"][0]["deny"] = []
    server.config_path.write_text(yaml.safe_dump(tight))
    sighup(server, RELOADED)
    assert get_manifest(server, alpha)[0] == 200
    assert get_manifest(server, beta)[0] == 403
    assert server.process is not None and server.process.poll() is None
