"""``regcache save`` and ``regcache load``: archives streamed to and from the admin API.

Neither side holds an archive in memory: save copies the response to the
file (or stdout) chunk by chunk, load sends the file (or stdin) as the
request body. A save to a file goes to a temporary name first and is renamed
only when the whole archive arrived, so a failed save leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import IO

CHUNK = 1024 * 1024


class Progress:
    """docker's progress bar on a terminal's stderr, redrawn in place; silent when stderr is not a terminal."""

    def __init__(self, label: str, total: int | None = None, stream: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0
        self._drawn = 0.0

    def _draw(self, end: str = "") -> None:
        from proxy.cli.progress import progress_bar

        self.stream.write(f"\r{self.label} {progress_bar(self.done, self.total or 0)}{end}")
        self.stream.flush()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn > 0.1:
            self._drawn = now
            self._draw()

    def close(self) -> None:
        if self.enabled:
            self._draw("\n")


def _open(
    args: argparse.Namespace,
    path: str,
    *,
    data: bytes | Iterable[bytes],
    headers: dict[str, str],
    query: list[tuple[str, str]] | None = None,
) -> HTTPResponse:
    from proxy.cli.client import DEFAULT_SERVER, SERVER_ENV, AdminClient, resolve_token

    server = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    client = AdminClient(server, resolve_token(args.token_file), timeout=args.timeout)
    return client.open_raw("POST", path, query, data, headers)


# --------------------------------------------------------------------------- save


def run_save(args: argparse.Namespace) -> int:
    from proxy.cli.client import AdminClientError
    from storage.oci.platforms import host_platform

    if args.output is None and sys.stdout.isatty():
        print("regcache: cowardly refusing to save to a terminal. Use the -o flag or redirect", file=sys.stderr)
        return 1
    body = {
        "images": args.images,
        "platform": args.platform,
        "docker_platform": args.platform or host_platform(),
        "compress": args.compress,
    }
    target = Path(args.output) if args.output else None
    partial = target.with_name(f".{target.name}.partial") if target else None
    try:
        with _open(args, "save", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}) as resp:
            length = resp.headers.get("Content-Length")
            progress = Progress("Saving", int(length) if length else None)
            out = open(partial, "wb") if partial else sys.stdout.buffer  # noqa: SIM115 - closed below
            try:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    progress.add(len(chunk))
                out.flush()
            finally:
                if partial:
                    out.close()
                progress.close()
        if length is not None and progress.done != int(length):
            raise AdminClientError(f"archive truncated: got {progress.done} of {length} bytes")
    except (AdminClientError, OSError, urllib.error.URLError) as exc:
        if partial:
            partial.unlink(missing_ok=True)
        message = str(exc) if isinstance(exc, AdminClientError) else f"save failed: {exc}"
        print(f"regcache: {message}", file=sys.stderr)
        return 1
    if partial and target:
        os.replace(partial, target)
    return 0


# --------------------------------------------------------------------------- load


def _chunks(stream: IO[bytes], progress: Progress) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        progress.add(len(chunk))
        yield chunk


def run_load(args: argparse.Namespace) -> int:
    from proxy.cli.client import AdminClientError

    query: list[tuple[str, str]] = []
    if args.upstream:
        query.append(("upstream", args.upstream))
    if args.repository_prefix:
        query.append(("repository_prefix", args.repository_prefix))
    try:
        source = open(args.input, "rb") if args.input else sys.stdin.buffer  # noqa: SIM115 - closed below
    except OSError as exc:
        print(f"regcache: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return 1
    headers = {"Content-Type": "application/x-tar"}
    size = None
    if args.input and Path(args.input).is_file():
        size = os.fstat(source.fileno()).st_size
        headers["Content-Length"] = str(size)
    progress = Progress("Loading", size)
    try:
        with _open(args, "load", data=_chunks(source, progress), headers=headers, query=query) as resp:
            result = json.loads(resp.read())
    except (AdminClientError, OSError, ValueError) as exc:
        progress.close()
        message = str(exc) if isinstance(exc, AdminClientError) else f"load failed: {exc}"
        print(f"regcache: {message}", file=sys.stderr)
        return 1
    finally:
        if args.input:
            source.close()
    progress.close()
    for image in result.get("loaded", []):
        if args.quiet:
            continue
        if image.get("name"):
            print(f"Loaded image: {image['name']}")
        else:
            print(f"Loaded image ID: {image['id']}")
    return 0


# --------------------------------------------------------------------------- parsers


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    # The admin client is imported when a verb runs, not when the parser is built.
    parser.add_argument("--server", help="regcache to talk to (default $REGCACHE_SERVER or http://127.0.0.1:5000)")
    parser.add_argument("--token-file", type=Path, help="file holding the admin token (default $REGCACHE_ADMIN_TOKEN)")
    parser.add_argument("--timeout", type=float, default=3600.0, help=argparse.SUPPRESS)


def add_parsers(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("save", help="save images to a tar archive (streamed to STDOUT by default)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", help="write to a file instead of STDOUT")
    p.add_argument("--compress", choices=["gzip", "zstd"], help="compress the whole archive")
    p.add_argument("--platform", help="os/arch[/variant]: only this platform of a multi-platform image")
    _add_client_flags(p)
    p.set_defaults(handler=run_save)

    p = verbs.add_parser("load", help="load images from a tar archive (read from STDIN by default)")
    p.add_argument("-i", "--input", help="read from a tar archive file (plain, gzip or zstd) instead of STDIN")
    p.add_argument("--upstream", help="register the images under this upstream (default: as the names say)")
    p.add_argument("--repository-prefix", help="put the images below this repository path")
    p.add_argument("-q", "--quiet", action="store_true", help="suppress the load output")
    _add_client_flags(p)
    p.set_defaults(handler=run_load)
