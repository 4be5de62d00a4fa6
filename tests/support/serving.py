"""Helpers for tests of the serving layer: the app under the real runner options, metric samples."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from proxy.app import create_app
from proxy.server import runner_kwargs
from tests.support.regcache import ROOT, RegcacheError, RegcacheProcess


async def start_proxy(aiohttp_server, aiohttp_client, settings: Settings, **client_kwargs: Any):  # type: ignore[no-untyped-def]
    """The app behind the same runner options ``regcache serve`` uses (access log, limits)."""
    options = runner_kwargs(settings)
    options.pop("handler_cancellation")  # the test server sets it itself
    server = await aiohttp_server(create_app(settings), **options)
    return await aiohttp_client(server, **client_kwargs)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition; 0 when absent."""
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    return total if found else 0.0


class ServedRegcache(RegcacheProcess):
    """``regcache serve`` that may speak HTTPS or demand credentials: readiness from ``/healthz``."""

    def __init__(self, *args: Any, scheme: str = "http", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheme = scheme

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def get(self, path: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None):  # type: ignore[no-untyped-def]
        """(status, headers, body) of one request; TLS unverified unless ``context`` is given."""
        if context is None and self.scheme == "https":
            context = ssl._create_unverified_context()
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def start(self, timeout: float = 20.0) -> ServedRegcache:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGCACHE_")}
        env.update(self.env)
        env["PYTHONPATH"] = str(ROOT)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RegcacheError(f"regcache exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if self.get("/healthz")[0] == 200:
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RegcacheError(f"regcache did not answer within {timeout}s:\n{self.log_text()[-3000:]}")
