"""Upstream authentication: challenges, who may see credentials, tokens.

Kept apart from ``proxy.upstream`` (which does the HTTP) so the decisions that
keep credentials safe (what a ``WWW-Authenticate`` header says, which hosts may
receive the upstream's password, how long a token is trusted) read on their own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from yarl import URL

from config.settings import ConfigError, UpstreamSettings
from proxy.errors import UpstreamError, UpstreamUnauthorized
from proxy.tracing import span
from proxy.upstream.credhelper import CredentialHelper
from storage.oci.jsonlimits import loads

log = logging.getLogger("regcache.upstream")

# RFC 7230 token and quoted-string; quoted values may hold commas
# (scope="repository:a:pull,push"), which is why a naive split on "," is wrong.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_TOKEN}|{_QUOTED})")
_SCHEME = re.compile(_TOKEN)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_UNESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic", ...
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in a ``WWW-Authenticate`` value, in order."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        if header[pos] in " \t,":
            pos += 1
            continue
        param = _PARAM.match(header, pos)
        if param and challenges:
            value = param.group(2)
            if value.startswith('"'):
                value = _UNESCAPE.sub(r"\1", value[1:-1])
            challenges[-1].params[param.group(1).lower()] = value
            pos = param.end()
            continue
        scheme = _SCHEME.match(header, pos)
        if scheme is None:
            pos += 1  # garbage: skip it rather than fail the whole header
            continue
        challenges.append(Challenge(scheme.group(0).lower(), {}))
        pos = scheme.end()
        # token68 form ("Negotiate abc==") carries no params we use; skip it.
        rest = header[pos:].lstrip(" \t")
        if rest and not _PARAM.match(rest) and (t68 := _TOKEN68.match(rest)):
            pos = len(header) - len(rest) + t68.end()
    return challenges


def _host(url: URL) -> str:
    return (url.host or "").lower().rstrip(".")


def _listed(url: URL, trusted: Sequence[str]) -> bool:
    host = _host(url)
    for entry in trusted:
        entry = entry.strip().lower()
        if "://" in entry:
            allowed = URL(entry)
            if _host(allowed) == host and (allowed.explicit_port is None or allowed.port == url.port):
                return True
        elif entry in (host, f"{host}:{url.port}"):
            return True
    return False


def may_receive_credentials(url: URL, upstream: URL, trusted: Sequence[str] = ()) -> bool:
    """May the upstream's credentials be sent to ``url`` (a token realm)?

    Yes for the upstream's own host, or a host the operator listed
    (``token_realms``; Docker Hub's registry lists auth.docker.io by default).
    Not for other hosts of the same domain: on shared domains (one tenant per
    subdomain) those are other tenants. Never over plain http when the upstream
    itself is https.
    """
    if url.scheme not in ("http", "https") or not url.host:
        return False
    if url.scheme == "http" and upstream.scheme == "https":
        return False
    return _host(url) == _host(upstream) or _listed(url, trusted)


TokenKey = tuple[str, str, str]  # (realm, service, scope)


class TokenCache:
    """Bearer tokens per (realm, service, scope), with one fetch in flight per key.

    ``fetch`` returns ``(token, expires_in)``. A token is reused until
    ``expires_in`` minus a margin, so it is never presented just as it expires.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, tuple[str, float]] = {}
        self._inflight: dict[TokenKey, asyncio.Task[tuple[str, float]]] = {}

    def cached(self, key: TokenKey) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        token, expires_at = entry
        if self._clock() >= expires_at:
            del self._tokens[key]
            return None
        return token

    async def get(self, key: TokenKey, fetch: Callable[[], Awaitable[tuple[str, float]]]) -> str:
        token = self.cached(key)
        if token is not None:
            return token
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fill(key, fetch))
            self._inflight[key] = task
            # The fetch outlives a cancelled waiter; make sure its failure is
            # still retrieved so asyncio does not log it as lost.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        # shield: one caller giving up must not cancel the fetch others wait on.
        fetched, _ = await asyncio.shield(task)
        return fetched

    async def _fill(self, key: TokenKey, fetch: Callable[[], Awaitable[tuple[str, float]]]) -> tuple[str, float]:
        try:
            token, expires_in = await fetch()
            margin = min(10.0, expires_in / 10)
            self._tokens[key] = (token, self._clock() + expires_in - margin)
            return token, expires_in
        finally:
            self._inflight.pop(key, None)

    def forget(self, key: TokenKey, token: str) -> None:
        """Drop a token the upstream rejected, unless a newer one replaced it."""
        entry = self._tokens.get(key)
        if entry is not None and entry[0] == token:
            del self._tokens[key]


TokenGetter = Callable[[URL, str | None], Awaitable[bytes]]
Credentials = tuple[str, str]
CredentialSource = Callable[[], Awaitable[Credentials | None]]

# A verified client's own credentials for an upstream with ``client_credentials: verify``,
# set for the request by ``proxy.access`` and inherited by the fills and prefetches it
# starts (asyncio tasks copy the context), so they fetch with the client's rights. Held
# for those tasks' lifetime only; nothing else keeps them.
CLIENT_CREDENTIALS: ContextVar[Credentials | None] = ContextVar("client_credentials", default=None)


class UpstreamAuth:
    """What one upstream gets as ``Authorization``, learned from its challenges.

    ``get_token(url, authorization)`` performs the HTTP GET of a token realm
    and returns the body; everything about *what* is sent lives here.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        get_token: TokenGetter,
        clock: Callable[[], float] = time.monotonic,
        credentials: CredentialSource | None = None,
    ) -> None:
        """``credentials``: where the password comes from; by default the upstream's settings
        (password or credential helper), else a verified client's own (``CLIENT_CREDENTIALS``)."""
        self.name = settings.name
        self._settings = settings
        self._base = URL(settings.base_url)
        self._get_token = get_token
        self._tokens = TokenCache(clock)
        self._helper = (
            CredentialHelper(
                settings.name, settings.credential_helper, self._base.host_port_subcomponent or "",
                settings.credential_helper_ttl, clock,
            )
            if settings.credential_helper is not None
            else None
        )
        self._source = credentials or self._configured
        # What the upstream asked for last time, so later requests can carry
        # credentials up front instead of paying a 401 round trip each. For Basic
        # only the fact is kept: the header is built from the source each time, so
        # neither a client's password nor a helper's outlives its own lifetime here.
        self._bearer: Challenge | None = None
        self._basic = False
        self._warned: set[str] = set()

    async def known(self, scope: str | None) -> str | None:
        """The header to send before any challenge, from what was learned so far."""
        if self._bearer is not None:
            return "Bearer " + await self._token(self._bearer, scope)
        if self._basic:
            credentials = await self._source()
            return _basic_header(*credentials) if credentials is not None else None
        return None

    async def answer(self, www_authenticate: str, scope: str | None) -> str | None:
        """The header that answers a 401, or None when we have nothing to offer."""
        challenges = parse_challenges(www_authenticate)
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        if bearer is not None:
            self._bearer = Challenge(
                "bearer", {"realm": bearer.realm or "", "service": bearer.params.get("service", "")}
            )
            # Without a repository (ping) the upstream's own scope, if any, is the one to ask for.
            return "Bearer " + await self._token(self._bearer, scope or bearer.params.get("scope"))
        if any(c.scheme == "basic" for c in challenges):
            credentials = await self._source()
            if credentials is not None:
                self._basic = True
                return _basic_header(*credentials)
        return None

    def forget(self, auth: str | None, scope: str | None) -> None:
        """Drop credentials the upstream just refused, so the retry gets fresh ones."""
        if auth is None:
            return
        if auth.startswith("Bearer ") and self._bearer is not None:
            self._tokens.forget(self._key(self._bearer, scope), auth.removeprefix("Bearer "))
        elif auth.startswith("Basic "):
            self._basic = False
            if self._helper is not None:
                self._helper.stale()

    @staticmethod
    def _key(challenge: Challenge, scope: str | None) -> TokenKey:
        return (challenge.realm or "", challenge.params.get("service", ""), scope or "")

    async def _token(self, challenge: Challenge, scope: str | None) -> str:
        key = self._key(challenge, scope)
        return await self._tokens.get(key, lambda: self._fetch_token(*key))

    async def _fetch_token(self, realm: str, service: str, scope: str) -> tuple[str, float]:
        url = URL(realm)
        if url.scheme not in ("http", "https") or not url.host:
            raise UpstreamError(f"upstream {self.name}: token realm is not an http(s) URL", upstream=self.name)
        url = url.update_query({k: v for k, v in (("service", service), ("scope", scope)) if v})
        authorization = None
        credentials = await self._source()
        if credentials is not None:
            if may_receive_credentials(url, self._base, self._settings.trusted_realms):
                authorization = _basic_header(*credentials)
            elif url.host not in self._warned:
                self._warned.add(url.host or "")
                log.warning(
                    "upstream %s: token realm host %s is not the upstream's host; fetching tokens "
                    "anonymously (list it in token_realms to trust it)",
                    self.name,
                    url.host,
                )
        try:
            with span("upstream token", {"regcache.upstream": self.name, "regcache.scope": scope}):
                body = await self._get_token(url, authorization)
        except UpstreamUnauthorized:
            if self._helper is not None and authorization is not None:
                self._helper.stale()
            raise
        try:
            data = loads(body)
        except ValueError:
            raise UpstreamError(
                f"upstream {self.name}: token realm answered invalid JSON", upstream=self.name
            ) from None
        token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"upstream {self.name}: token realm returned no token", upstream=self.name)
        expires_in = data.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = 60  # the token spec's default
        return token, float(expires_in)

    async def _configured(self) -> Credentials | None:
        if self._settings.verifies_clients:
            # The client's own, when a verified client's request is behind this fetch.
            client = CLIENT_CREDENTIALS.get()
            if client is not None:
                return client
        if self._helper is not None:
            return await self._helper.get()
        try:
            return self._settings.credentials()
        except ConfigError as exc:  # names the key or file, never the secret
            raise UpstreamUnauthorized(f"upstream {self.name}: {exc}", upstream=self.name) from None


def _basic_header(username: str, password: str) -> str:
    # UTF-8 as RFC 7617 recommends; registries compare the raw bytes.
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
