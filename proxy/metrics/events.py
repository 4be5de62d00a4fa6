"""What the cache reports as it works: the seam between the logic and what watches it.

``Events`` does nothing; ``proxy.metrics.prometheus`` implements it with Prometheus
collectors and ``proxy.notify`` with webhooks; ``Fanout`` feeds several. Keeping the
calls here lets the request path stay free of collector and delivery plumbing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# What the distribution registry calls every blob in its events, layer or config alike.
BLOB_MEDIA_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Content:
    """The manifest or blob an event is about, in registry terms."""

    upstream: str
    repository: str  # as the upstream names it (library/busybox)
    digest: str
    media_type: str | None = None
    size: int | None = None
    tag: str | None = None
    url: str | None = None  # where a client fetches it from this cache, when a client asked


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """The client request an event happened for (the one that caused a fill, an rmi, a load)."""

    id: str
    addr: str
    host: str
    method: str
    useragent: str


# Set per request by the request-context middleware; tasks a request starts (fills,
# prefetches) inherit it, so their events name the request that caused them.
CLIENT_REQUEST: ContextVar[ClientRequest | None] = ContextVar("regcache_client_request", default=None)


class Events:
    # Whether this sink reads CLIENT_REQUEST: only then is it set for every request.
    reads_client_request = False
    # The events this class gives a body, found once as each subclass is defined.
    _heard: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._heard = frozenset(name for name in _EVENTS if getattr(cls, name) is not getattr(Events, name))

    def listens(self, event: str) -> bool:
        """Whether this sink does something on ``event`` (a method's name): what only that event
        would use (a pulled content's URL, built on every cached manifest) need not be built otherwise."""
        return event in self._heard

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

    def digest_mismatch(self, kind: str, content: Content) -> None:
        """Upstream content (kind: manifest or blob) failed verification."""

    def pulled(self, kind: str, content: Content, result: str) -> None:
        """A client got a manifest or a blob, after its last byte; result as in ``manifest``/``blob``."""

    def committed(self, kind: str, content: Content) -> None:
        """Content fetched from the upstream is verified and in the store."""

    def loaded(self, content: Content) -> None:
        """A manifest entered the store from an archive (``load``)."""

    def images_removed(self, reason: str, images: Sequence[Content]) -> None:
        """Images left the store (reason: rmi, budget, expire, full, sweep, ...)."""

    def notification(self, endpoint: str, outcome: str, events: int) -> None:
        """Notification events sent, retried after a failed delivery, or dropped (queue full, shutdown)."""

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


_EVENTS = [name for name, value in vars(Events).items()
           if callable(value) and not name.startswith("_") and name != "listens"]


class Fanout(Events):
    """Every event to each of several consumers, in order (metrics first, then notifications)."""

    def __init__(self, *sinks: Events) -> None:
        self.sinks = sinks
        self._heard = frozenset(name for name in _EVENTS if any(sink.listens(name) for sink in sinks))
        self.reads_client_request = any(sink.reads_client_request for sink in sinks)

    def find(self, kind: type[T]) -> T | None:
        return next((s for s in self.sinks if isinstance(s, kind)), None)


def _forward(name: str) -> Callable[..., None]:
    def forward(self: Fanout, *args: Any, **kwargs: Any) -> None:
        for sink in self.sinks:
            getattr(sink, name)(*args, **kwargs)

    forward.__name__ = name
    return forward


# Generated rather than written out, so a method added to Events reaches every sink.
for _name in _EVENTS:
    setattr(Fanout, _name, _forward(_name))


def find_sink(events: Events, kind: type[T]) -> T | None:
    """``events`` itself or, behind a ``Fanout``, the consumer of that type."""
    if isinstance(events, kind):
        return events
    return events.find(kind) if isinstance(events, Fanout) else None
