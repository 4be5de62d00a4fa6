"""regcache as a real process: ``python -m proxy.cli serve`` with a config file.

Real clients (skopeo, daemons) are subprocesses too, so a separate server
process keeps tests synchronous and exercises the real command line, signal
handling and crash recovery.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.registry import free_port

ROOT = Path(__file__).resolve().parents[2]


class RegcacheError(RuntimeError):
    pass


class RegcacheProcess:
    def __init__(
        self,
        workdir: Path,
        upstreams: list[dict[str, Any]],
        *,
        settings: dict[str, Any] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.listen_host = host
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "regcache.yaml"
        self.log_path = self.workdir / "regcache.log"
        config: dict[str, Any] = {
            "listen": f"{host}:{self.port}",
            "data_dir": str(self.data_dir),
            "upstreams": upstreams,
            "log": {"level": "info", "format": "json"},
        }
        for key, value in (settings or {}).items():
            config[key] = value
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.listen_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self, timeout: float = 20.0) -> RegcacheProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a test's Ctrl-C does not reach it before its own teardown
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RegcacheError(f"regcache exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        self.kill()
        raise RegcacheError(f"regcache did not answer within {timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (graceful shutdown)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, for recovery tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> list[dict[str, Any]]:
        """The access-log entries (one JSON object per request) written so far."""
        entries = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and "method" in entry and "logger" not in entry:
                    entries.append(entry)
        return entries

    def stored_blobs(self) -> set[str]:
        """``sha256:<hex>`` of every blob file in the store."""
        return {f"sha256:{p.name}" for p in (self.data_dir / "blobs").rglob("*") if p.is_file()}

    def __enter__(self) -> RegcacheProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
