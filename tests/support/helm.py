"""Rendering the Helm chart with the real Helm engine (no helm binary), for the chart and image tests."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import yaml

from tests.support.regcache import ROOT

CHART = ROOT / "helm" / "regcache"
RELEASE, NAMESPACE = "rc", "cache"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]], kind: str = "StatefulSet") -> dict[str, Any]:
    return find(docs, kind)["spec"]["template"]["spec"]
