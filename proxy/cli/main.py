"""The ``regcache`` command: ``serve``, and the admin verbs as a client."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from config.settings import Settings

# The client verbs (images, rmi, pull, ...) import only what they use, so a
# listing answers without loading the server's settings schema and aiohttp.
log = logging.getLogger("regcache")


def settings_from_args(args: argparse.Namespace) -> Settings:
    from config.settings import load_settings, upstreams_from_flags

    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "upstream", None):
        upstreams = upstreams_from_flags(args.upstream)
        overrides["upstreams"] = [upstream.model_dump(exclude_defaults=True) for upstream in upstreams]
    return load_settings(args.config, overrides=overrides)


async def serve(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    # Listeners, TLS, limits, signals and graceful shutdown live in proxy.server.
    from proxy.server import serve as run_server

    await run_server(settings, reload=reload)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (the ``fast`` extra): the same requests for less CPU.

    Blob bodies do not depend on the loop: they go out from pool threads
    (proxy.filesend), which uvloop, lacking ``loop.sendfile``, needs.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def package_version() -> str:
    """The installed package's version; from a source tree that is not installed, its pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regcache")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, tomllib.TOMLDecodeError, KeyError):
            return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked: the other verbs start without reading package metadata."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"regcache {package_version()}")
        parser.exit()


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="YAML settings file")
    parser.add_argument("--data-dir", type=Path, help="where blobs and metadata live (default ./data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regcache", description="A pull-through caching proxy for registries")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("serve", help="run the proxy")
    _add_config_flags(p)
    p.add_argument("--listen", help="HOST:PORT to listen on (default 0.0.0.0:5000)")
    p.add_argument(
        "--upstream",
        action="append",
        metavar="[NAME=]URL",
        help="an upstream registry, named NAME (default: the URL's host); repeat for more, the first "
        "is the default; replaces the configured upstreams (default: Docker Hub)",
    )
    from proxy.cli import archive

    archive.add_parsers(verbs)
    p = verbs.add_parser("fsck", help="check the store against its metadata (with the server stopped)")
    _add_config_flags(p)
    p.add_argument("--repair", action="store_true", help="fix what is wrong, not only report it")
    p.add_argument("--fast", action="store_true", help="skip the sha256 verification of every blob")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    from proxy.cli import verbs as admin_verbs

    admin_verbs.add_parsers(verbs)
    return parser


def fsck(args: argparse.Namespace) -> int:
    """Exit 0 when the store is consistent, 1 when all found was fixed, 4 when problems remain, 8 on failure."""
    import json

    from config.settings import ConfigError
    from storage.backends import make_backend
    from storage.lifecycle.fsck import FAILED, StoreBusy
    from storage.lifecycle.fsck import fsck as check

    try:
        settings = settings_from_args(args)
        report = asyncio.run(check(settings.data_dir, make_backend(settings), repair=args.repair, fast=args.fast))
    except ConfigError as exc:
        print(f"regcache: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StoreBusy, OSError) as exc:
        print(f"regcache fsck: {exc}", file=sys.stderr)
        return FAILED
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is not None:  # verbs that carry their own runner (save, load)
        return handler(args)
    if args.verb == "serve":
        from config.settings import ConfigError
        from proxy.http.accesslog import configure_logging

        try:
            settings = settings_from_args(args)
        except ConfigError as exc:
            print(f"regcache: configuration error: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings.log.level, settings.log.format)
        try:
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                runner.run(serve(settings, reload=lambda: settings_from_args(args)))
        except ConfigError as exc:
            print(f"regcache: configuration error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"regcache: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.verb == "fsck":
        return fsck(args)
    from proxy.cli import verbs as admin_verbs

    if args.verb in admin_verbs.VERBS:
        return admin_verbs.run(args)
    parser.error(f"unknown verb {args.verb}")  # exits with status 2


if __name__ == "__main__":
    sys.exit(main())
