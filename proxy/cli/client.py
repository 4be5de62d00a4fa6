"""The CLI's side of the admin API: one small HTTP client with the admin token.

The token comes from ``REGCACHE_ADMIN_TOKEN`` or ``--token-file``, never from
a command-line argument (it would show in ``ps``). Every failure becomes an
``AdminClientError`` whose message is the one line the CLI prints.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

DEFAULT_SERVER = "http://127.0.0.1:5000"
TOKEN_ENV = "REGCACHE_ADMIN_TOKEN"
SERVER_ENV = "REGCACHE_SERVER"


class AdminClientError(Exception):
    """One line for stderr."""


def resolve_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise AdminClientError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise AdminClientError(f"token file {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise AdminClientError(f"no admin token: set {TOKEN_ENV} or pass --token-file")
    return token


def _message(body: bytes, status: int) -> str:
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        return str(first.get("message") or first.get("code"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return text[0][:200] if text else f"HTTP {status}"


class AdminClient:
    def __init__(self, server: str, token: str, timeout: float = 3600.0) -> None:
        self.server = server.rstrip("/")
        self._token = token
        self.timeout = timeout

    def _open(
        self, method: str, path: str, query: list[tuple[str, str]] | None = None, body: Any = None
    ) -> HTTPResponse:
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return self.open_raw(method, path, query, data, headers)

    def open_raw(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None,
        data: bytes | Iterable[bytes] | None,
        headers: dict[str, str],
    ) -> HTTPResponse:
        """A request with any body (a file or a stream for load); the response is not read."""
        url = f"{self.server}/admin/{path}"
        if query:
            url += "?" + urlencode(query)
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Authorization": f"Bearer {self._token}", **headers}
        )
        try:
            # typeshed types urlopen's answer as Any; for an http(s) URL it is an HTTPResponse.
            response: HTTPResponse = urllib.request.urlopen(request, timeout=self.timeout)
            return response
        except urllib.error.HTTPError as exc:
            message = _message(exc.read(), exc.code)
            if exc.code == 401:
                raise AdminClientError(f"unauthorized: {message}") from None
            if exc.code == 404 and message in ("Not Found", "NOT_FOUND"):
                raise AdminClientError(f"{self.server} has no admin API (is admin.token set there?)") from None
            raise AdminClientError(f"Error response from daemon: {message}") from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
            raise AdminClientError(f"cannot reach {self.server}: {reason}") from None
        except OSError as exc:
            raise AdminClientError(f"cannot reach {self.server}: {exc}") from None

    def call(self, method: str, path: str, query: list[tuple[str, str]] | None = None, body: Any = None) -> Any:
        with self._open(method, path, query, body) as resp:
            raw = resp.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise AdminClientError(f"{self.server} answered with something other than JSON") from None

    def lines(
        self, method: str, path: str, query: list[tuple[str, str]] | None = None, body: Any = None
    ) -> Iterator[dict[str, Any]]:
        """A streamed answer of JSON lines (progress), each as it arrives."""
        try:
            with self._open(method, path, query, body) as resp:
                for raw in resp:
                    raw = raw.strip()
                    if raw:
                        yield json.loads(raw)
        except ValueError:
            raise AdminClientError(f"{self.server} sent a progress line that is not JSON") from None
        except (ConnectionError, TimeoutError) as exc:
            raise AdminClientError(f"connection to {self.server} lost: {exc}") from None
