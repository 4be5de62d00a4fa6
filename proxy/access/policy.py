"""Who may pull what: identities, and the rules that decide for one (upstream, repository).

Evaluated in this order, the first that refuses decides:

1. the upstream's ``deny`` globs (nobody, whoever asks);
2. the upstream's ``allow`` globs, when it has any (only those repositories);
3. the identity's own rules (``access:``): anonymous clients get ``access.anonymous``,
   users and tokens their entry in ``access.users``/``access.tokens`` or else
   ``access.default``, and what anonymous clients may pull besides (logging in
   never takes a right away). Without an ``access`` section every client that passed ``auth``
   may pull anything, as may everyone when ``auth`` is off.

Clients of an upstream with ``client_credentials: verify`` present that upstream's
credentials, not an identity of regcache's: for them the upstream is the judge
(``proxy.access.clientcheck``), after the lists. Admin tokens, for ``pull``, meet the
lists only.

The repository is the name routing produced (validated, ``library/`` added for Docker
Hub), the very name that is then served: nothing between the decision and the lookup
can rename it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from config.globs import matches
from config.settings import AccessRule, AccessSettings, Settings

IdentityKind = Literal["anonymous", "user", "token", "upstream", "admin"]
# Which kind of rule decided: the access log's `rule` field, never the rule's content.
RuleKind = Literal["deny_list", "allow_list", "identity", "anonymous", "upstream", "open"]


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    name: str = ""

    def __str__(self) -> str:
        return self.kind if not self.name else f"{self.kind}:{self.name}"


ANONYMOUS = Identity("anonymous")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: RuleKind


# Every decision there can be, made once: decide() runs before every repository request.
_DECISIONS = {(allowed, rule): Decision(allowed, rule) for allowed in (True, False) for rule in get_args(RuleKind)}
_NO_LISTS: tuple[list[str], list[str]] = ([], [])


def _decision(allowed: bool, rule: RuleKind) -> Decision:
    return _DECISIONS[allowed, rule]


def _permits(rules: list[AccessRule], upstream: str, repository: str) -> bool:
    return any(
        rule.upstream in ("*", upstream) and any(matches(glob, repository) for glob in rule.repositories)
        for rule in rules
    )


class Policy:
    def __init__(self, settings: Settings) -> None:
        self._lists: dict[str, tuple[list[str], list[str]]] = {}
        self._verifying: frozenset[str] = frozenset()
        self._access: AccessSettings | None = None
        self._auth_on = False
        self.reload(settings)

    def reload(self, settings: Settings) -> None:
        """Take the rules of freshly loaded settings (SIGHUP); everything else stays as started."""
        self._lists = {u.name: (list(u.allow), list(u.deny)) for u in settings.upstreams}
        self._verifying = frozenset(u.name for u in settings.upstreams if u.verifies_clients)
        self._access = settings.access
        self._auth_on = settings.auth is not None

    def decide(self, identity: Identity, upstream: str, repository: str) -> Decision:
        allow, deny = self._lists.get(upstream, _NO_LISTS)
        if deny and any(matches(glob, repository) for glob in deny):
            return _decision(False, "deny_list")
        if allow and not any(matches(glob, repository) for glob in allow):
            return _decision(False, "allow_list")
        if identity.kind in ("upstream", "admin"):
            return _decision(True, "upstream" if identity.kind == "upstream" else "open")
        rules = self._rules(identity)
        if rules is None:
            # No rule set: anonymous clients are refused when auth is on, anyone else may pull.
            if identity.kind == "anonymous" and self._auth_on:
                return _decision(False, "anonymous")
            return _decision(True, "open")
        if identity.kind == "anonymous":
            return _decision(_permits(rules, upstream, repository), "anonymous")
        anonymous = self._rules(ANONYMOUS) or []
        return _decision(_permits(rules, upstream, repository) or _permits(anonymous, upstream, repository),
                         "identity")

    @property
    def anonymous_allowed(self) -> bool:
        """Whether anonymous clients have rules of their own (with auth on, else they are refused)."""
        return self._access is not None and self._access.anonymous is not None

    def visible(self, identity: Identity, upstream: str, repository: str) -> bool:
        """Whether the catalog may name this repository to ``identity``.

        Repositories of upstreams that verify client credentials are never listed: the
        upstream would have to be asked for each one.
        """
        return upstream not in self._verifying and self.decide(identity, upstream, repository).allowed

    def _rules(self, identity: Identity) -> list[AccessRule] | None:
        access = self._access
        if access is None:
            return None
        if identity.kind == "anonymous":
            return access.anonymous
        if identity.kind == "user":
            return access.users.get(identity.name, access.default)
        return access.tokens.get(identity.name, access.default)
