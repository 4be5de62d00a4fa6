"""The errors the server's own layers raise: requests, upstreams and admin verbs.

Storage's errors live in ``storage.errors``; ``proxy.http.errors`` is the one
table that maps every error to its OCI code and HTTP status. These are plain
types, so the upstream client, the pull service and the admin verbs raise them
without knowing anything about HTTP responses.
"""

from __future__ import annotations

from storage.errors import RegcacheError


class Unsupported(RegcacheError):
    """The operation is unsupported."""


class Unauthorized(RegcacheError):
    """Authentication required."""

    def __init__(self, message: str = "", challenge: str = "") -> None:
        super().__init__(message)
        self.challenge = challenge


class Denied(RegcacheError):
    """Requested access to the resource is denied."""


class RangeNotSatisfiable(RegcacheError):
    """Requested range not satisfiable."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a blob of {size} bytes")
        self.size = size


class PaginationInvalid(RegcacheError):
    """Invalid pagination parameters."""


class RegistryUnknown(RegcacheError):
    """The request names a registry that is not configured."""


class ManifestTooLarge(RegcacheError):
    """Manifest exceeds the size limit."""


class RequestTooLarge(RegcacheError):
    """Request body too large."""


class LoginThrottled(RegcacheError):
    """Too many login attempts; try again later."""

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AdminInvalid(RegcacheError):
    """Invalid admin request."""


class AdminNotFound(RegcacheError):
    """No such image in the cache."""


class AdminConflict(RegcacheError):
    """The request conflicts with the cache's state."""


# Upstream failures. ``UpstreamError`` carries the upstream's name (never its
# credentials) so logs and metrics can say which registry failed.
class UpstreamError(RegcacheError):
    """The upstream registry failed."""

    kind = "error"

    def __init__(self, message: str = "", upstream: str = "") -> None:
        super().__init__(message)
        self.upstream = upstream


class UpstreamUnavailable(UpstreamError):
    """The upstream registry is unavailable."""

    kind = "connect"


class UpstreamTimeout(UpstreamUnavailable):
    """The upstream registry timed out."""

    kind = "timeout"


class UpstreamCircuitOpen(UpstreamUnavailable):
    """The upstream registry is unreachable; it was not asked (its circuit breaker is open)."""

    kind = "circuit_open"

    def __init__(self, message: str = "", upstream: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, upstream)
        self.retry_after = retry_after


class CredentialHelperFailed(UpstreamUnavailable):
    """The upstream's credential helper gave no credentials; the message never holds its output."""

    kind = "credential_helper"


class UpstreamServerError(UpstreamUnavailable):
    """The upstream registry answered with a server error."""

    kind = "5xx"


class UpstreamTooManyRequests(UpstreamError):
    """The upstream registry is rate limiting."""

    kind = "429"

    def __init__(self, message: str = "", upstream: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, upstream)
        self.retry_after = retry_after


class UpstreamUnauthorized(UpstreamError):
    """The upstream registry refused our credentials."""

    kind = "auth"


class UpstreamDigestMismatch(UpstreamError):
    """The upstream sent content that does not hash to the digest asked for or announced:
    a bad gateway, not a fault of the client's request."""

    kind = "digest_mismatch"


class UpstreamNotFound(UpstreamError):
    """The upstream registry does not have it."""

    kind = "not_found"


class UpstreamDenied(UpstreamError):
    """The upstream registry denied access."""

    kind = "auth"
