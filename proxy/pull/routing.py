"""Which upstream a request is for, and the repository name there.

In order: containerd's ``?ns=<registry>``; a first path component naming a
configured registry (``/v2/ghcr.io/org/app/...``, also what a hosts.toml host
with a path produces); otherwise the default upstream. Docker Hub's official
images are ``library/<name>``; a bare ``<name>`` means the same.

Registry names are host names, so they match whatever their case
(``?ns=DOCKER.IO``); repository names stay case-sensitive, and the spec's
grammar allows only lower case in them.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.settings import UpstreamSettings
from proxy.errors import RegistryUnknown
from storage.index.rows import RepositoryName
from storage.oci.reference import validate_name


@dataclass(frozen=True, slots=True)
class Route:
    upstream: UpstreamSettings
    repository: str  # the name at the upstream, e.g. library/busybox

    @property
    def upstream_name(self) -> str:
        return self.upstream.name

    @property
    def repository_name(self) -> RepositoryName:
        """The repository as the index names it."""
        return RepositoryName(self.upstream.name, self.repository)


# Routes kept by what the client sent: the same few names come again and again, and resolving one
# costs a regular expression. The names are the clients' to choose: past this many, start over.
MAX_CACHED_ROUTES = 4096


def _looks_like_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


class Router:
    def __init__(self, upstreams: list[UpstreamSettings], default: UpstreamSettings) -> None:
        self.default = default
        self.upstreams = list(upstreams)
        self._by_name: dict[str, UpstreamSettings] = {}
        for upstream in upstreams:
            for name in upstream.names:
                self._by_name[name.lower()] = upstream
        self._routes: dict[tuple[str, str | None], Route] = {}

    def _lookup(self, name: str) -> UpstreamSettings | None:
        # ASCII only: str.lower() folds some non-ASCII letters into ASCII ones (K, the Kelvin sign, to k).
        return self._by_name.get(name.lower()) if name.isascii() else None

    def upstream(self, name: str) -> UpstreamSettings:
        found = self._lookup(name)
        if found is None:
            raise RegistryUnknown(f"registry {name[:100]!r} is not configured on this mirror")
        return found

    def resolve(self, name: str, ns: str | None = None) -> Route:
        key = (name, ns)
        route = self._routes.get(key)
        if route is None:
            route = self._resolve(name, ns)  # raises for what names nothing: never kept
            if len(self._routes) >= MAX_CACHED_ROUTES:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _resolve(self, name: str, ns: str | None) -> Route:
        if ns:
            return self._route(self.upstream(ns), name)
        first, sep, rest = name.partition("/")
        registry = self._lookup(first) if sep else None
        if registry is not None:
            return self._route(registry, rest)
        if sep and _looks_like_registry(first) and self.default.is_docker_hub:
            # Docker Hub has no namespaces with dots; this names a registry we lack.
            raise RegistryUnknown(f"registry {first[:100]!r} is not configured on this mirror")
        return self._route(self.default, name)

    @staticmethod
    def _route(upstream: UpstreamSettings, name: str) -> Route:
        validate_name(name)
        if upstream.is_docker_hub and "/" not in name:
            name = f"library/{name}"
        return Route(upstream, name)

    def client_name(self, upstream_name: str, repository: str) -> str:
        """How a repository is named to clients that do not send ``ns`` (the catalog)."""
        if self._lookup(upstream_name) is self.default:
            return repository
        return f"{upstream_name}/{repository}"
