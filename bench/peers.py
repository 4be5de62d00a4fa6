"""The processes a benchmark run compares: regcache, distribution, nginx, the bare relay.

Everything listens on 127.0.0.1 and lives under one work directory that the
run removes at the end. regcache runs the way an operator runs it: ``python -m
proxy.cli serve --config FILE`` in its own process group, so that worker
processes are counted and stopped with it.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.registry import HOST, Registry, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-token-0123456789"


def forget(tree: Path, aside: Path | None) -> None:
    """A cache's tree gone: removed, or moved under ``aside`` for the caller to remove later.

    Removing thousands of files just before a cold pull costs that pull: on this kind of
    machine's ext4 (no journal), each new inode's allocation steps over recently deleted
    ones, reading their inode table blocks (``recently_deleted`` in a perf profile), for
    a minute or more. A cache in service rarely creates files right after deleting that
    many; the cases that count CPU per small fill move the old tree aside instead.
    """
    if aside is None:
        shutil.rmtree(tree, ignore_errors=True)
    elif tree.exists():
        aside.mkdir(parents=True, exist_ok=True)
        tree.rename(aside / f"{tree.name}-{time.monotonic_ns()}")


def _answers(port: int, path: str = "/v2/") -> bool:
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        try:
            conn.request("GET", path)
            return conn.getresponse().status < 500
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


def _wait(what: str, proc: subprocess.Popen[bytes], port: int, log: Path, path: str = "/v2/") -> None:
    deadline = time.monotonic() + 30
    while not _answers(port, path):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start:\n{tail}")
        time.sleep(0.05)


def _stop_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Regcache:
    """One ``regcache serve`` with a config file; ``reset()`` makes it cold again."""

    def __init__(
        self, workdir: Path, upstream_url: str, *, log_level: str = "warning", upstream: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None, tree: Path = REPO_ROOT,
    ) -> None:
        self.workdir = workdir
        self.tree = tree.resolve()  # the source tree regcache runs from (another commit's, for an A/B)
        self.upstream_settings = upstream or {}  # more settings of the upstream entry
        self.settings = settings or {}  # more top-level settings
        self.data_dir = workdir / "data"
        self.config_path = workdir / "regcache.yml"
        self.log_path = workdir / "regcache.log"
        self.upstream_url = upstream_url
        self.log_level = log_level
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self) -> dict[str, Any]:
        return {
            "listen": self.host,
            "data_dir": str(self.data_dir),
            "upstreams": [
                {"name": "upstream.bench", "url": self.upstream_url, "default": True, **self.upstream_settings}
            ],
            "admin": {"token": ADMIN_TOKEN},
            # Like the distribution anchors, which run with their access log off.
            "log": {"level": self.log_level, "format": "json"},
            **self.settings,
        }

    def start(self) -> Regcache:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REGCACHE_", "PROMETHEUS_"))}
        env["PYTHONPATH"] = str(self.tree)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path)],
                cwd=self.tree,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _wait("regcache", self._proc, self.port, self.log_path)
        return self

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None

    def reset(self, aside: Path | None = None) -> Regcache:
        """Stop, forget every cached byte, start again: the next pull is cold. With ``aside``,
        the old tree is moved there rather than removed (``forget``)."""
        self.stop()
        forget(self.data_dir, aside)
        return self.start()

    def pids(self) -> list[int]:
        """The serving process and every process in its group."""
        if self._proc is None:
            return []
        group = os.getpgid(self._proc.pid)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == group:
                        found.append(int(entry))
                except ProcessLookupError:
                    continue
        return found

    def blob_file(self, digest: str) -> Path:
        algorithm, hex_ = digest.split(":", 1)
        return self.data_dir / "blobs" / algorithm / hex_[:2] / hex_


class Distribution:
    """The distribution registry, as a pull-through proxy of ``remote`` or on its own."""

    def __init__(self, workdir: Path, *, proxy_of: str | None = None, count: bool = False, storage: Path | None = None):
        self.workdir = workdir
        extra = {"storage": {"filesystem": {"rootdirectory": str(storage)}}} if storage is not None else None
        self.registry = Registry(workdir, proxy_remote_url=proxy_of, count_requests=count, extra_config=extra)

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def url(self) -> str:
        return self.registry.url

    def start(self) -> Distribution:
        self.registry.start()
        return self

    def stop(self) -> None:
        self.registry.stop()

    def pids(self) -> list[int]:
        pid = self.registry.pid
        return [] if pid is None else [pid]

    def reset(self, aside: Path | None = None) -> Distribution:
        """A proxy's cache emptied (same port): the next pull through it is cold. With
        ``aside``, the old tree is moved there rather than removed (``forget``)."""
        self.registry.stop()
        forget(self.registry.storage_dir, aside)
        self.registry.start()
        return self


_NGINX_CONF = """
{user}worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {host}:{port} reuseport;
        root {root};
        location /wan/ {{
            alias {wan_root}/;
        }}
    }}
    server {{
        # A WAN link in front of an upstream: every response paced to {rate} bytes/s.
        listen {host}:{throttle_port};
        location / {{
            proxy_pass {throttle_to};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # Buffered in memory only (no temp file), sent on at the link's pace.
            proxy_buffering on;
            proxy_max_temp_file_size 0;
            limit_rate {rate};
        }}
    }}
}}
"""


class Floor:
    """``bench.floor``: the bare verifying relay, what the design costs without regcache's code."""

    def __init__(self, workdir: Path, upstream_url: str, *, direct: bool = False, send_from: str = "memory") -> None:
        self.workdir = workdir
        self.upstream_url = upstream_url
        self.direct = direct
        self.send_from = send_from
        self.spool = workdir / "spool"
        self.log_path = workdir / "floor.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Floor:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.floor", "--listen", f"{HOST}:{self.port}",
                   "--upstream", self.upstream_url, "--spool", str(self.spool), "--send-from", self.send_from]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command + (["--direct"] if self.direct else []), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait("the bare relay", self._proc, self.port, self.log_path)
        return self

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None

    def pids(self) -> list[int]:
        return [] if self._proc is None else [self._proc.pid]

    def reset(self, aside: Path | None = None) -> Floor:
        self.stop()
        forget(self.spool, aside)
        return self.start()


class Nginx:
    """nginx serving ``root`` as static files (the hardware limit), plus a paced relay."""

    def __init__(self, workdir: Path, root: Path, wan_root: Path, throttle_to: str, rate: int) -> None:
        self.workdir = workdir
        self.root = root
        self.wan_root = wan_root
        self.throttle_to = throttle_to
        self.rate = rate
        self.port = free_port()
        self.throttle_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def throttle_url(self) -> str:
        return f"http://{HOST}:{self.throttle_port}"

    def start(self) -> Nginx:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            _NGINX_CONF.format(
                user="user root;\n" if os.geteuid() == 0 else "",  # work dirs are private (0700)
                workers=os.cpu_count() or 1,
                dir=self.workdir,
                host=HOST,
                port=self.port,
                throttle_port=self.throttle_port,
                root=self.root,
                wan_root=self.wan_root,
                throttle_to=self.throttle_to,
                rate=self.rate,
            )
        )
        log = self.workdir / "error.log"
        self._proc = subprocess.Popen(
            ["nginx", "-p", str(self.workdir), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            start_new_session=True,
        )
        _wait("nginx", self._proc, self.port, log, path="/")
        return self

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None
