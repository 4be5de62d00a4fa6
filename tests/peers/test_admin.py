"""The admin verbs against a real regcache process in front of the real distribution registry.

regcache's default upstream is named ``docker.io`` here (its URL is the local registry), so names
read as docker users know them: ``alpha:1`` is ``library/alpha:1`` upstream.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import skopeo
from tests.support.seed import ALPHA, BETA, OCI_INDEX, push_item

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "admin-token-for-tests-0123456789"
SEARCH_RESULTS = [
    {"name": "alpha", "description": "The alpha image, official", "star_count": 42, "is_official": True},
    {"name": "someone/alphaville", "description": "x" * 80, "star_count": 3, "is_official": False},
]


# --------------------------------------------------------------------------- helpers


class _Search(BaseHTTPRequestHandler):
    """Docker Hub's v1 search API, as much as regcache reads of it."""

    def do_GET(self) -> None:
        body = json.dumps({"num_results": len(SEARCH_RESULTS), "results": SEARCH_RESULTS}).encode()
        self.send_response(200 if self.path.startswith("/v1/search?") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def search_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Search)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def cache(upstream, seeded, regcache_factory, search_server):
    entry = {"name": "docker.io", "url": upstream.url, "default": True, "search_url": search_server, "tag_ttl": 0}
    return regcache_factory([entry], settings={"admin": {"token": TOKEN}})


def cli(
    server, *args: str, token: str | None = TOKEN, check: bool = True, process: bool = False
) -> subprocess.CompletedProcess[str]:
    """``regcache VERB --server URL ARGS``: in this process (fast), or as a real process to see
    exactly what a user's terminal gets (stderr lines, exit status)."""
    url = server if isinstance(server, str) else server.url
    verb, *rest = args
    argv = [verb, "--server", url, *rest]
    if process:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
        env["PYTHONPATH"] = str(ROOT)
        if token is not None:
            env["REGCACHE_ADMIN_TOKEN"] = token
        done = subprocess.run([sys.executable, "-m", "proxy.cli", *argv],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    else:
        from proxy.cli.main import main

        saved = os.environ.pop("REGCACHE_ADMIN_TOKEN", None)
        if token is not None:
            os.environ["REGCACHE_ADMIN_TOKEN"] = token
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 2
        finally:
            os.environ.pop("REGCACHE_ADMIN_TOKEN", None)
            if saved is not None:
                os.environ["REGCACHE_ADMIN_TOKEN"] = saved
        done = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check:
        assert done.returncode == 0, done.stderr
    return done


def admin(server, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server.url}/admin/{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if raw.startswith(b"{") else raw), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), dict(error.headers)


def stored(server) -> set[str]:
    return {f"sha256:{p.name}" for p in (server.data_dir / "blobs" / "sha256").rglob("*") if p.is_file()}


def short(digest: str) -> str:
    return digest.split(":")[1][:12]


def image_json(server, *args: str) -> list[dict[str, Any]]:
    out = cli(server, "images", "--format", "{{json .}}", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


# --------------------------------------------------------------------------- the token guard


def test_missing_or_wrong_token_gets_401_and_changes_nothing(cache, seeded):
    cli(cache, "pull", "alpha:1")
    before = stored(cache)
    for token in (None, "wrong-token-of-some-length"):
        status, body, headers = admin(cache, "POST", "rmi", {"images": ["alpha:1"], "force": True}, token=token)
        assert status == 401
        assert body["errors"][0]["code"] == "UNAUTHORIZED"
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = admin(cache, "POST", "gc?grace=0", token=token)
        assert status == 401
    assert stored(cache) == before
    assert [r["Repository"] for r in image_json(cache)] == ["alpha"]
    # The CLI with the wrong token: one line, non-zero.
    done = cli(cache, "rmi", "alpha:1", token="wrong-token-of-some-length", check=False, process=True)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "unauthorized" in done.stderr
    assert stored(cache) == before


def test_without_a_token_there_is_no_admin_api(upstream, seeded, regcache_factory):
    server = regcache_factory([{"name": "docker.io", "url": upstream.url, "default": True}])
    status, _, _ = admin(server, "GET", "images")
    assert status == 404
    done = cli(server, "images", check=False, process=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"regcache images: {server.url} has no admin API (is admin.token set there?)"
    ]


def test_admin_is_refused_without_a_real_token():
    from config.settings import ConfigError, Settings
    from proxy.admin.guard import admin_token, check_admin_exposure, token_guard

    with pytest.raises(ConfigError, match=r"admin\.token"):
        admin_token(Settings(admin={"token": "   "}))
    with pytest.raises(ConfigError, match="refusing"):
        check_admin_exposure(Settings(listen="0.0.0.0:5000"), None)
    with pytest.raises(ConfigError):
        token_guard([])
    check_admin_exposure(Settings(listen="127.0.0.1:5000"), None)  # loopback without admin: fine
    assert admin_token(Settings()) is None
    assert admin_token(Settings(admin={"token": TOKEN})) == TOKEN


def test_serve_refuses_to_start_with_a_blank_admin_token(upstream, tmp_path):
    from tests.support.regcache import RegcacheError, RegcacheProcess

    server = RegcacheProcess(
        tmp_path / "r",
        [{"name": "docker.io", "url": upstream.url, "default": True}],
        settings={"admin": {"token": "x"}},
    )
    with pytest.raises(RegcacheError, match="exited with 2"):
        server.start()
    assert "configuration error: admin.token: must be at least 8 characters" in server.log_text()


def test_regcache_admin_token_environment_variable_enables_admin(upstream, seeded, regcache_factory):
    server = regcache_factory(
        [{"name": "docker.io", "url": upstream.url, "default": True}], env={"REGCACHE_ADMIN_TOKEN": TOKEN}
    )
    assert admin(server, "GET", "images")[0] == 200
    assert admin(server, "GET", "images", token=TOKEN + "x")[0] == 401


# --------------------------------------------------------------------------- pull


def test_pull_warms_the_cache_and_prints_docker_progress(cache, upstream, seeded, tmp_path):
    alpha = seeded[ALPHA]
    upstream.reset_requests()
    out = cli(cache, "pull", "alpha:1").stdout.splitlines()
    assert out[0] == "1: Pulling from library/alpha"
    for layer in alpha.item.layer_digests:
        assert f"{short(layer)}: Pull complete" in out
    assert out[-2:] == [f"Digest: {alpha.digest}", "Status: Downloaded newer image for alpha:1"]
    assert not any("Downloading" in line for line in out)  # piped: no progress bars
    for blob in alpha.blob_digests:
        assert upstream.blob_gets(blob) == 1
    assert set(alpha.blob_digests) <= stored(cache)
    # Warm: a second pull fetches nothing, and a real client pulls without the upstream's blobs.
    again = cli(cache, "pull", "alpha:1").stdout.splitlines()
    assert again[-1] == "Status: Image is up to date for alpha:1"
    assert f"{short(alpha.item.layer_digests[0])}: Already exists" in again
    skopeo.copy(skopeo.docker_ref(cache.host, "library/alpha", "1"), f"oci:{tmp_path / 'a'}:x")
    assert sum(upstream.blob_gets(b) for b in alpha.blob_digests) == len(alpha.blob_digests)
    assert cli(cache, "pull", "-q", "alpha:1").stdout == "alpha:1\n"


def test_pull_of_a_multi_arch_image_takes_the_asked_platforms(cache, seeded):
    index = seeded[OCI_INDEX]
    arm = index.item.for_platform(("linux", "arm64", "v8"))
    amd = index.item.for_platform(("linux", "amd64"))
    cli(cache, "pull", "--platform", "linux/arm64", "multi/oci-index:1")
    assert set(arm.blob_digests) <= stored(cache)
    assert amd.config_digest not in stored(cache)
    [row] = image_json(cache)
    assert row["Repository"] == "multi/oci-index" and row["Platforms"] == "linux/amd64,linux/arm64/v8"
    assert row["ID"] == short(index.digest)  # an index is known by its own digest
    children = [r for r in image_json(cache, "-a") if r["Tag"] == "<none>"]
    assert [c["ID"] for c in children] == [short(arm.config_digest)]
    cli(cache, "pull", "--all-platforms", "multi/oci-index:1")
    assert set(amd.blob_digests) <= stored(cache)
    done = cli(cache, "pull", "--platform", "linux/s390x", "multi/oci-index:1", check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no matching manifest for linux/s390x" in done.stderr


# --------------------------------------------------------------------------- images


def test_images_shows_docker_columns_for_a_cache(cache, seeded):
    alpha, beta = seeded[ALPHA], seeded[BETA]
    cli(cache, "pull", "alpha:1")
    cli(cache, "pull", "beta:1")
    table = cli(cache, "images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE", "LAST", "PULLED", "PULLS"]
    rows = {r["Repository"]: r for r in image_json(cache)}
    for name, image in (("alpha", alpha), ("beta", beta)):
        row = rows[name]
        assert row["ID"] == short(image.item.config_digest)
        assert row["Tag"] == "1"
        size = len(image.item.config) + sum(layer.size for layer in image.item.layers)
        from proxy.cli.docker_format import human_size

        assert row["Size"] == human_size(size)
        assert row["CreatedAt"].startswith("2024-01-01 ")
        assert row["CreatedSince"].endswith(" ago")
    assert [(r["Repository"], r["Pulls"]) for r in image_json(cache, "alpha")] == [("alpha", 1)]
    quiet = cli(cache, "images", "-q").stdout.split()
    assert sorted(quiet) == sorted([short(alpha.item.config_digest), short(beta.item.config_digest)])
    full = cli(cache, "images", "-q", "--no-trunc").stdout.split()
    assert alpha.item.config_digest in full
    digests = cli(cache, "images", "--digests", "alpha").stdout.splitlines()
    assert digests[0].split()[:3] == ["REPOSITORY", "TAG", "DIGEST"]
    assert digests[1].split()[:4] == ["alpha", "1", alpha.digest, short(alpha.item.config_digest)]
    custom = cli(cache, "images", "--format", "table {{.ID}}: {{.Repository}}\\t{{.Tag}}", "beta").stdout
    assert custom.splitlines() == [
        "IMAGE ID: REPOSITORY   TAG",
        f"{short(beta.item.config_digest)}: beta".ljust(len("IMAGE ID: REPOSITORY   ")) + "1",
    ]
    assert cli(cache, "images", "-f", "upstream=docker.io", "-q").stdout.split() == quiet
    assert cli(cache, "images", "-f", "upstream=elsewhere", "-q").stdout == ""


def test_dangling_is_an_image_whose_tag_moved_upstream(cache, upstream, seeded, tmp_path):
    alpha, beta = seeded[ALPHA], seeded[BETA]
    push_item(alpha.item, upstream, "moving/app", "v", tmp_path)
    cli(cache, "pull", "moving/app:v")
    push_item(beta.item, upstream, "moving/app", "v", tmp_path)
    cli(cache, "pull", "moving/app:v")  # tag_ttl 0: revalidated, the tag now names beta's manifest
    dangling = image_json(cache, "-f", "dangling=true")
    assert [(r["Repository"], r["Tag"], r["ID"]) for r in dangling] == [
        ("moving/app", "<none>", short(alpha.item.config_digest))
    ]
    # As dockerd: false drops only images without any name; the old one still has its digest.
    named = image_json(cache, "-f", "dangling=false")
    assert [(r["Repository"], r["Tag"]) for r in named] == [("moving/app", "v"), ("moving/app", "<none>")]


# --------------------------------------------------------------------------- rmi


def test_rmi_keeps_the_layers_another_image_uses(cache, upstream, seeded, tmp_path):
    alpha, beta = seeded[ALPHA], seeded[BETA]
    cli(cache, "pull", "alpha:1")
    cli(cache, "pull", "beta:1")
    shared = set(alpha.blob_digests) & set(beta.blob_digests)
    own = set(alpha.blob_digests) - shared
    out = cli(cache, "rmi", "alpha:1").stdout.splitlines()
    assert out[:3] == ["Untagged: alpha:1", f"Untagged: alpha@{alpha.digest}", f"Deleted: {alpha.item.config_digest}"]
    assert {line.removeprefix("Deleted: ") for line in out[3:]} == own - {alpha.item.config_digest} | {alpha.digest}
    left = stored(cache)
    assert shared <= left and not own & left
    assert [r["Repository"] for r in image_json(cache)] == ["beta"]
    # beta still pulls completely, without asking the upstream for a blob.
    upstream.reset_requests()
    skopeo.copy(skopeo.docker_ref(cache.host, "library/beta", "1"), f"oci:{tmp_path / 'b'}:x")
    assert sum(upstream.blob_gets(b) for b in beta.blob_digests) == 0
    # And alpha comes back through the normal pull-through path.
    cli(cache, "pull", "alpha:1")
    assert set(alpha.blob_digests) <= stored(cache)


def test_rmi_by_id_used_by_several_tags_needs_force(cache, upstream, seeded, tmp_path):
    alpha = seeded[ALPHA]
    push_item(alpha.item, upstream, "library/alpha", "other", tmp_path)
    cli(cache, "pull", "alpha:1")
    cli(cache, "pull", "alpha:other")
    image_id = short(alpha.item.config_digest)
    before = stored(cache)
    done = cli(cache, "rmi", image_id[:6], check=False, process=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"Error response from daemon: conflict: unable to delete {image_id} (must be forced) - "
        "image is referenced in multiple repositories"
    ]
    assert stored(cache) == before
    out = cli(cache, "rmi", "-f", image_id).stdout.splitlines()
    assert out[:3] == ["Untagged: alpha:1", "Untagged: alpha:other", f"Untagged: alpha@{alpha.digest}"]
    assert f"Deleted: {alpha.item.config_digest}" in out
    assert not set(alpha.blob_digests) & stored(cache)
    assert image_json(cache) == []


def test_rmi_of_one_of_two_tags_only_untags(cache, upstream, seeded, tmp_path):
    alpha = seeded[ALPHA]
    push_item(alpha.item, upstream, "library/alpha", "second", tmp_path)
    cli(cache, "pull", "alpha:1")
    cli(cache, "pull", "alpha:second")
    assert cli(cache, "rmi", "alpha:second").stdout == "Untagged: alpha:second\n"
    assert [(r["Repository"], r["Tag"]) for r in image_json(cache)] == [("alpha", "1")]
    assert set(alpha.blob_digests) <= stored(cache)
    done = cli(cache, "rmi", "alpha:second", "nope:1", check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "Error response from daemon: No such image: alpha:second",
        "Error response from daemon: No such image: nope:1",
    ]


# --------------------------------------------------------------------------- pin, gc, stats, search


def test_pin_unpin_gc_and_stats(cache, seeded):
    alpha = seeded[ALPHA]
    cli(cache, "pull", "alpha:1")
    assert cli(cache, "pin", "alpha:1").stdout == "Pinned: alpha:1\n"
    stats = json.loads(cli(cache, "stats", "--json").stdout)
    assert stats["images"] == 1 and stats["pinned"] == 1
    assert stats["blobs"] == len(alpha.blob_digests) + 1  # and the manifest
    assert stats["size"] >= sum(layer.size for layer in alpha.item.layers)
    assert 0 <= stats["hit_ratio"] <= 1
    assert [r["Pinned"] for r in image_json(cache)] == [True]
    refused = cli(cache, "rmi", "alpha:1", check=False)
    assert refused.returncode == 1 and "is pinned" in refused.stderr and refused.stderr.count("\n") == 1
    assert set(alpha.blob_digests) <= stored(cache)
    assert cli(cache, "unpin", alpha.item.config_digest[7:19]).stdout == "Unpinned: alpha:1\n"
    assert [r["Pinned"] for r in image_json(cache)] == [False]
    assert "Hit ratio:" in cli(cache, "stats").stdout
    # Nothing unreferenced: gc removes nothing, and every image still pulls.
    assert cli(cache, "gc", "--grace", "0").stdout.startswith("Deleted blobs: 0\n")
    assert set(alpha.blob_digests) <= stored(cache)


def test_search_lists_cached_repositories_then_the_upstreams_results(cache, seeded):
    cli(cache, "pull", "alpha:1")
    lines = cli(cache, "search", "alpha").stdout.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION", "STARS", "OFFICIAL", "CACHED"]
    assert lines[1].split()[0] == "alpha" and lines[1].split()[-2:] == ["[OK]", "[OK]"]  # upstream's stars merged
    assert "42" in lines[1].split()
    assert lines[2].split()[0] == "someone/alphaville" and lines[2].rstrip().endswith("3")
    assert "x" * 44 + "…" in lines[2]  # docker's description truncation
    official = cli(cache, "search", "--filter", "is-official=true", "--format", "{{.Name}} {{.Cached}}", "alp")
    assert official.stdout == "alpha [OK]\n"
    limited = cli(cache, "search", "--limit", "1", "--format", "{{.Name}}", "alpha").stdout
    assert limited == "alpha\n"


def test_cli_errors_are_one_line_and_non_zero(cache, upstream):
    cases = [
        (("images",), None, "no admin token: set REGCACHE_ADMIN_TOKEN or pass --token-file"),
        (("images", "-f", "colour=red"), TOKEN, "invalid filter 'colour=red'"),
        (("images", "--format", "{{.Nope"), TOKEN, "template: unclosed action"),
        (("images", "-f", "before=nope:1"), TOKEN, "No such image: nope:1"),
        (("pull", "library/absent:1"), TOKEN, "absent"),
        # Digits to str.isdigit() that int() refuses: an error, not a crash.
        (("search", "--filter", "stars=\u00b2", "alpha"), TOKEN, "invalid filter 'stars=\u00b2'"),
    ]
    for args, token, message in cases:
        done = cli(cache, *args, token=token, check=False, process=True)
        assert done.returncode == 1, args
        assert done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
    dead = cli("http://127.0.0.1:9", "images", check=False, process=True)
    assert dead.returncode == 1 and dead.stderr.count("\n") == 1 and "cannot reach" in dead.stderr
