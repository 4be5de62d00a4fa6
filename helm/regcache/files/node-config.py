"""Point a node's containerd at regcache: write hosts.toml files, remove them on exit.

Run by the chart's node DaemonSet with the node's containerd hosts directory
(containerd's ``config_path``) mounted. For each mirrored registry it writes
``<hosts-dir>/<registry>/hosts.toml`` naming regcache as the first host; containerd
then sends ``GET /v2/<name>/...?ns=<registry>`` there and falls back to the
registry itself (``server``) when regcache does not answer. containerd reads
these files on every pull, so nothing restarts.

A file is ours only when its first line is our marker, which names the release:
a hosts.toml written by hand, or by another release, is never changed or removed.
On SIGTERM (pod deleted: uninstall, node config disabled) our files are removed.

Only the standard library: this runs in the regcache image with nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

MARKER = "# Managed by regcache {owner}: removed when it is uninstalled; do not edit."


def hosts_toml(server: str, endpoint: str, owner: str) -> str:
    """The hosts.toml for one registry: regcache first, the registry itself as fallback."""
    return (
        f"{MARKER.format(owner=owner)}\n"
        f"server = {json.dumps(server)}\n"
        "\n"
        f"[host.{json.dumps(endpoint)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )


def resolve_endpoint(service: str) -> str:
    """``HOST:PORT`` of the Service -> ``http://<ClusterIP>:PORT``.

    containerd runs in the node's network namespace, where cluster DNS names do
    not resolve but ClusterIPs are routed (kube-proxy), so the address is written.
    """
    host, _, port = service.rpartition(":")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    address = str(infos[0][4][0])
    return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


def owned(path: Path, owner: str) -> bool:
    try:
        with path.open() as file:
            return file.readline().rstrip("\n") == MARKER.format(owner=owner)
    except OSError:
        return False


def write_atomically(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".hosts.toml.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(content)
        os.chmod(temp, 0o644)
        os.replace(temp, path)  # containerd never reads half a file
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def apply(hosts_dir: Path, registries: list[dict[str, str]], endpoint: str, owner: str) -> None:
    wanted = {r["registry"]: hosts_toml(r["server"], endpoint, owner) for r in registries}
    for registry, content in wanted.items():
        path = hosts_dir / registry / "hosts.toml"
        if path.exists() and not owned(path, owner):
            log(f"{path}: written by someone else, left alone")
            continue
        if path.exists() and path.read_text() == content:
            continue
        write_atomically(path, content)
        log(f"{path}: {registry} now pulls through {endpoint}")
    for path in hosts_dir.glob("*/hosts.toml"):  # registries no longer mirrored
        if path.parent.name not in wanted and owned(path, owner):
            remove(path)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    log(f"{path}: removed")
    with contextlib.suppress(OSError):  # only when empty: certificates put there by hand stay
        path.parent.rmdir()


def remove_all(hosts_dir: Path, owner: str) -> None:
    for path in hosts_dir.glob("*/hosts.toml"):
        if owned(path, owner):
            remove(path)


def log(message: str) -> None:
    print(f"node-config: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registries", type=Path, required=True, help='JSON: [{"registry", "server"}, ...]')
    parser.add_argument("--hosts-dir", type=Path, required=True, help="containerd's config_path on the node")
    parser.add_argument("--owner", required=True, help="NAMESPACE/RELEASE, marks the files this release wrote")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="URL nodes reach regcache at")
    where.add_argument("--service", help="HOST:PORT of the regcache Service, resolved to its ClusterIP")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between checks")
    args = parser.parse_args(argv)

    registries = json.loads(args.registries.read_text())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    wait = 0.0
    while not stop.wait(wait):
        wait = args.interval
        try:
            endpoint = args.endpoint or resolve_endpoint(args.service)
        except OSError as exc:
            log(f"cannot resolve {args.service}: {exc}; files unchanged, retrying")
            wait = min(args.interval, 5.0)
            continue
        try:
            apply(args.hosts_dir, registries, endpoint, args.owner)
        except OSError as exc:
            log(f"cannot write under {args.hosts_dir}: {exc}; retrying")
    remove_all(args.hosts_dir, args.owner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
