"""A real distribution registry (Debian ``docker-registry`` 2.8) as a test peer.

``Registry`` runs ``docker-registry serve CONFIG`` on loopback with its own storage directory and
can stop and start again with the same storage and the same port, so a test can take the upstream
away and bring it back.

Request counting: by default the registry listens on a private port and a small HTTP-aware relay
(`_CountingFront`, asyncio in a background thread) owns the public port. The relay parses only
the client->registry direction, enough to find where each request starts (request line, headers,
Content-Length or chunked body), records ``(method, path)`` when the request head arrives and
forwards the bytes untouched; responses flow back as an opaque byte stream. A request is therefore
recorded before the registry even sees it, so by the time any client has a response, the count is
final: no log parsing, no waiting, no race. (The access log was the alternative, but distribution
writes it after the handler returns, so a client can hold the full response before the line
exists.) ``count_requests=False`` binds the registry straight to the public port, for benchmarks.

With TLS and counting, the relay terminates TLS and tells the registry ``X-Forwarded-Proto:
https`` so the upload ``Location`` URLs it builds still say https; without counting the registry
serves TLS itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
REGISTRY_BINARY = "docker-registry"

Creds = tuple[str, str]


class RegistryError(RuntimeError):
    pass


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port that was free a moment ago. Racy by nature; callers retry on a bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def bcrypt_hash(password: str, cost: int = 4) -> str:
    """A bcrypt hash for an htpasswd file, which is the only format distribution accepts.

    Uses libxcrypt (Debian's libcrypt.so.1 supports ``$2b$``) through ctypes, falling back to
    the ``bcrypt`` package; Python's ``crypt`` module is deprecated and gone in 3.13. The
    minimum cost keeps the registry's per-request password check cheap.
    """
    libname = ctypes.util.find_library("crypt")
    if libname:
        lib = ctypes.CDLL(libname)
        lib.crypt_gensalt.restype = ctypes.c_char_p
        lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
        lib.crypt.restype = ctypes.c_char_p
        lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        salt = lib.crypt_gensalt(b"$2b$", cost, None, 0)
        if salt:
            hashed = lib.crypt(password.encode(), salt)
            if hashed and hashed.startswith(b"$2"):
                return str(hashed.decode())
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        raise RegistryError("no bcrypt implementation: need libcrypt (libxcrypt) or the bcrypt package") from None
    return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode())


@dataclass(frozen=True)
class TLSFiles:
    certificate: Path
    key: Path
    ca_certificate: Path
    ca_dir: Path  # holds ca.crt only: pass as skopeo --cert-dir to verify for real


def make_tls_files(directory: str | os.PathLike[str]) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost (via trustme)."""
    import trustme

    root = Path(directory)
    (root / "ca").mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "localhost")
    files = TLSFiles(root / "server.crt", root / "server.key", root / "ca.crt", root / "ca")
    cert.cert_chain_pems[0].write_to_path(str(files.certificate))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(files.certificate), append=True)
    cert.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca_certificate))
    ca.cert_pem.write_to_path(str(files.ca_dir / "ca.crt"))
    return files


@dataclass(frozen=True)
class RequestRecord:
    method: str
    target: str  # the request-target exactly as sent (path and query)
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return next(iter(self.header_values(name)), None)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``: clients such as skopeo send several Accept lines."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


# --------------------------------------------------------------------------- counting relay


RELAY_CHUNK = 256 * 1024


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, pass_eof: bool = False) -> None:
    """Copy ``reader`` to ``writer`` until EOF or a broken connection; ``pass_eof`` half-closes
    ``writer`` at the end (HTTP clients may wait for it)."""
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if pass_eof and writer.can_write_eof():
            writer.write_eof()


class _Sink:
    """Where a silent relay "forwards" requests: nowhere."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


class _CountingFront:
    """The HTTP-aware relay on the public port; see the module docstring for why it exists.

    ``silence()`` makes it fail the way a registry behind a broken load balancer or a
    black-holed route does: connections are accepted, requests are read (and counted),
    nothing is answered, and connections already open go silent too. ``speak()`` ends
    that; the connections held silent are then closed.
    """

    _HEAD_LIMIT = 1024 * 1024

    def __init__(self, port: int, ssl_context: ssl.SSLContext | None, records: list[RequestRecord]) -> None:
        self.port = port
        self._ssl = ssl_context
        self._records = records
        self._lock = threading.Lock()
        self._backend_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._speaking: asyncio.Event | None = None  # made on the relay's loop
        self.connections = 0

    # The records list is shared with Registry, which reads it from the test's thread.
    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._records.append(rec)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def start(self, backend_port: int) -> None:
        self._backend_port = backend_port
        self._tasks = set()  # tasks belong to one loop; a restarted front has a new one
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"registry-front-{self.port}", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])

    def silence(self) -> None:
        self._on_loop(self._silence)

    def speak(self) -> None:
        self._on_loop(self._speak)

    def _on_loop(self, action: Any) -> None:
        assert self._loop is not None

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def _silence(self) -> None:
        assert self._speaking is not None
        self._speaking.clear()
        for pipe in list(self._pipes):
            pipe.cancel()

    def _speak(self) -> None:
        assert self._speaking is not None
        self._speaking.set()

    async def _listen(self) -> asyncio.Server:
        self._speaking = asyncio.Event()
        self._speaking.set()
        return await asyncio.start_server(
            self._handle, HOST, self.port, ssl=self._ssl, limit=self._HEAD_LIMIT, reuse_address=True
        )

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None
        self._server = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        with self._lock:
            self.connections += 1
        speaking = self._speaking
        assert speaking is not None
        upstream_w: asyncio.StreamWriter | None = None
        pipes: list[asyncio.Task[None]] = []
        try:
            if speaking.is_set():
                try:
                    upstream_r, upstream_w = await asyncio.open_connection(HOST, self._backend_port)
                except OSError:
                    return  # registry not there: the client sees the connection close
                back = asyncio.create_task(pump(upstream_r, client_w))
                forth = asyncio.create_task(self._forward_requests(client_r, upstream_w))
                pipes = [back, forth]
                self._pipes.update(pipes)  # silence() cancels them
                done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                if forth in done and not back.done():
                    # Client finished sending (EOF): let the registry complete the last response.
                    with contextlib.suppress(OSError, RuntimeError):
                        if upstream_w.can_write_eof():
                            upstream_w.write_eof()
                    await asyncio.wait([back])
            if not speaking.is_set():
                # Silent: requests are still read and counted, never answered.
                listen = asyncio.create_task(self._forward_requests(client_r, _Sink()))  # type: ignore[arg-type]
                pipes.append(listen)
                await speaking.wait()
        except asyncio.CancelledError:
            pass  # only _shutdown cancels us; re-raising would make asyncio log a traceback
        finally:
            try:
                for pipe in pipes:
                    pipe.cancel()
                    self._pipes.discard(pipe)
                # A second cancel (shutdown) may interrupt this wait: the task is
                # forgotten all the same, or a later shutdown would wait on it.
                await asyncio.gather(*pipes, return_exceptions=True)
            finally:
                for w in (client_w, upstream_w):
                    if w is not None:
                        w.close()
                self._tasks.discard(task)  # type: ignore[arg-type]

    async def _forward_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            first = await reader.read(1)
            if not first:
                return
            if not (first.isalpha() or first in b"\r\n"):
                # Not HTTP: typically skopeo/containerd probing for TLS on a plain registry. Hand
                # it over untouched so the registry rejects it at once, as it would without us;
                # waiting for a request head here would stall the client until its TLS timeout.
                writer.write(first)
                await pump(reader, writer)
                return
            pending = first
            while True:
                try:
                    head = pending + await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    writer.write(pending + exc.partial)  # let the registry answer whatever that was
                    return
                except asyncio.LimitOverrunError:
                    return  # a head over 1 MiB is not something our clients send
                pending = b""
                head = head.lstrip(b"\r\n")  # tolerate stray CRLFs between requests (RFC 9112 2.2)
                lines = head[:-4].decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) != 3:
                    writer.write(head)
                    await pump(reader, writer)
                    return
                method, target, _version = parts
                headers = tuple(
                    (name.strip(), value.strip())
                    for name, sep, value in (line.partition(":") for line in lines[1:])
                    if sep
                )
                self.record(RequestRecord(method, target, headers))
                if self._ssl is not None:
                    head = head[:-2] + b"X-Forwarded-Proto: https\r\n\r\n"
                writer.write(head)
                lowered = {name.lower(): value for name, value in headers}
                if "chunked" in lowered.get("transfer-encoding", "").lower():
                    await self._relay_chunked(reader, writer)
                elif (length := lowered.get("content-length")) is not None:
                    await self._relay_exactly(reader, writer, int(length))
                await writer.drain()

    async def _relay_exactly(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
        while size > 0:
            data = await reader.read(min(RELAY_CHUNK, size))
            if not data:
                raise asyncio.IncompleteReadError(b"", size)
            writer.write(data)
            size -= len(data)
            await writer.drain()

    async def _relay_chunked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    writer.write(trailer)
                writer.write(b"\r\n")
                return
            await self._relay_exactly(reader, writer, size + 2)  # data plus its CRLF


# --------------------------------------------------------------------------- the registry


class Registry:
    """One distribution registry process with a storage directory that survives restarts."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        count_requests: bool = True,
        proxy_remote_url: str | None = None,
        proxy_credentials: Creds | None = None,
        tls: TLSFiles | tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        htpasswd: Mapping[str, str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        binary: str = REGISTRY_BINARY,
        startup_timeout: float = 30.0,
    ) -> None:
        """``htpasswd`` maps user -> password; ``proxy_remote_url`` runs distribution as a
        pull-through cache of that registry; ``extra_config`` is deep-merged into the config
        (a None value removes the key: ``{"storage": {"filesystem": None, "s3": {...}}}``,
        as distribution refuses a config naming two storage drivers)."""
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="regcache-registry-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.count_requests = count_requests
        self.proxy_remote_url = proxy_remote_url
        self.proxy_credentials = proxy_credentials
        if isinstance(tls, tuple):
            self.tls_cert: Path | None = Path(tls[0])
            self.tls_key: Path | None = Path(tls[1])
        else:
            self.tls_cert = tls.certificate if tls else None
            self.tls_key = tls.key if tls else None
        self.users = dict(htpasswd or {})
        self.extra_config = dict(extra_config or {})
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.port = port or 0
        self._secret = secrets.token_hex(16)  # fixed per instance so uploads survive a restart
        self._records: list[RequestRecord] = []
        self._front: _CountingFront | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._backend_port = 0

    # ---------------------------------------------------------------- addresses

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as used in image references."""
        return f"{HOST}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def credentials(self) -> Creds | None:
        """The first htpasswd user and password, or None when auth is off."""
        return next(iter(self.users.items()), None)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The registry process's id while it runs (benchmarks read its CPU time)."""
        return self._proc.pid if self.running and self._proc is not None else None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Registry:
        """Start (or restart after ``stop``) with the same storage, port and secret."""
        if self.running:
            return self
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.count_requests and self._front is None:
            self._front = _CountingFront(self.port, self._front_ssl_context(), self._records)
        last_error: Exception | None = None
        # The backend port comes from free_port(), which can lose a race; try a few.
        for _ in range(5):
            self._backend_port = free_port() if self.count_requests else (self.port or free_port())
            try:
                self._spawn()
                break
            except _AddressInUse as exc:
                last_error = exc
                if not self.count_requests and self.port:
                    raise RegistryError(f"port {self.port} is taken") from exc
        else:
            raise RegistryError("could not find a free port for the registry") from last_error
        if self._front is not None:
            try:
                self._front.start(self._backend_port)
            except BaseException:
                self._terminate()
                raise
            self.port = self._front.port
        else:
            self.port = self._backend_port
        return self

    def stop(self) -> None:
        """Stop serving: afterwards connections to ``port`` are refused. Storage is kept."""
        if self._front is not None:
            self._front.stop()
        self._terminate()

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the work directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _front_ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls_cert or not self.tls_key:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        ctx.set_alpn_protocols(["http/1.1"])  # the relay speaks HTTP/1.1 framing only
        return ctx

    def config(self) -> dict[str, Any]:
        http_cfg: dict[str, Any] = {
            "addr": f"{HOST}:{self._backend_port}",
            "secret": self._secret,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls_cert and not self.count_requests:
            http_cfg["tls"] = {"certificate": str(self.tls_cert), "key": str(self.tls_key)}
        cfg: dict[str, Any] = {
            "version": 0.1,
            # The access log is off because the relay counts requests; app logs help debugging.
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # Background purging would touch storage at unpredictable times.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http_cfg,
        }
        if self.users:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text("".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in self.users.items()))
            cfg["auth"] = {"htpasswd": {"realm": "regcache-test", "path": str(htpasswd)}}
        if self.proxy_remote_url:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote_url}
            if self.proxy_credentials:
                proxy["username"], proxy["password"] = self.proxy_credentials
            cfg["proxy"] = proxy
        return _deep_merge(cfg, self.extra_config)

    def _spawn(self) -> None:
        # JSON is YAML, so no YAML writer is needed.
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        # distribution maps REGISTRY_* variables onto its config (REGISTRY_AUTH_FILE, set for
        # skopeo, would become an unknown auth backend), so the child gets none of them; nor
        # AWS_*: its s3 driver takes its settings from the config, and an AWS_CA_BUNDLE in the
        # environment makes it panic at start ("unable to load custom CA bundle").
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "AWS_"))}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C on pytest must not kill it before teardown runs
            )
        try:
            self._wait_ready(offset)
        except BaseException:
            self._terminate()
            raise

    def _wait_ready(self, log_offset: int) -> None:
        """Poll ``/v2/`` on the registry's own port until it answers (any status: 401 is fine)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                output = self._log_since(log_offset)
                if "address already in use" in output:
                    raise _AddressInUse(output)
                raise RegistryError(f"docker-registry exited with {self._proc.returncode}:\n{output}")
            try:
                conn = self._connection(self._backend_port, direct=True, timeout=2)
                try:
                    conn.request("GET", "/v2/")
                    conn.getresponse().read()
                    return
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise RegistryError(f"docker-registry did not answer /v2/ in time:\n{self._log_since(log_offset)}")
            time.sleep(0.05)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")[-8000:]

    def log_text(self) -> str:
        """Everything the registry printed (across restarts), for failure messages."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---------------------------------------------------------------- request counting

    def _require_front(self) -> _CountingFront:
        if self._front is None:
            raise RegistryError("this registry was created with count_requests=False")
        return self._front

    def request_log(self) -> list[RequestRecord]:
        """Every request received since the last reset, in arrival order, with headers."""
        return self._require_front().snapshot()

    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request received since the last reset (query removed)."""
        return [(r.method, r.path) for r in self.request_log()]

    def reset_requests(self) -> None:
        self._require_front().clear()

    def hang(self) -> None:
        """From now on accept connections, read requests (counted) and answer nothing, on
        connections already open too: a registry behind a broken load balancer."""
        self._require_front().silence()

    def answer_again(self) -> None:
        """End ``hang()``: new connections are served; those held silent are closed."""
        self._require_front().speak()

    def connections(self) -> int:
        """Connections the relay accepted since it started."""
        return self._require_front().connections

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return sum(1 for m, p in self.requests() if (method is None or m == method) and (path is None or p == path))

    def blob_gets(self, digest: str, repository: str | None = None) -> int:
        """How many ``GET /v2/<repository>/blobs/<digest>`` arrived (any repository if None)."""
        return self._count_object("GET", "blobs", digest, repository)

    def blob_heads(self, digest: str, repository: str | None = None) -> int:
        return self._count_object("HEAD", "blobs", digest, repository)

    def manifest_requests(self, reference: str, repository: str | None = None, method: str = "GET") -> int:
        """How many ``METHOD /v2/<repository>/manifests/<reference>`` arrived (tag or digest)."""
        return self._count_object(method, "manifests", reference, repository)

    def _count_object(self, method: str, kind: str, reference: str, repository: str | None) -> int:
        suffix = f"/{kind}/{reference}"
        total = 0
        for m, p in self.requests():
            if m != method or not p.startswith("/v2/") or not p.endswith(suffix):
                continue
            if repository is None or p == f"/v2/{repository}{suffix}":
                total += 1
        return total

    # ---------------------------------------------------------------- plain HTTP access

    def _connection(self, port: int, *, direct: bool = False, timeout: float = 30) -> http.client.HTTPConnection:
        # Direct connections skip the relay (uncounted); with counting on, the backend is plain HTTP.
        use_tls = bool(self.tls_cert) and not (direct and self.count_requests)
        if use_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(HOST, port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(HOST, port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        auth: bool = True,
        timeout: float = 30,
    ) -> HttpResponse:
        """One HTTP request to the public port (so it is counted), with basic auth if configured."""
        hdrs = dict(headers or {})
        if auth and self.credentials:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            hdrs.setdefault("Authorization", f"Basic {token}")
        conn = self._connection(self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return HttpResponse(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get_blob(self, repository: str, digest: str) -> bytes:
        resp = self.request("GET", f"/v2/{repository}/blobs/{digest}")
        if resp.status != 200:
            raise RegistryError(f"GET blob {repository}@{digest}: {resp.status} {resp.body[:500]!r}")
        return resp.body

    def get_manifest(self, repository: str, reference: str, accept: Sequence[str] = ()) -> HttpResponse:
        """GET a manifest; by default accepts every schema2/OCI type so nothing is converted."""
        types = accept or (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )
        return self.request("GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": ", ".join(types)})


class _AddressInUse(RegistryError):
    pass


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
