"""Prometheus metrics: ``Events``, ``UpstreamObserver`` and SQLite timings as collectors.

Every application gets its own ``CollectorRegistry`` (tests build many apps in
one process). Names under ``registry_proxy_*`` match the distribution
registry's proxy counters so existing dashboards keep working; ``regcache_*``
are this cache's own.

Several worker processes: prometheus-client keeps values in per-process files
when ``PROMETHEUS_MULTIPROC_DIR`` is set in the environment *before* the first
import of ``prometheus_client`` (it picks its value class at import). The
directory must exist, be empty at start, and be shared by all workers; any
worker's ``/metrics`` then merges every worker's files (``MultiProcessCollector``).
A supervisor that restarts a worker should call
``prometheus_client.multiprocess.mark_process_dead(pid)`` for the dead one so its
live gauges (in-flight fills) drop out. Store totals are the same for every
worker (one data directory), so they are not kept in files: whichever worker
answers the scrape reports its own recent snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy.metrics.events import Content, Events, find_sink

log = logging.getLogger("regcache.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Registry round trips: from a LAN mirror's milliseconds to a slow token realm.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Whole responses, including multi-GiB blobs.
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SQLITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
# Routes whose requests are proxy requests in distribution's sense.
CONTENT_ROUTES = {"manifest": "manifest", "blob": "blob"}
# Results served from the cache, in distribution's hit/miss terms.
_HITS = frozenset({"hit", "revalidated", "stale"})
_MISSES = frozenset({"miss", "coalesced"})
# Results of requests that ended before pullthrough had an answer, by status (499: the client left).
_UNANSWERED = {404: "not_found", 499: "disconnected"}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


@dataclass(frozen=True, slots=True)
class StoreTotals:
    bytes: int = 0
    blobs: int = 0
    images: int = 0
    repositories: int = 0


class StoreCollector(Collector):
    """Store size from a snapshot: a scrape never waits on a query."""

    def __init__(self) -> None:
        self.totals: StoreTotals | None = None
        self.updated_at = 0.0

    def update(self, totals: StoreTotals) -> None:
        self.totals = totals
        self.updated_at = time.time()

    def collect(self) -> Iterable[Metric]:
        totals = self.totals
        if totals is None:
            return
        yield GaugeMetricFamily("regcache_store_bytes", "Bytes of blobs in the store", value=totals.bytes)
        yield GaugeMetricFamily("regcache_store_blobs", "Blobs in the store", value=totals.blobs)
        yield GaugeMetricFamily("regcache_store_images", "Images (repository, manifest) cached", value=totals.images)
        yield GaugeMetricFamily("regcache_store_repositories", "Repositories known", value=totals.repositories)
        yield GaugeMetricFamily(
            "regcache_store_stats_timestamp_seconds", "When the store totals were computed", value=self.updated_at
        )


class Metrics(Events):
    """The collectors, fed through the ``Events`` hooks, ``UpstreamObserver`` and ``Metadata.observe``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.store = StoreCollector()
        self.registry.register(self.store)
        r = self.registry

        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        # distribution's proxy counters (type = blob | manifest)
        self.proxy_requests = counter("registry_proxy_requests", "Proxy requests for blobs and manifests", ["type"])
        self.proxy_hits = counter("registry_proxy_hits", "Proxy requests served from the cache", ["type"])
        self.proxy_misses = counter("registry_proxy_misses", "Proxy requests the cache lacked", ["type"])
        self.proxy_pulled = counter("registry_proxy_pulled_bytes", "Bytes pulled from upstreams", ["type"])
        self.proxy_pushed = counter("registry_proxy_pushed_bytes", "Bytes sent to clients", ["type"])
        # regcache's own
        self.requests = counter(
            "regcache_requests", "Blob and manifest requests by result", ["upstream", "type", "result"]
        )
        self.served_bytes = counter(
            "regcache_served_bytes", "Bytes sent to clients, by where they came from", ["upstream", "type", "source"]
        )
        self.fetched_bytes = counter(
            "regcache_upstream_fetched_bytes", "Verified bytes fetched from upstreams", ["upstream", "type"]
        )
        self.stale_served = counter(
            "regcache_stale_served", "Stale content served because the upstream failed", ["upstream", "reason"]
        )
        self.digest_mismatches = counter(
            "regcache_digest_mismatches", "Upstream content that failed verification", ["upstream", "type"]
        )
        self.notifications = counter(
            "regcache_notification_events",
            "Notification events by endpoint and outcome: sent, retried (a delivery failed), "
            "dropped (queue full or shutdown)",
            ["endpoint", "outcome"],
        )
        self.prefetched_blobs = counter(
            "regcache_prefetched_blobs", "Blob fills begun before any client asked (proxy.prefetch)", ["upstream"]
        )
        self.store_full_total = counter("regcache_store_full", "Writes that failed for lack of space", [])
        self.fills = Gauge(
            "regcache_fills_in_flight",
            "Blob fills from upstreams in progress",
            ["upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_seconds = Histogram(
            "regcache_upstream_request_duration_seconds",
            "Upstream requests (with their retries) by operation and outcome",
            ["upstream", "operation", "status"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_errors = counter(
            "regcache_upstream_errors",
            "Upstream failures by kind (timeout, connect, 5xx, 429, auth, ...)",
            ["upstream", "kind"],
        )
        self.ratelimit_remaining = Gauge(
            "regcache_upstream_ratelimit_remaining",
            "RateLimit-Remaining the upstream last reported",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.ratelimit_limit = Gauge(
            "regcache_upstream_ratelimit_limit",
            "RateLimit-Limit the upstream last reported",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.upstream_state = Gauge(
            "regcache_upstream_state",
            "The upstream's circuit breaker: 0 closed (asked as usual), 1 open (unreachable, not asked)",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.upstream_transitions = counter(
            "regcache_upstream_state_transitions", "Circuit breaker transitions by new state", ["upstream", "state"]
        )
        self.gc_runs = counter("regcache_gc_runs", "Garbage collection passes", ["trigger"])
        self.gc_seconds = Histogram(
            "regcache_gc_duration_seconds",
            "Garbage collection pass duration",
            ["trigger"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.evicted_blobs = counter("regcache_evicted_blobs", "Blobs removed from the store", ["reason"])
        self.evicted_bytes = counter("regcache_evicted_bytes", "Bytes removed from the store", ["reason"])
        self.http_seconds = Histogram(
            "regcache_http_request_duration_seconds",
            "Client requests, until the last byte was sent",
            ["route", "method", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.sqlite_seconds = Histogram(
            "regcache_sqlite_operation_duration_seconds",
            "SQLite reads and writes",
            ["operation"],
            buckets=SQLITE_BUCKETS,
            registry=r,
        )

        # The series each request touches, looked up once per set of label values: prometheus-client's
        # labels() takes a lock and converts every value on each call, a few microseconds a time on
        # every cached manifest. Children are never removed, so a remembered one stays the metric's own.
        self._result_series = functools.cache(self._series_of_result)
        self._http_series = functools.cache(self._series_of_http)
        self._served_series = functools.cache(self._series_of_served)
        # And those each fill touches (a small layer's costs a few of these per blob). Label
        # values come from the configuration or from small fixed sets (kinds, HTTP statuses).
        self._fill_series = functools.cache(self.fills.labels)
        self._prefetched_series = functools.cache(self.prefetched_blobs.labels)
        self._fetched_series = functools.cache(self._series_of_fetched)
        self._upstream_series = functools.cache(self.upstream_seconds.labels)
        self._sqlite_series = functools.cache(self.sqlite_seconds.labels)

    def _series_of_result(self, upstream: str, kind: str, result: str) -> tuple[Counter, ...]:
        series = [self.requests.labels(upstream, kind, result), self.proxy_requests.labels(kind)]
        if result in _HITS:
            series.append(self.proxy_hits.labels(kind))
        elif result in _MISSES:
            series.append(self.proxy_misses.labels(kind))
        return tuple(series)

    def _series_of_http(self, route: str, method: str, status: int) -> Histogram:
        return self.http_seconds.labels(route, method, str(status))

    def _series_of_served(self, upstream: str, kind: str, result: str) -> tuple[Counter, Counter]:
        source = "cache" if result in _HITS else "upstream"
        return self.served_bytes.labels(upstream, kind, source), self.proxy_pushed.labels(kind)

    def _series_of_fetched(self, upstream: str, kind: str) -> tuple[Counter, Counter]:
        return self.fetched_bytes.labels(upstream, kind), self.proxy_pulled.labels(kind)

    # -- Events -------------------------------------------------------------

    def _result(self, upstream: str, kind: str, result: str) -> None:
        for series in self._result_series(upstream, kind, result):
            series.inc()

    def manifest(self, upstream: str, result: str) -> None:
        self._result(upstream, "manifest", result)

    def blob(self, upstream: str, result: str, size: int | None) -> None:
        self._result(upstream, "blob", result)

    def prefetched(self, upstream: str) -> None:
        self._prefetched_series(upstream).inc()

    def served(self, upstream: str, kind: str, result: str, size: int) -> None:
        by_source, pushed = self._served_series(upstream, kind, result)
        by_source.inc(size)
        pushed.inc(size)

    def stale(self, upstream: str, reason: str) -> None:
        self.stale_served.labels(upstream, reason).inc()

    def fetched(self, upstream: str, kind: str, size: int) -> None:
        by_upstream, pulled = self._fetched_series(upstream, kind)
        by_upstream.inc(size)
        pulled.inc(size)

    def digest_mismatch(self, kind: str, content: Content) -> None:
        self.digest_mismatches.labels(content.upstream, kind).inc()

    def notification(self, endpoint: str, outcome: str, events: int) -> None:
        self.notifications.labels(endpoint, outcome).inc(events)

    def fill_started(self, upstream: str) -> None:
        self._fill_series(upstream).inc()

    def fill_finished(self, upstream: str) -> None:
        self._fill_series(upstream).dec()

    def store_full(self) -> None:
        self.store_full_total.inc()

    def gc_run(self, trigger: str, seconds: float) -> None:
        self.gc_runs.labels(trigger).inc()
        self.gc_seconds.labels(trigger).observe(seconds)

    def evicted(self, reason: str, blobs: int, size: int) -> None:
        self.evicted_blobs.labels(reason).inc(blobs)
        self.evicted_bytes.labels(reason).inc(size)

    def http_request(
        self, route: str, method: str, status: int, seconds: float, sent: int, upstream: str | None, result: str | None
    ) -> None:
        # Clients choose the method: only known ones become label values (or keys of the series cache).
        self._http_series(route, method if method in _METHODS else "other", status).observe(seconds)
        kind = CONTENT_ROUTES.get(route)
        if kind is None or upstream is None or method != "GET":
            return
        if status >= 400 and result is None:
            # Failed, or the client left, before pullthrough had an answer: neither hit nor miss.
            self._result(upstream, kind, _UNANSWERED.get(status, "error"))
        elif sent:
            self.served(upstream, kind, result or "miss", sent)

    # -- UpstreamObserver -----------------------------------------------------

    def request_done(self, upstream: str, operation: str, status: str, seconds: float) -> None:
        self._upstream_series(upstream, operation, status).observe(seconds)

    def error(self, upstream: str, kind: str) -> None:
        self.upstream_errors.labels(upstream, kind).inc()

    def upstream_added(self, upstream: str) -> None:
        """Every configured upstream has a state from the start, not from its first transition."""
        self.upstream_state.labels(upstream).set(0)

    def breaker(self, upstream: str, state: str) -> None:
        self.upstream_state.labels(upstream).set(1 if state == "open" else 0)
        self.upstream_transitions.labels(upstream, state).inc()

    def rate_limit(self, upstream: str, limit: int | None, remaining: int | None) -> None:
        if limit is not None:
            self.ratelimit_limit.labels(upstream).set(limit)
        if remaining is not None:
            self.ratelimit_remaining.labels(upstream).set(remaining)

    # -- Metadata.observe -----------------------------------------------------

    def sqlite(self, operation: str, seconds: float) -> None:
        self._sqlite_series(operation).observe(seconds)

    # -- exposition -----------------------------------------------------------

    def render(self) -> bytes:
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path)
        merged.register(self.store)
        return generate_latest(merged)


def metrics_of(events: Events) -> Metrics | None:
    return find_sink(events, Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    from proxy.resources import EVENTS

    events = metrics_of(request.app[EVENTS])
    if events is None:
        raise web.HTTPNotFound()
    # Rendering walks every series; in a thread it cannot stall pulls.
    body = await asyncio.to_thread(events.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(main: web.Application) -> web.Application:
    """A tiny app for ``metrics.listen``: only ``/metrics``, reading the main app's collectors."""
    from proxy.resources import EVENTS

    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        events = metrics_of(main[EVENTS])
        assert events is not None
        body = await asyncio.to_thread(events.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", handler, name="metrics")
    return app


async def refresh_store_totals(
    metrics: Metrics, totals: Callable[[], Awaitable[StoreTotals]], interval: float
) -> None:
    """Keep ``metrics.store`` current: ``totals`` is an async callable returning ``StoreTotals``."""
    while True:
        try:
            metrics.store.update(await totals())
        except Exception:
            log.exception("computing store totals failed")
        await asyncio.sleep(interval)
