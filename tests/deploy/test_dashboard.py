"""The Grafana dashboard queries only metrics regcache exports, and covers the key ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxy.metrics.prometheus import Metrics, StoreTotals

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "regcache" / "dashboards" / "regcache.json"


def exported_series() -> set[str]:
    metrics = Metrics()
    metrics.store.update(StoreTotals())
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {m for expr in exprs for m in re.findall(r"\b(?:regcache|registry)_[a-z_]+\b", expr)}
    unknown = used - exported_series()
    assert not unknown, f"dashboard uses metrics regcache does not export: {sorted(unknown)}"
    for essential in ("registry_proxy_hits_total", "regcache_upstream_errors_total", "regcache_store_bytes",
                      "regcache_served_bytes_total", "regcache_upstream_request_duration_seconds_bucket"):
        assert essential in used, essential
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
