"""The one place that decides whether a request may go on: a middleware in front of every route.

For a repository route (manifests, blobs, tags, referrers) it resolves the route
(upstream and repository: ``?ns=``, path prefix, default) itself, judges it, and
hands the judged route to the handler as ``request[ROUTE]``; handlers never
resolve a name again. So the decision comes before any cache lookup or upstream
request, and applies to exactly what is then served.

Who the client is:

- an upstream with ``client_credentials: verify``: the client's Basic credentials are
  for that upstream; the lists apply, then the upstream is asked
  (``proxy.access.clientcheck``) and the verified credentials go along with the request
  so fills fetch with them (``CLIENT_CREDENTIALS``);
- otherwise regcache's own ``auth`` (htpasswd user or named token), or anonymous.

A refusal by a rule is ``Denied`` (403 ``DENIED``, naming the upstream, never the
rule); a client that sent no credentials, or wrong ones, and could be let in with
right ones gets 401 and the challenge, so docker and skopeo retry with theirs. The
access log gets ``identity`` (a user or token name, never a secret), ``decision``
and the kind of ``rule`` that decided.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.access.clientcheck import ClientCheck
from proxy.access.policy import ANONYMOUS, Decision, Identity, Policy
from proxy.errors import Denied, Unauthorized
from proxy.http.clientauth import ClientAuth
from proxy.http.context import IDENTITY, LOG, ROUTE
from proxy.pull.routing import Route, Router
from proxy.resources import UPSTREAMS
from proxy.upstream.auth import CLIENT_CREDENTIALS, Credentials
from storage.errors import NameInvalid

REPOSITORY_ROUTES = frozenset({"manifest", "blob", "tags", "referrers"})
# Where anonymous clients may get an answer at all when auth is on but anonymous rules exist.
_ANONYMOUS_OPEN = frozenset({"/v2/", "/v2/_catalog"})
_DEFAULT_REALM = "regcache"


class Access:
    def __init__(self, router: Router, policy: Policy, auth: ClientAuth | None, check: ClientCheck) -> None:
        self.router = router
        self.policy = policy
        self.auth = auth
        self.check = check
        self.challenge = auth.challenge if auth is not None else f'Basic realm="{_DEFAULT_REALM}"'
        self._verifying = any(u.verifies_clients for u in router.upstreams)

    def judge(self, request: web.Request, identity: Identity, route: Route) -> None:
        """Raises unless ``identity`` may pull ``route``; admin ``pull`` comes here too."""
        decision = self.policy.decide(identity, route.upstream_name, route.repository)
        _log(request, identity, decision)
        if decision.allowed:
            return
        if decision.rule == "anonymous":
            raise Unauthorized("authentication required", challenge=self.challenge)
        raise Denied(f"access to {route.repository} on upstream {route.upstream_name} is denied")

    async def admit(self, request: web.Request, route: Route) -> Credentials | None:
        """Judge a repository request; the client's upstream credentials when they were verified."""
        authorization = request.headers.get("Authorization")
        if route.upstream.verifies_clients:
            client = request.app[UPSTREAMS][route.upstream_name]
            credentials = _basic_credentials(authorization)
            identity = Identity("upstream", credentials[0] if credentials is not None else "")
            request[IDENTITY] = identity
            # The lists first: a repository nobody may pull costs the upstream nothing.
            self.judge(request, identity, route)
            if credentials is None:
                request[LOG].update(decision="denied", rule="upstream")
                raise Unauthorized(f"log in with your credentials for {route.upstream_name}", challenge=self.challenge)
            ttl = route.upstream.access_ttl
            if not await self.check.may_read(client, route.repository, credentials, ttl):
                request[LOG].update(decision="denied", rule="upstream")
                raise Denied(f"upstream {route.upstream_name} does not let these credentials read {route.repository}")
            return credentials
        # No credentials to check (the common case, and all there is without auth): no await.
        identity = ANONYMOUS if self.auth is None or not authorization else await self._identify(request, authorization)
        request[IDENTITY] = identity
        self.judge(request, identity, route)
        return None

    async def admit_other(self, request: web.Request) -> None:
        """Requests that name no repository: ``/v2/``, the catalog, ``/metrics`` (health and admin pass)."""
        authorization = request.headers.get("Authorization")
        if self._verifying and request.path == "/v2/" and self.auth is None:
            # docker login must send its credentials here; the repositories are judged one by one.
            credentials = _basic_credentials(authorization)
            if credentials is None:
                raise Unauthorized("log in with your credentials for the upstream", challenge=self.challenge)
            request[IDENTITY] = Identity("upstream", credentials[0])
            return
        if self.auth is None or not self.auth.protects(request.path):
            request[IDENTITY] = ANONYMOUS
            return
        identity = await self._identify(request, authorization)
        if identity is ANONYMOUS and not (self.policy.anonymous_allowed and request.path in _ANONYMOUS_OPEN):
            request[LOG].update(identity=str(identity), decision="denied", rule="anonymous")
            raise Unauthorized("authentication required", challenge=self.challenge)
        request[IDENTITY] = identity

    async def _identify(self, request: web.Request, authorization: str | None) -> Identity:
        if self.auth is None or not authorization:
            return ANONYMOUS
        identity = await self.auth.identify(authorization, request.remote or "")
        if identity is None:
            request[LOG].update(result="unauthorized", decision="denied", rule="credentials")
            raise Unauthorized("authentication required", challenge=self.challenge)
        return identity


ACCESS: web.AppKey[Access] = web.AppKey("access")


def _log(request: web.Request, identity: Identity, decision: Decision) -> None:
    request[LOG].update(identity=str(identity), decision="allowed" if decision.allowed else "denied",
                        rule=decision.rule)


def _basic_credentials(authorization: str | None) -> Credentials | None:
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None


def resolve_route(request: web.Request, router: Router) -> Route:
    """The upstream and repository a repository route names; the routing step of every such request."""
    # No valid name, tag or digest contains "%": an encoded "/" or "." is a trick.
    if "%" in request.raw_path.partition("?")[0]:
        raise NameInvalid("percent-encoded characters are not allowed in registry paths")
    route = router.resolve(request.match_info["name"], request.query.get("ns"))
    request[LOG].update(upstream=route.upstream_name, repository=route.repository)
    return route


def access_middleware(access: Access) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name not in REPOSITORY_ROUTES or request.method not in ("GET", "HEAD"):
            await access.admit_other(request)
            return await handler(request)
        route = resolve_route(request, access.router)
        credentials = await access.admit(request, route)
        request[ROUTE] = route
        if credentials is None:
            return await handler(request)
        # For this request and the fills it starts; gone with them.
        token = CLIENT_CREDENTIALS.set(credentials)
        try:
            return await handler(request)
        finally:
            CLIENT_CREDENTIALS.reset(token)

    return middleware

