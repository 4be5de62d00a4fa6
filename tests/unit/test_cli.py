"""The ``regcache`` command's own flags (--version, serve's --upstream and --listen) and the README's install line.

Settings are built from parsed arguments the way ``serve`` builds them, without starting a server;
only invalid values go through ``main``, which stops at the configuration error.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import pytest

from config.settings import Settings
from proxy.app import create_app
from proxy.cli.main import build_parser, main, package_version, settings_from_args
from proxy.pull.routing import Router
from tests.support.fake_upstream import OCI_MANIFEST, FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
MIRROR = "http://127.0.0.1:5001"


@pytest.fixture(autouse=True)
def no_regcache_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings here come from flags alone, whatever REGCACHE_* the shell running the tests has."""
    for key in [key for key in os.environ if key.startswith("REGCACHE_")]:
        monkeypatch.delenv(key)


def serve_settings(tmp_path: Path, *flags: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags]))


def router_for(settings: Settings) -> Router:
    return Router(settings.upstreams, settings.default_upstream)


def test_version_prints_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"regcache {importlib.metadata.version('regcache')}\n"


def test_version_falls_back_to_pyproject_when_the_package_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def not_installed(name: str) -> str:
        asked.append(name)
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert package_version() == PROJECT_VERSION
    assert asked == ["regcache"]


def test_upstream_named_docker_io_takes_docker_hub_requests_to_its_url(tmp_path: Path) -> None:
    settings = serve_settings(tmp_path, "--upstream", f"docker.io={MIRROR}")
    (upstream,) = settings.upstreams
    assert (upstream.name, upstream.url, upstream.is_docker_hub) == ("docker.io", MIRROR, True)
    assert settings.default_upstream is upstream
    router = router_for(settings)
    for name, ns in (("busybox", "docker.io"), ("busybox", None), ("library/busybox", "docker.io")):
        route = router.resolve(name, ns=ns)
        assert (route.upstream.base_url, route.repository) == (MIRROR, "library/busybox")


def test_bare_upstream_url_is_named_after_its_host(tmp_path: Path) -> None:
    settings = serve_settings(tmp_path, "--upstream", MIRROR)
    assert [u.name for u in settings.upstreams] == ["127.0.0.1:5001"]
    assert not settings.default_upstream.is_docker_hub
    assert serve_settings(tmp_path, "--upstream", "https://registry-1.docker.io").default_upstream.name == "docker.io"


def test_repeated_upstreams_are_all_routed_and_the_first_is_the_default(tmp_path: Path) -> None:
    settings = serve_settings(tmp_path, "--upstream", f"docker.io={MIRROR}", "--upstream", "https://ghcr.io",
                              "--upstream", "local:5000=http://127.0.0.1:5002")
    assert [(u.name, u.default) for u in settings.upstreams] == [
        ("docker.io", True), ("ghcr.io", False), ("local:5000", False),
    ]
    router = router_for(settings)
    assert router.resolve("org/app", ns="ghcr.io").upstream.base_url == "https://ghcr.io"
    assert router.resolve("ghcr.io/org/app").repository == "org/app"
    assert router.resolve("team/app", ns="local:5000").upstream.base_url == "http://127.0.0.1:5002"
    assert router.resolve("busybox").upstream.base_url == MIRROR


async def test_ns_docker_io_reaches_the_url_given_for_docker_io(aiohttp_server, aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    fake = FakeUpstream()
    digest = fake.add_image("library/busybox", "latest", [b"busybox layer\n"])
    server = await aiohttp_server(fake.app, host="127.0.0.1")
    settings = serve_settings(tmp_path, "--upstream", f"docker.io={str(server.make_url('')).rstrip('/')}")
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/v2/busybox/manifests/latest?ns=docker.io", headers={"Accept": OCI_MANIFEST})
    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert fake.count("GET", "/v2/library/busybox/manifests/latest") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--upstream", "docker.io"], "--upstream 'docker.io': url must be http(s)://host[:port]"),
        (["--upstream", f"={MIRROR}"], f"--upstream '={MIRROR}': NAME must be a registry host"),
        (["--upstream", f"docker.io/library={MIRROR}"], "NAME must be a registry host"),
        (["--upstream", "docker.io="], "--upstream 'docker.io=': url must be http(s)://host[:port], got ''"),
        (["--upstream", "ftp://mirror.example"], "url must be http(s)://host[:port]"),
        (["--upstream", MIRROR, "--upstream", f"127.0.0.1:5001={MIRROR}"], "the name '127.0.0.1:5001' is used twice"),
        (["--listen", "nope"], "listen: expected HOST:PORT, got 'nope'"),
        (["--listen", "127.0.0.1:99999"], "listen: expected HOST:PORT, got '127.0.0.1:99999'"),
    ],
)
def test_bad_serve_flags_give_one_line_naming_the_setting_and_exit_2(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("regcache: configuration error: ") and message in line
    assert "(top level)" not in line


def test_readme_install_command_waits_for_apt_and_puts_regcache_on_path() -> None:
    readme = (ROOT / "README.md").read_text()
    intro = readme.split("\n## ", 1)[0]
    install, tests = re.findall(r"```sh\n(.*?)\n```", intro, re.DOTALL)
    assert "\n" not in install and tests == "bash tests/bootstrap.sh"
    steps = install.split(" && ")
    # apt-get update has no lock timeout (apt 2.6): it is retried, bounded; install waits for the dpkg lock.
    assert re.fullmatch(r"timeout \d+ sh -c 'until apt-get update; do sleep \d+; done'", steps[0])
    assert [s for s in steps if s.startswith("apt-get ")] == [
        s for s in steps if re.match(r"apt-get -o DPkg::Lock::Timeout=\d+ install ", s)
    ]
    assert any(s.startswith("apt-get ") for s in steps)
    # /usr/local/bin is on root's PATH on Debian; the command ends by running regcache by that name.
    assert "ln -sf /opt/regcache/bin/regcache /usr/local/bin/regcache" in steps
    assert steps[-1] == "regcache serve"
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "\nregcache serve " in quick_start and "\nregcache --version\n" in quick_start
