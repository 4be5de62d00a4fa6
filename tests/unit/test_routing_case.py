"""Registry names route whatever their case; repository names stay case-sensitive."""

from __future__ import annotations

import pytest

from config.settings import UpstreamSettings
from proxy.errors import RegistryUnknown
from proxy.pull.routing import Router
from storage.errors import NameInvalid

HUB = UpstreamSettings(name="docker.io", url="https://registry-1.docker.io", default=True)
GHCR = UpstreamSettings(name="ghcr.io", url="https://ghcr.io", aliases=["Mirror.Example:5000"])
ROUTER = Router([HUB, GHCR], HUB)


@pytest.mark.parametrize("ns", ["DOCKER.IO", "Docker.Io", "docker.io", "INDEX.DOCKER.IO"])
def test_ns_names_a_registry_in_any_case(ns):
    route = ROUTER.resolve("busybox", ns=ns)
    assert (route.upstream, route.repository) == (HUB, "library/busybox")


def test_path_prefix_and_configured_names_match_in_any_case():
    assert ROUTER.resolve("GHCR.IO/org/app").upstream is GHCR
    assert ROUTER.resolve("mirror.example:5000/org/app").upstream is GHCR
    assert ROUTER.upstream("MIRROR.EXAMPLE:5000") is GHCR


def test_non_ascii_look_alikes_do_not_fold_into_a_configured_registry():
    with pytest.raises(RegistryUnknown):
        ROUTER.resolve("busybox", ns="doc\u212aer.io")  # KELVIN SIGN lowercases to "k"


def test_repository_names_stay_case_sensitive():
    with pytest.raises(NameInvalid):
        ROUTER.resolve("Library/Busybox", ns="DOCKER.IO")


def test_resolved_routes_are_kept_within_a_bound_and_refusals_never(monkeypatch):
    monkeypatch.setattr("proxy.pull.routing.MAX_CACHED_ROUTES", 3)
    router = Router([HUB, GHCR], HUB)
    first = router.resolve("busybox")
    assert router.resolve("busybox") is first
    assert router.resolve("busybox", ns="ghcr.io").upstream is GHCR  # the same name, another ns
    for _ in range(2):
        with pytest.raises(NameInvalid):
            router.resolve("Busybox")
    for i in range(10):
        router.resolve(f"app{i}")
    assert len(router._routes) <= 3
    assert router.resolve("busybox") == first
