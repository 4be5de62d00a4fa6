"""Real container clients as test peers: dockerd, containerd (``ctr``) and podman.

Each runs privately: its own state directories, sockets and configuration, nothing shared with a
system daemon. dockerd and podman fall back to the real Docker Hub when a mirror fails, so they run
inside a network namespace that has only loopback (``Netns``): a fallback fails at once and no
packet leaves the machine. containerd never falls back if its hosts.toml ``server`` is a closed
loopback port, so it runs in the test's own namespace.

The namespace is entered with ``nsenter --net=`` rather than ``ip netns exec``: the latter also
remounts ``/sys``, which hides the cgroup mounts dockerd needs ("Devices cgroup isn't mounted").

regcache and the upstream registries run in the test's namespace (so their request counters and
the test see them directly). ``NetnsForwarder`` makes chosen loopback ports reachable from inside
the namespace: it holds a listening socket created in the namespace and relays each connection to
the same port on the test's loopback. One process may own sockets in two namespaces; only the
thread that creates a socket has to be in the right one when it does.

``hosts_toml`` is the containerd mirror configuration format documented in the README.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .regcache import RegcacheProcess
from .registry import HOST, free_port, pump

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"  # the CLI that ships with Debian's dockerd, not a newer one on PATH
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class DaemonError(RuntimeError):
    pass


def closed_port() -> int:
    """A loopback port nothing listens on (a moment ago): connections to it are refused."""
    return free_port()


def _run(
    args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=dict(env) if env is not None else None
    )


def _wait_for(what: str, ready: Any, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DaemonError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise DaemonError(f"{what} not ready after {timeout}s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path, size: int = 6000) -> str:
    return log.read_text(errors="replace")[-size:] if log.exists() else ""


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _unmount_below(root: Path) -> None:
    """Lazy-unmount whatever a daemon left mounted under ``root`` (deepest first). Rounds:
    a mount point can hold a stack (podman's overlay driver binds its home onto itself
    on each run)."""
    prefix = str(root.resolve()) + "/"
    for _ in range(10):
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


# --------------------------------------------------------------------------- network namespace


class Netns:
    """A named network namespace with only loopback, up."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"regcache-{secrets.token_hex(4)}"
        self.path = Path("/run/netns") / self.name

    def create(self) -> Netns:
        for args in (["ip", "netns", "add", self.name], ["ip", "-n", self.name, "link", "set", "lo", "up"]):
            done = _run(args, timeout=30)
            if done.returncode != 0:
                raise DaemonError(f"{' '.join(args)}: {done.stderr.strip()}")
        return self

    def wrap(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside this namespace (mounts, cgroups and /sys stay the host's)."""
        return ["nsenter", f"--net={self.path}", *args]

    def delete(self) -> None:
        _run(["ip", "netns", "delete", self.name], timeout=30)


def listen_in_netns(netns: Netns, port: int, host: str = HOST) -> socket.socket:
    """A listening TCP socket bound inside ``netns``.

    Made by a short-lived thread that moves itself into the namespace first: setns(CLONE_NEWNET)
    affects only the calling thread, and a socket keeps the namespace it was created in.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(netns.path, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns.path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
            outcome["socket"] = sock
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name=f"netns-listen-{port}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["socket"]


class NetnsForwarder:
    """Relays ``127.0.0.1:PORT`` inside a namespace to ``127.0.0.1:PORT`` outside it."""

    def __init__(self, netns: Netns) -> None:
        self.netns = netns
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"forward-{netns.name}", daemon=True)
        self._thread.start()
        self._servers: dict[int, asyncio.Server] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def forward(self, port: int) -> None:
        if port in self._servers:
            return
        sock = listen_in_netns(self.netns, port)
        self._servers[port] = self._call(self._serve(sock, port))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _serve(self, sock: socket.socket, port: int) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay(reader, writer, port)

        return await asyncio.start_server(handle, sock=sock)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, port: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            try:
                target_r, target_w = await asyncio.open_connection(HOST, port)
            except OSError:
                return  # nothing listens outside: the client sees the connection close
            try:
                await asyncio.gather(pump(client_r, target_w, pass_eof=True), pump(target_r, client_w, pass_eof=True))
            finally:
                target_w.close()
        except asyncio.CancelledError:
            pass
        finally:
            client_w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    def close(self) -> None:
        async def shutdown() -> None:
            for server in self._servers.values():
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._loop.is_running():
            self._call(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# --------------------------------------------------------------------------- regcache


class RegcacheServer(RegcacheProcess):
    """``regcache serve`` as a subprocess on loopback, configured from a settings mapping."""

    def __init__(self, workdir: Path, upstreams: Sequence[Mapping[str, Any]], **settings: Any) -> None:
        super().__init__(workdir, [dict(u) for u in upstreams], settings=settings)


# --------------------------------------------------------------------------- dockerd


class _Daemon:
    """A daemon process with its log file and a short private run directory, stopped with its mounts."""

    NAME = "daemon"
    STOP_TIMEOUT = 20.0

    def __init__(self, workdir: Path, run_prefix: str) -> None:
        self.workdir = Path(workdir)
        # Unix socket paths are limited to 108 bytes; pytest's temp paths can be long.
        self.run_dir = Path(tempfile.mkdtemp(prefix=run_prefix, dir="/tmp"))
        self.log_path = self.workdir / f"{self.NAME}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], ready: Any, timeout: float) -> None:
        """Start ``args`` with output to the log; return once ``ready()``, or stop and raise."""
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_for(self.NAME, ready, self._proc, self.log_path, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _terminate(self._proc, timeout=self.STOP_TIMEOUT)
        self._proc = None
        _unmount_below(self.workdir)
        _unmount_below(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def log_text(self) -> str:
        return _tail(self.log_path)


class Dockerd(_Daemon):
    """A private dockerd (vfs, no iptables, no bridge) inside ``netns``, driven by Debian's CLI."""

    NAME = "dockerd"
    STOP_TIMEOUT = 30.0

    def __init__(self, workdir: Path, netns: Netns, daemon_json: Mapping[str, Any]) -> None:
        super().__init__(workdir, "rcd-")
        self.netns = netns
        self.daemon_json = dict(daemon_json)
        self.socket = self.run_dir / "docker.sock"

    def start(self) -> Dockerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "daemon.json"
        config.write_text(json.dumps(self.daemon_json, indent=2))
        args = self.netns.wrap(
            [
                "dockerd",
                "--config-file", str(config),
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--data-root", str(self.workdir / "data"),
                "--exec-root", str(self.run_dir / "exec"),
                "--pidfile", str(self.run_dir / "docker.pid"),
                "-H", f"unix://{self.socket}",
            ]
        )
        self._spawn(args, self._answers, 60)
        return self

    def _answers(self) -> bool:
        return self.socket.exists() and self.docker("version", timeout=10).returncode == 0

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.run_dir),
            "DOCKER_HOST": f"unix://{self.socket}",
        }
        return _run([DOCKER, *args], timeout=timeout, env=env)

    def image_id(self, reference: str) -> str:
        done = self.docker("image", "inspect", "--format", "{{.Id}}", reference, timeout=30)
        if done.returncode != 0:
            raise DaemonError(f"docker image inspect {reference}: {done.stderr.strip()}")
        return done.stdout.strip()


# --------------------------------------------------------------------------- containerd


def hosts_toml(mirror_url: str, *, server: str | None = None, capabilities: Sequence[str] = ("pull", "resolve")) -> str:
    """A containerd ``hosts.toml`` that pulls one registry through a regcache mirror.

    It lives at ``<hosts dir>/<registry>/hosts.toml`` (``/etc/containerd/certs.d/docker.io/hosts.toml``
    by default). containerd tries the ``[host]`` entries in order and the ``server`` last; it adds
    ``?ns=<registry>`` to every request sent to a host, which is how one regcache endpoint serves
    many registries. ``server`` is the registry's own address (the fallback when the mirror fails);
    tests point it at a closed loopback port so a failing mirror never reaches the internet.
    """
    lines = []
    if server is not None:
        lines.append(f'server = "{server}"')
        lines.append("")
    caps = ", ".join(f'"{c}"' for c in capabilities)
    lines.append(f'[host."{mirror_url}"]')
    lines.append(f"  capabilities = [{caps}]")
    return "\n".join(lines) + "\n"


def write_hosts_dir(directory: Path, mirror_url: str, registries: Sequence[str], *, server: str | None) -> Path:
    """One ``<registry>/hosts.toml`` per registry, all pointing at ``mirror_url``."""
    for registry in registries:
        (directory / registry).mkdir(parents=True, exist_ok=True)
        (directory / registry / "hosts.toml").write_text(hosts_toml(mirror_url, server=server))
    return directory


class Containerd(_Daemon):
    """A private containerd (CRI off, native snapshotter) driven with ``ctr``."""

    NAME = "containerd"
    NAMESPACE = "regcache-test"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "rcc-")
        self.socket = self.run_dir / "containerd.sock"

    def start(self) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.workdir / "root"}"',
                    f'state = "{self.run_dir / "state"}"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.socket}"',
                    "[ttrpc]",
                    f'  address = "{self.run_dir / "ttrpc.sock"}"',
                    "[debug]",
                    '  address = ""',
                    "[metrics]",
                    '  address = ""',
                    '[plugins."io.containerd.internal.v1.opt"]',
                    f'  path = "{self.workdir / "opt"}"',
                    "",
                ]
            )
        )
        self._spawn(["containerd", "--config", str(config)], self._answers, 30)
        return self

    def _answers(self) -> bool:
        return self.socket.exists() and self.ctr("version", timeout=10).returncode == 0

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run(["ctr", "--address", str(self.socket), "--namespace", self.NAMESPACE, *args], timeout=timeout)

    def pull(
        self, reference: str, hosts_dir: Path, *extra: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native", *extra, reference,
                        timeout=timeout)

    def remove_image(self, reference: str) -> None:
        """Forget the image and (after a synchronous GC) its content, so the next pull fetches it all."""
        self.ctr("images", "rm", "--sync", reference, timeout=60)

    def image_digest(self, reference: str) -> str | None:
        done = self.ctr("images", "ls", timeout=30)
        for line in done.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return next((f for f in fields if f.startswith("sha256:")), None)
        return None


# --------------------------------------------------------------------------- podman


def registries_conf(mirrors: Mapping[str, str]) -> str:
    """A ``registries.conf`` (v2) sending each registry (``docker.io``) to its mirror location.

    A mirror location may carry a path: ``127.0.0.1:5000/ghcr.io`` makes podman ask regcache for
    ``/v2/ghcr.io/<name>/...``, which regcache routes by that first path component.
    """
    parts = ['short-name-mode = "permissive"', 'unqualified-search-registries = ["docker.io"]', ""]
    for prefix, location in mirrors.items():
        parts += [
            "[[registry]]",
            f'prefix = "{prefix}"',
            f'location = "{prefix}"',
            "[[registry.mirror]]",
            f'location = "{location}"',
            "insecure = true",
            "",
        ]
    return "\n".join(parts)


class Podman:
    """Rootful podman with private storage (vfs), run inside ``netns``.

    ``partial_pulls``: the overlay driver with zstd:chunked partial pulls enabled in its
    storage.conf, as containers-storage.conf(5) documents them (``pull_options``)."""

    def __init__(self, workdir: Path, netns: Netns, mirrors: Mapping[str, str], *, partial_pulls: bool = False) -> None:
        self.workdir = Path(workdir)
        self.netns = netns
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="rcp-", dir="/tmp"))
        self.registries_conf = self.workdir / "registries.conf"
        self.registries_conf.write_text(registries_conf(mirrors))
        self.containers_conf = self.workdir / "containers.conf"
        self.containers_conf.write_text('[engine]\nevents_logger = "file"\n')
        self.storage_driver = "overlay" if partial_pulls else "vfs"
        self.storage_conf = self.workdir / "storage.conf"
        options = ('[storage.options]\npull_options = {enable_partial_images = "true", '
                   'use_hard_links = "false", ostree_repos = ""}\n') if partial_pulls else ""
        self.storage_conf.write_text(
            f'[storage]\ndriver = "{self.storage_driver}"\ngraphroot = "{self.workdir / "root"}"\n'
            f'runroot = "{self.run_dir / "runroot"}"\n{options}')

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.run_dir),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_CONF": str(self.containers_conf),
            "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
            "XDG_RUNTIME_DIR": str(self.run_dir),
        }
        base = [
            "podman",
            "--root", str(self.workdir / "root"),
            "--runroot", str(self.run_dir / "runroot"),
            "--tmpdir", str(self.run_dir / "tmp"),
            "--storage-driver", self.storage_driver,
            "--cgroup-manager", "cgroupfs",
        ]
        return _run(self.netns.wrap([*base, *args]), timeout=timeout, env=env)

    def image_id(self, reference: str) -> str:
        done = self.podman("image", "inspect", "--format", "{{.Id}}", reference, timeout=30)
        if done.returncode != 0:
            raise DaemonError(f"podman image inspect {reference}: {done.stderr.strip()}")
        return done.stdout.strip()

    def close(self) -> None:
        # A container's cleanup (conmon runs ``podman container cleanup``) can outlive
        # ``podman run`` and mount the overlay driver's home again: wait for it first.
        _wait_gone(str(self.workdir / "root"), timeout=30)
        _unmount_below(self.workdir)
        _unmount_below(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _wait_gone(marker: str, timeout: float) -> None:
    """Wait (bounded) until no process has ``marker`` in its command line."""
    deadline = time.monotonic() + timeout
    needle = marker.encode()
    while time.monotonic() < deadline:
        alive = False
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    alive = needle in Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if alive:
                    break
        if not alive:
            return
        time.sleep(0.05)
