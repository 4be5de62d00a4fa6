"""The Helm chart and its node configuration, against the code they deploy.

The chart is rendered and linted by the real Helm engine (helm-python-sdk embeds it; no cluster),
every object is validated against the Kubernetes API schemas (kubernetes-validate). The config file
and Secret the chart renders are "mounted" into a temporary directory the way kubelet would, and a
real regcache is started from them; the node DaemonSet's own command is run against a temporary
hosts directory, and a real containerd pulls through the hosts.toml files it writes.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from config.settings import load_settings
from config.units import parse_size
from tests.support.daemons import Containerd, hosts_toml
from tests.support.helm import CHART, NAMESPACE, RELEASE, find, pod_spec, render
from tests.support.images import build_image
from tests.support.registry import Registry, free_port
from tests.support.seed import ALPHA, SeededImage, seed_upstream

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.34.0"
MONITORING = "monitoring.coreos.com/v1"

ON = {"enabled": True}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "ingress": {
        "ingress": {**ON, "className": "nginx", "tls": [{"hosts": ["regcache.example.com"], "secretName": "tls"}]}
    },
    "service-monitor": {"metrics": {"serviceMonitor": ON}},
    "prometheus-rule": {"metrics": {"prometheusRule": ON}},
    "dashboard": {"metrics": {"dashboard": ON}},
    "node-config": {"nodeConfig": ON},
    "credentials": {"credentials": {"docker.io": {"username": "puller", "password": "s3cret"}}},
    "existing-secret": {"secret": {"existingSecret": "mine"}, "credentials": {"docker.io": {"username": "puller"}}},
    "no-persistence": {"persistence": {"enabled": False}, "config": {"storage": {"max_size": "10GiB"}}},
    "node-port": {"service": {"type": "NodePort", "nodePort": 30500}},
    "deployment-s3": {
        "mode": "deployment",
        "replicas": 3,
        "config": {"storage": {"s3": {"endpoint": "https://s3.example.com", "bucket": "regcache", "redirect": True}}},
        "s3": {"accessKey": "AKIAREGCACHE", "secretKey": "s3-secret-key-value"},
    },
    "deployment-s3-existing-secret": {
        "mode": "deployment",
        "replicas": 2,
        "spoolSizeLimit": "20Gi",
        "config": {"storage": {"s3": {"endpoint": "https://s3.example.com", "bucket": "regcache"}}},
        "s3": {"existingSecret": "s3-keys"},
        "metrics": {"prometheusRule": ON, "serviceMonitor": ON},
    },
    "notifications-tracing": {
        "config": {"notifications": {"endpoints": [
            {"name": "audit", "url": "https://audit.example.com/events", "headers": {"X-Source": ["regcache"]}}]}},
        "notifications": {"secretHeaders": {"audit": {"Authorization": "Bearer chart-webhook-secret"}}},
        "tracing": {"enabled": True, "otlpEndpoint": "http://otel-collector.observability:4318"},
    },
    "node-tier": {"nodeTier": ON},
    "access-rules": {
        "config": {
            "upstreams": [
                {"name": "docker.io", "url": "https://registry-1.docker.io", "default": True, "deny": ["x/*"]},
                {"name": "registry.example.com", "url": "https://registry.example.com", "allow": ["team-a/**"],
                 "client_credentials": "verify", "access_ttl": "5m"},
            ],
            "access": {"anonymous": [{"upstream": "docker.io", "repositories": ["library/*"]}]},
        }
    },
    "node-tier-emptydir": {"nodeTier": {"enabled": True, "hostPath": "", "maxSize": "5GiB", "hostPort": 5002}},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


SCENARIOS["everything"] = {}
for _name in ("ingress", "service-monitor", "prometheus-rule", "dashboard", "node-config", "credentials"):
    SCENARIOS["everything"] = _merge(SCENARIOS["everything"], SCENARIOS[_name])


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


# --------------------------------------------------------------------------- chart, schemas


def check_monitoring_object(obj: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """kubernetes-validate has no schemas for the Prometheus operator's CRDs: check their shape here."""
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == NAMESPACE
    duration = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
    if obj["kind"] == "ServiceMonitor":
        spec = obj["spec"]
        selected = [
            d for d in docs
            if d["kind"] == "Service"
            and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
            and all(e["key"] not in d["metadata"]["labels"] for e in spec["selector"]["matchExpressions"])
        ]
        # Exactly the client Service: the headless one would scrape every pod twice.
        assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}-regcache"]
        ports = {p["name"] for p in selected[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"].startswith("/")
            assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])
    elif obj["kind"] == "PrometheusRule":
        rules = [r for group in obj["spec"]["groups"] for r in group["rules"]]
        assert rules and all(group["name"] for group in obj["spec"]["groups"])
        for rule in rules:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]) and rule["expr"].strip()
            assert duration.match(rule["for"]) and rule["labels"]["severity"] in {"info", "warning", "critical"}
    else:
        raise AssertionError(f"unexpected {obj['kind']}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints_renders_and_every_object_matches_the_kubernetes_schemas(scenario: str) -> None:
    values = SCENARIOS[scenario]
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    docs = render(values)
    for obj in docs:
        if obj["apiVersion"] == MONITORING:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # if it gains them, use them
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            check_monitoring_object(obj, docs)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    workload = "Deployment" if values.get("mode") == "deployment" else "StatefulSet"
    expected = {workload, "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"}
    assert expected <= kinds(docs)
    assert not kinds(docs) & {"Deployment", "StatefulSet"} - {workload}
    assert ("Secret" in kinds(docs)) == (scenario != "existing-secret")


def test_optional_parts_are_off_by_default_and_each_switch_adds_its_object() -> None:
    assert kinds(render()).isdisjoint({"Ingress", "ServiceMonitor", "PrometheusRule", "DaemonSet"})
    assert "Ingress" in kinds(render(SCENARIOS["ingress"]))
    assert "ServiceMonitor" in kinds(render(SCENARIOS["service-monitor"]))
    assert "PrometheusRule" in kinds(render(SCENARIOS["prometheus-rule"]))
    assert "DaemonSet" in kinds(render(SCENARIOS["node-config"]))
    # The dashboard JSON is written separately; the chart tolerates its absence.
    dashboards = [d for d in render(SCENARIOS["dashboard"]) if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == (CHART / "dashboards" / "regcache.json").is_file()
    for dashboard in dashboards:
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        json.loads(dashboard["data"]["regcache.json"])


def test_values_schema_rejects_what_the_chart_cannot_deploy() -> None:
    with helm.Chart.load(CHART) as chart:
        for bad in (
            {"replicas": "two"},
            {"mode": "daemonset"},
            {"config": {"listen": "0.0.0.0:80"}},  # the chart owns listen and data_dir
            {"config": {"upstreams": [{"name": "docker.io"}]}},  # no url
            {"persistence": {"size": "lots"}},
            {"admin": {"token": "short"}},  # regcache refuses tokens under 8 characters
            {"config": {"upstreams": [{"name": "a.io", "url": "https://a.io", "deny": ["Team/*"]}]}},  # upper case
            {"config": {"upstreams": [{"name": "a.io", "url": "https://a.io", "client_credentials": "yes"}]}},
            {"config": {"access": {"users": {"alice": [{"repositories": []}]}}}},
            {"typo": True},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_pods_run_hardened() -> None:
    docs = render(SCENARIOS["everything"])
    pod = pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in [*pod["containers"], *pod_spec(docs, "DaemonSet")["containers"]]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]} and not context.get("privileged")
    (regcache,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in regcache["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert regcache["resources"]["requests"] and regcache["resources"]["limits"]["memory"]
    assert regcache["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert regcache["readinessProbe"]["httpGet"]["path"] == "/readyz"
    claim = find(docs, "StatefulSet")["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == mounts["/var/lib/regcache"]
    sized = render({"persistence": {"size": "200Gi", "storageClass": "fast"}})
    claim = find(sized, "StatefulSet")["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["resources"]["requests"]["storage"] == "200Gi" and claim["storageClassName"] == "fast"


def test_a_config_change_rolls_the_pods_and_nothing_else_does() -> None:
    def checksum(values: dict[str, Any]) -> str:
        values = _merge({"admin": {"token": "fixed-admin-token"}}, values)
        return find(render(values), "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({}) == checksum({"podLabels": {"team": "platform"}})
    assert checksum({}) != checksum({"config": {"log": {"level": "debug"}}})
    assert checksum({}) != checksum({"credentials": {"docker.io": {"username": "u", "password": "p"}}})


def test_alerts_use_only_metrics_regcache_exports() -> None:
    from prometheus_client import generate_latest

    from proxy.metrics.prometheus import Metrics, StoreTotals

    metrics = Metrics()
    metrics.store.update(StoreTotals())
    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(metrics.registry).decode(), re.MULTILINE))
    exported |= {f"{name}_total" for name in exported}
    rule = find(render(SCENARIOS["prometheus-rule"]), "PrometheusRule")
    used = {name for r in rule["spec"]["groups"][0]["rules"] for name in re.findall(r"([a-z_:]+)\{", r["expr"])}
    assert {"registry_proxy_hits_total", "regcache_upstream_errors_total", "regcache_store_bytes"} <= used
    assert {name for name in used if not name.startswith("kubelet_")} <= exported
    alerts = {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"]}
    # The size budget is the one the config file gives regcache: 90% of the 50Gi volume.
    assert alerts["RegcacheStoreOverBudget"].strip().endswith(str(int(50 * 1024**3 * 0.9)))


# --------------------------------------------------------------------------- the pods, run here


def mount(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Path]:
    """Lay out each volumeMount of ``container`` under ``root``, as kubelet would; mountPath -> directory."""
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted: dict[str, Path] = {}
    for volume_mount in container["volumeMounts"]:
        volume = volumes.get(volume_mount["name"], {})
        target = root / volume_mount["mountPath"].lstrip("/")
        files: dict[str, bytes] = {}
        if "configMap" in volume:
            data = objects[("ConfigMap", volume["configMap"]["name"])]["data"]
            files = {key: value.encode() for key, value in data.items()}
        elif "secret" in volume:
            data = objects[("Secret", volume["secret"]["secretName"])]["data"]
            files = {key: base64.b64decode(value) for key, value in data.items()}
        if "subPath" in volume_mount:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[volume_mount["subPath"]])
        else:
            target.mkdir(parents=True, exist_ok=True)
            for key, content in files.items():
                (target / key).write_bytes(content)
        mounted[volume_mount["mountPath"]] = target
    return mounted


def relocate(text: str, mounted: dict[str, Path]) -> str:
    """Paths under a mount point -> the same paths under its stand-in directory (one pass)."""
    pattern = "|".join(re.escape(m) for m in sorted(mounted, key=len, reverse=True))
    return re.sub(rf"(?<![\w/])({pattern})(?=/|\b|$)", lambda match: str(mounted[match.group(1)]), text)


def get(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _proxied_blob_requests(url: str) -> float:
    status, body = get(f"{url}/metrics")
    assert status == 200
    found = re.search(rb'^registry_proxy_requests_total\{type="blob"\} (\S+)$', body, re.MULTILINE)
    return float(found[1]) if found else 0.0


@pytest.fixture(scope="module")
def private_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, SeededImage]]:
    """A registry that wants a password, with one small image."""
    with Registry(tmp_path_factory.mktemp("private"), htpasswd={"puller": "chart-secret"}) as registry:
        image = build_image({"srv/private.txt": b"only with the password\n"})
        seeded = seed_upstream(registry, tmp_path_factory.mktemp("seed-private"), {"team/app:1": image})
        yield registry, seeded["team/app:1"]


@pytest.fixture(scope="module")
def chart_regcache(
    tmp_path_factory: pytest.TempPathFactory, upstream: Registry, private_upstream: tuple[Registry, SeededImage]
) -> Iterator[dict[str, Any]]:
    """regcache started from the config file and Secret the chart renders, as the StatefulSet runs it."""
    private, _ = private_upstream
    values = {
        "config": {
            "upstreams": [
                {"name": "docker.io", "url": upstream.url, "default": True},
                {"name": "private.example", "url": private.url, "tag_ttl": "1m"},
            ]
        },
        "credentials": {"private.example": {"username": "puller", "password": "chart-secret"}},
        "nodeConfig": ON,
    }
    root = tmp_path_factory.mktemp("pod")
    port = free_port()
    docs = render(values)
    pod = pod_spec(docs)
    (container,) = pod["containers"]
    mounted = mount(docs, pod, container, root)
    config = root / "etc/regcache/config.yaml"
    config.write_text(relocate(config.read_text(), mounted))
    args = [relocate(arg, mounted) for arg in container["args"]]
    assert args[:1] == ["serve"]
    # The listener moves to a free loopback port; everything else is as rendered.
    command = [sys.executable, "-m", "proxy.cli", *args, "--listen", f"127.0.0.1:{port}"]
    log = (root / "regcache.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
    env["REGCACHE_LIMITS__DRAIN_DELAY"] = "0"  # no load balancer to drain here: stop at once
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            assert process.poll() is None, (root / "regcache.log").read_text()
            try:
                if get(f"{url}/v2/")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        yield {"url": url, "config": config, "container": container, "values": values, "mounted": mounted}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_the_rendered_config_is_what_regcache_loads(chart_regcache: dict[str, Any]) -> None:
    settings = load_settings(chart_regcache["config"])
    private = next(u for u in settings.upstreams if u.name == "private.example")
    assert private.credentials() == ("puller", "chart-secret")  # from the mounted Secret file
    assert private.tag_ttl == 60 and settings.default_upstream.name == "docker.io"
    assert settings.admin.resolve_token()  # the generated token, from the Secret
    assert settings.storage.max_size == int(50 * 1024**3 * 0.9)
    data_mount = next(m["mountPath"] for m in chart_regcache["container"]["volumeMounts"] if m["name"] == "data")
    assert settings.data_dir == chart_regcache["mounted"][data_mount]  # the store is on the volume
    assert settings.host_port == ("0.0.0.0", chart_regcache["container"]["ports"][0]["containerPort"])
    # kubelet's grace period covers regcache's own drain and shutdown.
    grace = pod_spec(render())["terminationGracePeriodSeconds"]
    assert grace > settings.limits.drain_delay + settings.limits.shutdown_timeout


def test_regcache_started_from_the_chart_serves_probes_metrics_and_pulls(
    chart_regcache: dict[str, Any], private_upstream: tuple[Registry, SeededImage], seeded: dict[str, SeededImage]
) -> None:
    url, container = chart_regcache["url"], chart_regcache["container"]
    assert get(f"{url}/v2/") == (200, b"{}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert get(url + container[probe]["httpGet"]["path"])[0] == 200, probe
    monitor = find(render(SCENARIOS["service-monitor"]), "ServiceMonitor")
    assert get(url + monitor["spec"]["endpoints"][0]["path"])[0] == 200
    _, image = private_upstream
    status, body = get(f"{url}/v2/private.example/{image.repository}/manifests/{image.tag}")
    assert status == 200 and body == image.manifest  # the password came from the Secret
    alpha = seeded[ALPHA]
    status, body = get(f"{url}/v2/{alpha.repository}/manifests/{alpha.tag}?ns=docker.io")
    assert status == 200 and body == alpha.manifest


def test_node_daemonset_writes_the_hosts_toml_containerd_pulls_through_and_removes_it(
    chart_regcache: dict[str, Any], upstream: Registry, seeded: dict[str, SeededImage], tmp_path: Path
) -> None:
    url = chart_regcache["url"]
    # The NodePort form of the endpoint: each node's own address, from the downward API.
    port = url.rpartition(":")[2]
    endpoint = f"http://$(NODE_IP):{port}"
    docs = render(_merge(chart_regcache["values"], {"nodeConfig": {"endpoint": endpoint, "interval": 0.2}}))
    pod = pod_spec(docs, "DaemonSet")
    (container,) = pod["containers"]
    mounted = mount(docs, pod, container, tmp_path / "node")
    hosts_dir = mounted["/host/containerd-hosts"]
    registries = json.loads((mounted["/opt/regcache-node"] / "registries.json").read_text())
    assert registries == [
        {"registry": "docker.io", "server": upstream.url},
        {"registry": "private.example", "server": chart_regcache["values"]["config"]["upstreams"][1]["url"]},
    ]
    # Files an administrator wrote: one for a mirrored registry, one for another.
    by_hand = {name: hosts_dir / name / "hosts.toml" for name in ("private.example", "quay.io")}
    for path in by_hand.values():
        path.parent.mkdir(parents=True)
        path.write_text('server = "https://example.invalid"\n')
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env["NODE_IP"] == "status.hostIP"
    env["NODE_IP"] = "127.0.0.1"  # this machine is the node; kubelet expands $(VAR) in commands
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], relocate(arg, mounted)) for arg in container["command"]]
    assert command[0] == "python3"
    ours = hosts_dir / "docker.io" / "hosts.toml"
    process = subprocess.Popen([sys.executable, *command[1:]], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if ours.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        marker, _, rest = ours.read_text().partition("\n")
        assert marker.startswith(f"# Managed by regcache {NAMESPACE}/{RELEASE}")
        # Byte for byte the format the containerd mirror tests use.
        assert rest == hosts_toml(url, server=upstream.url)
        assert all(path.read_text() == 'server = "https://example.invalid"\n' for path in by_hand.values())

        containerd = Containerd(tmp_path / "containerd").start()
        try:
            alpha = seeded[ALPHA]
            reference = f"docker.io/{alpha.repository}:{alpha.tag}"
            upstream.reset_requests()
            before = _proxied_blob_requests(url)
            pulled = containerd.pull(reference, hosts_dir)
            assert pulled.returncode == 0, pulled.stdout + pulled.stderr
            assert containerd.image_digest(reference) == alpha.digest
            # The pull went through regcache (the blobs may be cached already: an
            # earlier manifest GET prefetched them) ...
            assert _proxied_blob_requests(url) > before
            # ... and containerd's own requests would go straight to the fallback server: none did.
            agents = [record.header("User-Agent") or "" for record in upstream.request_log()]
            assert not [agent for agent in agents if agent.startswith("containerd")]
        finally:
            containerd.stop()
    finally:
        process.send_signal(signal.SIGTERM)  # the pod is deleted: uninstall, or nodeConfig turned off
        _, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors
    assert not ours.exists() and not ours.parent.exists()
    assert all(path.read_text() == 'server = "https://example.invalid"\n' for path in by_hand.values())


def test_node_config_finds_the_service_by_its_cluster_address() -> None:
    """Without an endpoint the DaemonSet resolves the Service name (cluster DNS) to the ClusterIP."""
    (container,) = pod_spec(render(SCENARIOS["node-config"]), "DaemonSet")["containers"]
    service = container["command"][container["command"].index("--service") + 1]
    assert service == f"{RELEASE}-regcache.{NAMESPACE}.svc.cluster.local:5000"
    namespace: dict[str, Any] = {"__name__": "node_config"}
    exec(compile((CHART / "files" / "node-config.py").read_text(), "node-config.py", "exec"), namespace)
    assert namespace["resolve_endpoint"]("localhost:5000") in {"http://127.0.0.1:5000", "http://[::1]:5000"}


# --------------------------------------------------------------------------- S3 mode, node tier


def secret_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment with secretKeyRef values read from the rendered Secrets, as kubelet does."""
    secrets = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    env = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            env[entry["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


def test_deployment_mode_runs_n_replicas_without_a_claim_and_takes_s3_keys_from_a_secret() -> None:
    docs = render(SCENARIOS["deployment-s3"])
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3 and "volumeClaimTemplates" not in deployment["spec"]
    assert "StatefulSet" not in kinds(docs) and "PersistentVolumeClaim" not in kinds(docs)
    # Only the client Service: there is no StatefulSet to govern.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Service"] == [f"{RELEASE}-regcache"]
    pod = pod_spec(docs, "Deployment")
    (container,) = pod["containers"]
    data = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/regcache")
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[data]
    assert secret_env(docs, container) == {
        "AWS_ACCESS_KEY_ID": "AKIAREGCACHE",
        "AWS_SECRET_ACCESS_KEY": "s3-secret-key-value",
    }
    config = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-regcache")["data"]["config.yaml"])
    assert config["storage"]["backend"] == "s3" and "max_size" not in config["storage"]
    assert "s3-secret-key-value" not in json.dumps(config)  # keys never in the ConfigMap
    # A Secret of one's own: referenced by the keys given, the chart's Secret holds no S3 keys.
    docs = render(SCENARIOS["deployment-s3-existing-secret"])
    (container,) = pod_spec(docs, "Deployment")["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    assert not [k for k in find(docs, "Secret")["data"] if k.startswith("s3-")]
    volumes = {v["name"]: v for v in pod_spec(docs, "Deployment")["volumes"]}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": "20Gi"}
    # No volume, no budget: the alerts about a volume are not rendered.
    alerts = {r["alert"] for r in find(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert not alerts & {"RegcacheDiskNearlyFull", "RegcacheStoreOverBudget"}


def test_s3_mode_needs_a_bucket() -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(Exception, match=r"config\.storage\.s3\.bucket"):
        chart.render({"mode": "deployment"}, name=RELEASE, namespace=NAMESPACE)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.render({"mode": "deployment", "s3": {"accessKeyId": "typo"}}, name=RELEASE, namespace=NAMESPACE)


def test_notification_header_secrets_and_tracing_reach_regcache_as_mounted_files_and_otel_variables(
    tmp_path: Path,
) -> None:
    values = SCENARIOS["notifications-tracing"]
    docs = render(values)
    pod = pod_spec(docs)
    (container,) = pod["containers"]
    mounted = mount(docs, pod, container, tmp_path)
    config = tmp_path / "etc/regcache/config.yaml"
    assert "chart-webhook-secret" not in config.read_text()  # the ConfigMap names a file, not the value
    config.write_text(relocate(config.read_text(), mounted))
    settings = load_settings(config)
    (endpoint,) = settings.notifications.endpoints
    assert endpoint.header_files["Authorization"].read_text() == "Bearer chart-webhook-secret"
    assert endpoint.headers == {"X-Source": ["regcache"]} and settings.tracing.enabled
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    # A secret header for an endpoint that does not exist is refused, not silently unused.
    with helm.Chart.load(CHART) as chart, pytest.raises(Exception, match=r"notifications\.secretHeaders"):
        chart.render({"notifications": {"secretHeaders": {"typo": {"Authorization": "x"}}}},
                     name=RELEASE, namespace=NAMESPACE)


def start_pod(docs: list[dict[str, Any]], kind: str, root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A regcache process from a rendered pod (mounts laid out under ``root``), on a free loopback port."""
    pod = pod_spec(docs, kind)
    container = next(c for c in pod["containers"] if c["name"] == "regcache")
    mounted = mount(docs, pod, container, root)
    config = root / "etc/regcache/config.yaml"
    config.write_text(relocate(config.read_text(), mounted))
    port = free_port()
    args = [relocate(arg, mounted) for arg in container["args"]]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("REGCACHE_", "AWS_"))}
    environment.update(env, REGCACHE_LIMITS__DRAIN_DELAY="0")
    with (root / "regcache.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "proxy.cli", *args, "--listen", f"127.0.0.1:{port}"],
                                   cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        assert process.poll() is None, (root / "regcache.log").read_text()
        try:
            if get(f"{url}/readyz")[0] == 200:
                return process, url
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise AssertionError((root / "regcache.log").read_text())


def test_deployment_replicas_from_the_chart_share_one_rgw_bucket(
    rgw, upstream: Registry, seeded: dict[str, SeededImage], tmp_path: Path
) -> None:
    bucket = rgw.make_bucket()
    values = {
        "mode": "deployment",
        "replicas": 2,
        "config": {
            "upstreams": [{"name": "docker.io", "url": upstream.url, "default": True}],
            "storage": {"s3": {"endpoint": rgw.endpoint, "bucket": bucket}},
        },
        "s3": {"accessKey": rgw.access_key, "secretKey": rgw.secret_key},
    }
    docs = render(values)
    (container,) = pod_spec(docs, "Deployment")["containers"]
    env = secret_env(docs, container)
    processes = []
    try:
        # Two pods of the Deployment: each its own emptyDir, the keys only in their environment.
        for i in range(2):
            processes.append(start_pod(docs, "Deployment", tmp_path / f"pod-{i}", env))
        settings = load_settings(tmp_path / "pod-0" / "etc/regcache/config.yaml")
        assert settings.storage.backend == "s3" and settings.storage.max_size is None
        assert settings.storage.s3 is not None and settings.storage.s3.bucket == bucket
        assert settings.storage.s3.access_key is None  # from AWS_* in the environment, not the file
        alpha = seeded[ALPHA]
        upstream.reset_requests()
        for i, (_, url) in enumerate(processes * 2):
            status, body = get(f"{url}/v2/{alpha.repository}/manifests/{alpha.tag}")
            assert status == 200 and body == alpha.manifest, i
            for digest in alpha.blob_digests:
                status, body = get(f"{url}/v2/{alpha.repository}/blobs/{digest}")
                assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
        for digest in alpha.blob_digests:
            assert upstream.blob_gets(digest) == 1, digest
        assert {k.rsplit("/", 1)[1] for k in rgw.keys(bucket, "blobs/")} >= {
            d.split(":")[1] for d in alpha.blob_digests
        }
    finally:
        for process, _ in processes:
            process.send_signal(signal.SIGTERM)
        for process, _ in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.parametrize("scenario", ["node-tier", "node-tier-emptydir"])
def test_node_tier_is_a_local_cache_whose_upstream_is_the_cluster_service(scenario: str, tmp_path: Path) -> None:
    values = SCENARIOS[scenario]
    tier = _merge(yaml.safe_load((CHART / "values.yaml").read_text())["nodeTier"], values["nodeTier"])
    docs = render(values)
    daemonset = find(docs, "DaemonSet", f"{RELEASE}-regcache-node-tier")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["ports"][0]["hostPort"] == tier["hostPort"] and container["ports"][0]["hostIP"] == "127.0.0.1"
    assert container["resources"] == tier["resources"]
    # Never behind the cluster Service: its selector must not pick node caches.
    service = find(docs, "Service", f"{RELEASE}-regcache")
    assert not service["spec"]["selector"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    if tier["hostPath"]:
        assert volumes["data"]["hostPath"]["path"] == tier["hostPath"]
        (init,) = pod["initContainers"]  # hands the root-owned host directory to the pod's user
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    else:
        assert "emptyDir" in volumes["data"] and "initContainers" not in pod
    mounted = mount(docs, pod, container, tmp_path)
    settings = load_settings(mounted["/etc/regcache"] / "config.yaml")
    assert [u.name for u in settings.upstreams] == ["cluster"]
    assert settings.upstreams[0].url == f"http://{RELEASE}-regcache.{NAMESPACE}.svc:5000"
    assert settings.storage.backend == "filesystem"
    assert settings.storage.max_size == parse_size(tier["maxSize"])
