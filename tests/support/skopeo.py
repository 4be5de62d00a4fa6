"""Thin wrappers around skopeo (1.9) for pushing test images and reading them back.

skopeo runs sealed off from this machine's container configuration: an empty auth file (flag and
REGISTRY_AUTH_FILE), an empty registries.conf (no mirrors, no search registries, no
registries.conf.d), an empty registries.d (no signature lookaside), no trust policy
(--insecure-policy), a private HOME and XDG_RUNTIME_DIR, and no proxy variables. So a test can
never pick up someone's credentials or be redirected to the internet by a mirror entry.
Registries are reached with TLS verification off unless a test asks for it; skopeo then tries
HTTPS first and falls back to plain HTTP, which is what our loopback registries speak.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

SKOPEO = "skopeo"
DEFAULT_TIMEOUT = 120.0

Creds = tuple[str, str]


class SkopeoError(RuntimeError):
    """A skopeo run that failed or timed out; the message carries skopeo's stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, stdout: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"skopeo {status}: {' '.join(self.argv)}\n{stderr.strip()}")


_sandbox: Path | None = None


def _sandbox_dir() -> Path:
    """One private config directory per test process, created on first use."""
    global _sandbox
    if _sandbox is None:
        root = Path(tempfile.mkdtemp(prefix="regcache-skopeo-"))
        (root / "auth.json").write_text('{"auths": {}}\n')
        (root / "registries.conf").write_text("unqualified-search-registries = []\n")
        (root / "registries.d").mkdir()
        (root / "home").mkdir()
        (root / "run").mkdir(mode=0o700)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _sandbox = root
    return _sandbox


def authfile() -> Path:
    """The empty auth file every skopeo run uses."""
    return _sandbox_dir() / "auth.json"


def environment() -> dict[str, str]:
    root = _sandbox_dir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
        and not key.startswith(("REGISTRY_", "CONTAINERS_", "DOCKER_"))
    }
    env.update(
        HOME=str(root / "home"),
        XDG_RUNTIME_DIR=str(root / "run"),
        XDG_CONFIG_HOME=str(root / "home" / ".config"),
        REGISTRY_AUTH_FILE=str(root / "auth.json"),
        CONTAINERS_REGISTRIES_CONF=str(root / "registries.conf"),
    )
    return env


def run(args: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run ``skopeo ARGS`` with the sealed configuration; raise SkopeoError on failure."""
    root = _sandbox_dir()
    argv = [
        SKOPEO,
        "--insecure-policy",
        "--registries.d",
        str(root / "registries.d"),
        # skopeo's own deadline fires first, so a hung registry produces skopeo's error message.
        "--command-timeout",
        f"{max(1, int(timeout) - 5)}s",
        *args,
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=environment(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise SkopeoError(argv, None, (exc.stderr or b"").decode(errors="replace")) from None
    if proc.returncode != 0:
        raise SkopeoError(
            argv, proc.returncode, proc.stderr.decode(errors="replace"), proc.stdout.decode(errors="replace")
        )
    return proc


def docker_ref(host: str, repository: str, reference: str) -> str:
    """``docker://HOST/REPO:TAG`` or ``docker://HOST/REPO@sha256:...`` for a tag or a digest."""
    sep = "@" if ":" in reference else ":"
    return f"docker://{host}/{repository}{sep}{reference}"


def _creds_args(prefix: str, creds: Creds | None) -> list[str]:
    if creds is None:
        return [f"--{prefix}no-creds"]
    return [f"--{prefix}creds", f"{creds[0]}:{creds[1]}"]


def _tls_args(prefix: str, tls_verify: bool, cert_dir: str | os.PathLike[str] | None) -> list[str]:
    args = [f"--{prefix}tls-verify={'true' if tls_verify else 'false'}"]
    if cert_dir is not None:
        args += [f"--{prefix}cert-dir", str(cert_dir)]
    return args


def copy(
    src: str,
    dest: str,
    *,
    all_images: bool = True,
    preserve_digests: bool = True,
    src_tls_verify: bool = False,
    dest_tls_verify: bool = False,
    src_creds: Creds | None = None,
    dest_creds: Creds | None = None,
    src_cert_dir: str | os.PathLike[str] | None = None,
    dest_cert_dir: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """``skopeo copy SRC DEST`` (transport-qualified references, e.g. ``oci:DIR:REF``).

    ``preserve_digests`` makes skopeo fail rather than silently rewrite a manifest, which is
    what tests comparing digests need. ``src_creds``/``dest_creds`` only matter for registries.
    """
    args = ["copy", "--retry-times", "0", "--authfile", str(authfile())]
    if all_images:
        args.append("--all")
    if preserve_digests:
        args.append("--preserve-digests")
    args += _tls_args("src-", src_tls_verify, src_cert_dir) + _tls_args("dest-", dest_tls_verify, dest_cert_dir)
    args += _creds_args("src-", src_creds) + _creds_args("dest-", dest_creds)
    run([*args, *extra_args, src, dest], timeout=timeout)


def push_layout(
    layout_dir: str | os.PathLike[str],
    refname: str,
    dest_registry: str,
    repository: str,
    tag: str,
    *,
    creds: Creds | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Push ``oci:LAYOUT_DIR:REFNAME`` (with all platforms) to ``DEST_REGISTRY/REPOSITORY:TAG``.

    ``dest_registry`` is ``host:port``. Digests are preserved or the push fails.
    """
    copy(
        f"oci:{layout_dir}:{refname}",
        docker_ref(dest_registry, repository, tag),
        dest_creds=creds,
        timeout=timeout,
    )


def push_dir(
    dir_path: str | os.PathLike[str],
    dest_registry: str,
    repository: str,
    tag: str,
    *,
    creds: Creds | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Push a ``dir:`` layout (see ``images.write_dir_layout``), the way to push Docker media types."""
    copy(f"dir:{dir_path}", docker_ref(dest_registry, repository, tag), dest_creds=creds, timeout=timeout)


@overload
def inspect(
    ref: str,
    *,
    raw: Literal[True],
    config: bool = ...,
    tls_verify: bool = ...,
    creds: Creds | None = ...,
    cert_dir: str | os.PathLike[str] | None = ...,
    no_tags: bool = ...,
    extra_args: Sequence[str] = ...,
    timeout: float = ...,
) -> bytes: ...


@overload
def inspect(
    ref: str,
    *,
    raw: Literal[False] = ...,
    config: bool = ...,
    tls_verify: bool = ...,
    creds: Creds | None = ...,
    cert_dir: str | os.PathLike[str] | None = ...,
    no_tags: bool = ...,
    extra_args: Sequence[str] = ...,
    timeout: float = ...,
) -> dict[str, Any]: ...


def inspect(
    ref: str,
    *,
    raw: bool = False,
    config: bool = False,
    tls_verify: bool = False,
    creds: Creds | None = None,
    cert_dir: str | os.PathLike[str] | None = None,
    no_tags: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes | dict[str, Any]:
    """``skopeo inspect REF``: parsed JSON, or with ``raw=True`` the exact manifest bytes.

    ``config=True`` returns the image config instead (raw bytes with ``raw=True``). Without
    ``no_tags`` skopeo also lists the repository's tags, as it does for real users.
    """
    args = ["inspect", "--retry-times", "0", "--authfile", str(authfile())]
    args += _tls_args("", tls_verify, cert_dir) + _creds_args("", creds)
    if raw:
        args.append("--raw")
    if config:
        args.append("--config")
    if no_tags:
        args.append("--no-tags")
    out = run([*args, *extra_args, ref], timeout=timeout).stdout
    return out if raw else json.loads(out)


def manifest_digest(manifest: bytes) -> str:
    """The digest skopeo computes for a manifest (exactly sha256 of the bytes for schema2/OCI)."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(manifest)
        f.flush()
        return run(["manifest-digest", f.name]).stdout.decode().strip()
