"""The settings schema and how it is loaded.

Precedence, lowest first: embedded defaults, the YAML file, ``REGCACHE_*``
environment variables, command-line flags. Nested keys use ``__`` in the
environment (``REGCACHE_STORAGE__MAX_SIZE=200GiB``), list items their index
(``REGCACHE_UPSTREAMS__0__PASSWORD``). A bad value fails at startup with a
message that names the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from config.globs import check_glob
from config.model import Duration, Size
from config.model import Model as _Model
from config.observability import NotificationSettings, TracingSettings

Glob = Annotated[str, AfterValidator(check_glob)]
# docker-credential-<NAME>: what docker's credential helpers are called on PATH.
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
# Docker Hub's registry sends clients to this token service for credentials.
DOCKER_HUB_TOKEN_REALM = "auth.docker.io"
# Names docker users give Docker Hub; all route to the same upstream.
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the key."""


def _read_secret(value: SecretStr | None, file: Path | None, env: str | None, key: str) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}_file: cannot read {file}: {exc.strerror}") from None
    if env is not None:
        found = os.environ.get(env)
        if found is None:
            raise ConfigError(f"{key}_env: environment variable {env} is not set")
        return found
    return None


class UpstreamSettings(_Model):
    name: str = Field(description="registry host as clients name it, e.g. docker.io, ghcr.io")
    url: str = Field(description="base URL of the registry API")
    default: bool = False
    aliases: list[str] = Field(default_factory=list, description="other names routed here")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tag_ttl: Duration = 300.0
    ca_bundle: Path | None = None
    insecure: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    prefetch: int = Field(
        default=4,
        ge=0,
        le=64,
        description="blobs fetched at a time, before clients ask, when a GET brings an image manifest "
        "from this upstream; 0 turns prefetching off",
    )
    connect_timeout: Duration = 10.0
    read_timeout: Duration = 60.0
    retries: int = Field(default=3, ge=0, le=10)
    revalidate_timeout: Duration = Field(
        default=1.0,
        gt=0,
        description="past tag_ttl, how long a client waits for the upstream before it gets the cached "
        "manifest (the revalidation goes on in the background)",
    )
    max_stale: Duration | None = Field(
        default=None,
        gt=0,
        description="how long past tag_ttl a tag may still be served stale; unset: for ever",
    )
    negative_ttl: Duration = Field(
        default=30.0, ge=0, description="how long an upstream 404 for a tag is remembered; 0: not at all"
    )
    breaker_failures: int = Field(
        default=3,
        ge=1,
        le=100,
        description="connection failures and timeouts in a row that open the circuit breaker: then requests "
        "that need this upstream fail at once and one probe at a time checks it",
    )
    token_realms: list[str] = Field(
        default_factory=list,
        description="other hosts (or URLs) that may receive the credentials as token realm; "
        "auth.docker.io is implied for Docker Hub's registry",
    )
    search_url: str | None = None
    allow: list[Glob] = Field(
        default_factory=list,
        description="repository globs clients may pull from this upstream; empty: every repository",
    )
    deny: list[Glob] = Field(
        default_factory=list, description="repository globs nobody may pull from this upstream; wins over allow"
    )
    client_credentials: Literal["off", "verify"] = Field(
        default="off",
        description="verify: clients log in with their own credentials for this upstream, and regcache asks "
        "the upstream whether they may read a repository before serving anything of it, cached or not",
    )
    access_ttl: Duration = Field(
        default=300.0, gt=0, description="how long the upstream's answer for (credentials, repository) is kept"
    )
    credential_helper: str | None = Field(
        default=None, description="NAME of a docker credential helper: runs docker-credential-NAME get"
    )
    credential_helper_ttl: Duration = Field(
        default=900.0, gt=0, description="how long a helper's answer is used; it is refreshed before then"
    )

    @model_validator(mode="after")
    def _check(self) -> UpstreamSettings:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port], got {self.url!r}")
        if sum(x is not None for x in (self.password, self.password_file, self.password_env)) > 1:
            raise ValueError("give only one of password, password_file, password_env")
        if self.credential_helper is not None:
            if not _HELPER_NAME.fullmatch(self.credential_helper):
                raise ValueError(f"credential_helper must be a name such as ecr-login, got {self.credential_helper!r}")
            if self.username is not None:
                raise ValueError("give either username/password or credential_helper, not both")
        return self

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    @property
    def names(self) -> tuple[str, ...]:
        names = (self.name, *self.aliases)
        if self.name in DOCKER_HUB_ALIASES:
            names += DOCKER_HUB_ALIASES
        return tuple(dict.fromkeys(names))

    @property
    def trusted_realms(self) -> list[str]:
        """Hosts besides the upstream's own that may receive its credentials as a token realm."""
        if urlsplit(self.url).hostname == urlsplit(DOCKER_HUB_URL).hostname:
            return [*self.token_realms, DOCKER_HUB_TOKEN_REALM]
        return list(self.token_realms)

    @property
    def is_docker_hub(self) -> bool:
        return self.name in DOCKER_HUB_ALIASES

    @property
    def verifies_clients(self) -> bool:
        return self.client_credentials == "verify"

    def credentials(self) -> tuple[str, str] | None:
        password = _read_secret(self.password, self.password_file, self.password_env, f"upstreams.{self.name}.password")
        if self.username is None or password is None:
            return None
        return self.username, password


class S3Settings(_Model):
    endpoint: str | None = None
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""
    access_key: str | None = None
    secret_key: SecretStr | None = None
    credentials_file: Path | None = None
    path_style: bool = True
    ca_bundle: Path | None = None
    insecure: bool = False
    redirect: bool = False
    redirect_ttl: Duration = 300.0
    # A fill lease its holder stops renewing (a killed replica) lapses this long after its
    # last renewal; then another replica takes the fill over. Short, so nobody waits minutes.
    lease_ttl: Duration = Field(default=10.0, gt=0)
    # How often a holder rewrites its lease; unset: a fifth of lease_ttl, so a few renewals
    # may fail (a slow store) before the lease lapses under a live holder.
    lease_renew_interval: Duration | None = Field(default=None, gt=0)
    # Parts of a multipart upload; S3 needs at least 5 MiB for every part but the last.
    part_size: Size = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    # SHA-256 every request body for its SigV4 signature (botocore's default over plain http,
    # and over TLS when no checksum header goes along): only for a store that refuses
    # UNSIGNED-PAYLOAD (storage.backends.s3.client says why it is off).
    sign_payload: bool = False
    # When a fill's parts go to the store: while the fill runs, or once it is verified (and its
    # client has every byte). "auto": after the fill when the store answers on this host, where
    # its CPU is the fill's (storage.backends.s3.backend says what that measured), else during.
    part_uploads: Literal["auto", "during_fill", "after_fill"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> S3Settings:
        if self.lease_renew_interval is not None and self.lease_renew_interval > self.lease_ttl / 2:
            raise ValueError("lease_renew_interval must be at most half of lease_ttl")
        return self

    @property
    def lease_renewal(self) -> float:
        """Seconds between a lease holder's renewals."""
        return self.lease_renew_interval if self.lease_renew_interval is not None else self.lease_ttl / 5


class StorageSettings(_Model):
    backend: Literal["filesystem", "s3"] = "filesystem"
    max_size: Size | None = None
    high_watermark: float = Field(default=0.95, gt=0, le=1)
    low_watermark: float = Field(default=0.85, gt=0, le=1)
    expire_unused_after: Duration | None = None
    gc_interval: Duration = 600.0
    gc_grace: Duration = 3600.0
    flush_interval: Duration = 5.0
    fill_timeout: Duration = 3600.0
    # A big blob's spool written and read around the page cache (storage.directio). Off by
    # default: it speeds up a fast first client and slows a slow one (README, Performance).
    direct_io: bool = False
    s3: S3Settings | None = None

    @model_validator(mode="after")
    def _check(self) -> StorageSettings:
        if self.low_watermark > self.high_watermark:
            raise ValueError("low_watermark must not exceed high_watermark")
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs a storage.s3 section")
        return self


class NamedToken(_Model):
    """A token with a name: logs say which token acted, never the token."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$", max_length=64)
    token: SecretStr | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> NamedToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError(f"token {self.name!r}: give exactly one of token, token_file")
        return self

    def resolve(self, key: str) -> str:
        value = _read_secret(self.token, self.token_file, None, key)
        assert value is not None  # one of them is set: checked above
        return value


class AdminToken(NamedToken):
    role: Literal["read", "full"] = Field(
        default="full", description="read: images, search, stats; full: every verb (rmi, load, gc, pin, pull, save)"
    )


class AdminSettings(_Model):
    token: SecretStr | None = None
    token_file: Path | None = None
    tokens: list[AdminToken] = Field(default_factory=list, description="named admin tokens with a role")

    @model_validator(mode="after")
    def _check(self) -> AdminSettings:
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names) or ("admin" in names and self.token_present):
            raise ValueError("admin.tokens: every name once ('admin' is admin.token's)")
        return self

    @property
    def token_present(self) -> bool:
        return self.token is not None or self.token_file is not None

    def resolve_token(self) -> str | None:
        return _read_secret(self.token, self.token_file, None, "admin.token")


class TLSSettings(_Model):
    cert: Path
    key: Path


def _name_bare_tokens(value: Any) -> Any:
    """A bare string in ``auth.tokens`` is a token named after its place: token1, token2, ..."""
    if not isinstance(value, list):
        return value
    return [{"name": f"token{i}", "token": t} if isinstance(t, str) else t for i, t in enumerate(value, 1)]


class AuthSettings(_Model):
    htpasswd: Path | None = Field(default=None, description="htpasswd file with bcrypt hashes (htpasswd -B)")
    tokens: Annotated[list[NamedToken], BeforeValidator(_name_bare_tokens)] = Field(
        default_factory=list, description="static tokens: Bearer, or as a Basic password; {name, token|token_file}"
    )
    realm: str = "regcache"
    protect_metrics: bool = Field(default=False, description="require credentials for /metrics too")
    # Password checks (bcrypt) run on their own small pool so a flood of wrong
    # passwords cannot take the threads that file reads and commits need.
    hash_threads: int = Field(default=2, ge=1, le=16, description="threads that check passwords")
    hash_queue: int = Field(
        default=32, ge=0, description="password checks that may wait for a hashing thread; beyond it, 429"
    )
    max_failures: int = Field(
        default=10, ge=1, description="failed logins from one address before it is refused for failure_window"
    )
    failure_window: Duration = Field(default=60.0, gt=0)


class AccessRule(_Model):
    """What one rule lets pull: repositories matching a glob on one upstream (or every one)."""

    upstream: str = Field(default="*", description="an upstream's name, or * for every upstream")
    repositories: list[Glob] = Field(default_factory=lambda: ["**"], min_length=1)


class AccessSettings(_Model):
    """Who may pull what. Without this section, every client that passed ``auth`` may pull anything."""

    anonymous: list[AccessRule] | None = Field(
        default=None,
        description="what clients without credentials may pull; absent: nothing when auth is on, "
        "anything when it is off",
    )
    users: dict[str, list[AccessRule]] = Field(default_factory=dict, description="htpasswd user -> rules")
    tokens: dict[str, list[AccessRule]] = Field(default_factory=dict, description="auth token name -> rules")
    default: list[AccessRule] = Field(
        default_factory=list, description="rules of users and tokens not listed; empty: they may pull nothing"
    )

    def rule_sets(self) -> list[list[AccessRule]]:
        return [self.anonymous or [], *self.users.values(), *self.tokens.values(), self.default]


class MetricsSettings(_Model):
    enabled: bool = True
    listen: str | None = Field(default=None, description="separate HOST:PORT for /metrics")
    store_interval: Duration = Field(default=30.0, description="how often store size gauges are recomputed")


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class LimitSettings(_Model):
    max_manifest_size: Size = 4 * 1024 * 1024
    max_admin_body: Size = 1024 * 1024
    max_header_size: Size = 16 * 1024
    client_timeout: Duration = Field(default=600.0, description="a client that takes no byte for this long is cut")
    keepalive_timeout: Duration = Field(default=75.0, description="idle or unfinished request connections close")
    shutdown_timeout: Duration = 30.0
    drain_delay: Duration = Field(default=0.0, description="on SIGTERM, /readyz says 503 this long before closing")


def _check_listen(listen: str) -> str:
    _split_listen(listen)
    return listen


class Settings(_Model):
    # Checked on the field, not the model, so that the error names the key.
    listen: Annotated[str, AfterValidator(_check_listen)] = "0.0.0.0:5000"
    data_dir: Path = Path("./data")
    upstreams: list[UpstreamSettings] = Field(
        default_factory=lambda: [UpstreamSettings(name=DOCKER_HUB, url=DOCKER_HUB_URL, default=True)]
    )
    storage: StorageSettings = StorageSettings()
    admin: AdminSettings = AdminSettings()
    tls: TLSSettings | None = None
    auth: AuthSettings | None = None
    access: AccessSettings | None = None
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    limits: LimitSettings = LimitSettings()
    notifications: NotificationSettings = NotificationSettings()
    tracing: TracingSettings = TracingSettings()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.upstreams:
            raise ValueError("upstreams: at least one upstream is needed")
        defaults = [u for u in self.upstreams if u.default]
        if len(defaults) > 1:
            raise ValueError("upstreams: only one upstream may be the default")
        seen: set[str] = set()
        for upstream in self.upstreams:
            for name in upstream.names:
                if name in seen:
                    raise ValueError(f"upstreams: the name {name!r} is used twice")
                seen.add(name)
        self._check_access()
        return self

    def _check_access(self) -> None:
        if self.access is None:
            return
        if self.auth is None and (self.access.users or self.access.tokens or self.access.default):
            raise ValueError("access: users, tokens and default need auth (htpasswd or tokens)")
        names = {u.name for u in self.upstreams}
        for rules in self.access.rule_sets():
            for rule in rules:
                if rule.upstream != "*" and rule.upstream not in names:
                    raise ValueError(f"access: rule for upstream {rule.upstream!r}, which is not configured")
        if self.auth is not None:
            known = {t.name for t in self.auth.tokens}
            for name in self.access.tokens:
                if name not in known:
                    raise ValueError(f"access.tokens: no auth token is named {name!r}")

    @property
    def default_upstream(self) -> UpstreamSettings:
        return next((u for u in self.upstreams if u.default), self.upstreams[0])

    @property
    def host_port(self) -> tuple[str, int]:
        return _split_listen(self.listen)


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """REGCACHE_A__B=v -> {"a": {"b": v}}; list indexes as numbers."""
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("REGCACHE_"):
            continue
        rest = key[len("REGCACHE_") :].lower()
        if rest in ("admin_token",):  # the documented short form
            rest = "admin__token"
        if rest in ("config", "server", "upstream"):  # CLI-level variables, not settings
            continue
        path = rest.split("__")
        node: Any = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base.get(key), value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(over, dict) and all(k.isdigit() for k in over):
        merged_list = list(base)
        for index, value in over.items():
            i = int(index)
            if i >= len(merged_list):
                raise ConfigError(f"upstreams.{i}: no such list item to override")
            merged_list[i] = _merge(merged_list[i], value)
        return merged_list
    return over


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        # A model's own check has no location; its message names the keys it is about.
        lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)


def load_settings(
    path: Path | str | None = None,
    *,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Defaults < YAML file < environment < ``overrides`` (command-line flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded or {}
    env = _env_overrides(dict(os.environ if environ is None else environ))
    if "upstreams" in env and "upstreams" not in data:
        data["upstreams"] = [{"name": DOCKER_HUB, "url": DOCKER_HUB_URL, "default": True}]
    data = _merge(data, env)
    data = _merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


# A registry as image names spell it: a host (DNS labels) with an optional port.
_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?$")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def upstreams_from_flags(values: list[str]) -> list[UpstreamSettings]:
    """``--upstream [NAME=]URL``, repeatable: the upstreams in that order, the first the default."""
    return [_upstream_from_flag(value, default=index == 0) for index, value in enumerate(values)]


def _upstream_from_flag(value: str, *, default: bool) -> UpstreamSettings:
    # NAME= comes before the scheme; an "=" after it belongs to the URL.
    if "=" in value and not _URL_SCHEME.match(value):
        name, _, url = value.partition("=")
        if not _REGISTRY_NAME.fullmatch(name):
            raise ConfigError(f"--upstream {value!r}: NAME must be a registry host such as docker.io or mirror:5000")
    else:
        # Named after its host, so that clients name it as they name the registry it serves.
        url = value
        host = urlsplit(url).netloc
        name = DOCKER_HUB if host in DOCKER_HUB_ALIASES else host
    try:
        return UpstreamSettings(name=name, url=url, default=default)
    except ValidationError as exc:
        raise ConfigError(f"--upstream {value!r}: {_describe(exc)}") from None
