"""What the cache reports as it works: the seam between the logic and metrics.

``Events`` does nothing; ``proxy.metrics`` implements it with Prometheus
collectors. Keeping the calls here lets the request path stay free of
collector plumbing.
"""

from __future__ import annotations


class Events:
    def manifest(self, upstream: str, result: str) -> None:
        """A manifest was served: hit, miss, stale, revalidated or coalesced."""

    def blob(self, upstream: str, result: str, size: int | None) -> None:
        """A blob request was answered: hit, miss or coalesced."""

    def prefetched(self, upstream: str) -> None:
        """A blob fill began before any client asked (proxy.prefetch)."""

    def served(self, upstream: str, kind: str, result: str, size: int) -> None:
        """Bytes sent to a client."""

    def stale(self, upstream: str, reason: str) -> None:
        """Cached content served because the upstream failed."""

    def fetched(self, upstream: str, kind: str, size: int) -> None:
        """Bytes fetched from the upstream and committed."""

    def digest_mismatch(self, upstream: str, kind: str) -> None:
        """Upstream content failed verification."""

    def fill_started(self, upstream: str) -> None:
        """A blob fill began."""

    def fill_finished(self, upstream: str) -> None:
        """A blob fill ended, well or not."""

    def store_full(self) -> None:
        """A write failed for lack of space."""

    def gc_run(self, trigger: str, seconds: float) -> None:
        """A garbage collection pass ended (trigger: interval, watermark, admin, startup)."""

    def evicted(self, reason: str, blobs: int, size: int) -> None:
        """Blobs left the store (reason: lru, expired, unreferenced, rmi)."""

    def http_request(
        self, route: str, method: str, status: int, seconds: float, sent: int, upstream: str | None, result: str | None
    ) -> None:
        """A client request ended (called by the access logger after the last byte)."""
