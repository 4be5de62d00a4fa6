"""Optional client authentication for pulls (``settings.auth``).

Two kinds of credentials, either or both:

- htpasswd users with bcrypt hashes (the only format the distribution registry
  accepts, so existing files work), sent as ``Authorization: Basic``;
- static tokens, sent as ``Authorization: Bearer <token>`` or as the password of
  Basic auth with any user name (``docker login -u token -p <token>``), because
  docker, containerd and skopeo only answer a ``Basic`` challenge with Basic.

``identify`` says who the credentials name (the user, or the token's name), or
None; what that identity may pull is ``proxy.access``'s decision, and so is the
401 a request without valid credentials gets. Health, readiness and (unless
``protect_metrics``) ``/metrics`` stay open for probes and scrapers; ``/admin/``
has its own tokens.

bcrypt is slow on purpose and docker sends credentials with every request, so
a verified ``Authorization`` value is remembered (by its SHA-256, never in
clear) for a short while. Checks that miss that cache go through
``proxy.http.loginguard``: bcrypt on its own bounded pool, and a limit on failed
logins per client address, so a password spray cannot stall other pulls.

A user name that is not in the htpasswd file is checked against a dummy hash
of the file's highest cost, so a wrong password costs the same work whether
the user exists or not, and timing does not list the users.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import bcrypt
from aiohttp import web

from config.settings import AuthSettings, ConfigError
from proxy.access.policy import Identity
from proxy.http.loginguard import FailureLimiter, HashingPool

log = logging.getLogger("regcache.auth")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
CACHE_SECONDS = 300.0
CACHE_SIZE = 1024
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


def read_htpasswd(path: Path) -> dict[str, bytes]:
    """user -> bcrypt hash; anything but bcrypt is refused with the line number."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"auth.htpasswd: cannot read {path}: {exc.strerror}") from None
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"auth.htpasswd: {path} line {number}: expected user:hash")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            raise ConfigError(f"auth.htpasswd: {path} line {number}: only bcrypt hashes are supported (htpasswd -B)")
        users[user] = hashed.encode()
    return users


def dummy_hash(users: dict[str, bytes]) -> bytes | None:
    """A bcrypt hash nothing matches, at the highest cost among ``users``; None without users.

    Only the salt part is read by a check, so no hashing is needed to make it.
    """
    costs = [int(h[4:6]) for h in users.values() if h[4:6].isdigit() and 4 <= int(h[4:6]) <= 31]
    if not costs:
        return None
    return bcrypt.gensalt(rounds=max(costs)) + b"." * 31


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # a malformed hash, or a password bcrypt refuses (over 72 bytes)
        return False


class ClientAuth:
    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.realm = settings.realm.replace('"', "")
        self._tokens: list[tuple[str, bytes]] = []
        self._users: dict[str, bytes] = {}
        self._dummy: bytes | None = None
        self._verified: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self._clock = clock
        self.hashing = HashingPool(settings.hash_threads, settings.hash_queue)
        self._failures = FailureLimiter(settings.max_failures, settings.failure_window, clock)
        self.reload()

    @property
    def challenge(self) -> str:
        return f'Basic realm="{self.realm}"'

    def reload(self) -> None:
        """Re-read the htpasswd and token files (SIGHUP); a broken file keeps the old ones."""
        tokens = [(t.name, t.resolve(f"auth.tokens.{t.name}").encode()) for t in self.settings.tokens]
        if self.settings.htpasswd is not None:
            self._users = read_htpasswd(self.settings.htpasswd)
            self._dummy = dummy_hash(self._users)
        self._tokens = tokens
        self._verified.clear()

    def close(self) -> None:
        self.hashing.close()

    def protects(self, path: str) -> bool:
        if path in OPEN_PATHS or path.startswith("/admin/") or path == "/admin":
            return False
        return path != "/metrics" or self.settings.protect_metrics

    async def identify(self, authorization: str | None, address: str) -> Identity | None:
        """Who valid ``authorization`` names, else None; LoginThrottled when it cannot be checked now."""
        if not authorization:
            return None
        key = hashlib.sha256(authorization.encode()).digest()
        seen = self._verified.get(key)
        if seen is not None and self._clock() - seen[0] < CACHE_SECONDS:
            return seen[1]
        self._failures.check(address)
        identity = await self._check(authorization)
        if identity is None:
            self._failures.failed(address)
            return None
        self._verified[key] = (self._clock(), identity)
        self._verified.move_to_end(key)
        while len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return identity

    async def _check(self, authorization: str) -> Identity | None:
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "bearer":
            return self._token(value.encode())
        if scheme != "basic":
            return None
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        token = self._token(password.encode())
        if token is not None:
            return token
        hashed = self._users.get(user, self._dummy)
        if hashed is None:
            return None  # no htpasswd users at all: nothing to find out by timing
        matched = await self.hashing.run(partial(_checkpw, password.encode(), hashed))
        return Identity("user", user) if matched and user in self._users else None

    def _token(self, candidate: bytes) -> Identity | None:
        # Compare against every token so the time taken says nothing about which matched.
        found: str | None = None
        for name, token in self._tokens:
            if hmac.compare_digest(candidate, token):
                found = name
        return Identity("token", found) if found is not None else None


AUTH: web.AppKey[ClientAuth] = web.AppKey("client_auth")
