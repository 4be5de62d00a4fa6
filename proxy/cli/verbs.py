"""``regcache images | rmi | search | pull | pin | unpin | gc | stats``: docker's verbs, for a cache.

Each verb calls the admin API of a running regcache (``--server``) and prints
what docker would: the same columns, units, ``--format`` templates and
``Untagged:``/``Deleted:`` lines. A failure is one line on stderr and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from proxy.cli.client import DEFAULT_SERVER, SERVER_ENV, AdminClient, AdminClientError, resolve_token
from proxy.cli.docker_format import IMAGE_HEADERS, default_images_format, image_rows
from proxy.cli.gotemplate import Template, TemplateError, render_all
from proxy.cli.progress import show_pull
from proxy.cli.tree import render_tree

VERBS = ("images", "rmi", "search", "pull", "pin", "unpin", "gc", "stats")
SEARCH_HEADERS = {
    "Name": "NAME",
    "Description": "DESCRIPTION",
    "StarCount": "STARS",
    "IsOfficial": "OFFICIAL",
    "IsAutomated": "AUTOMATED",
    "Cached": "CACHED",
    "Upstream": "UPSTREAM",
}
SEARCH_DEFAULT = "table {{.Name}}\\t{{.Description}}\\t{{.StarCount}}\\t{{.IsOfficial}}\\t{{.Cached}}"
DESCRIPTION_WIDTH = 45


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
        help=f"regcache to talk to (default ${SERVER_ENV} or {DEFAULT_SERVER})",
    )
    parser.add_argument("--token-file", type=Path, help="file holding the admin token (default $REGCACHE_ADMIN_TOKEN)")


def add_parsers(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("images", help="list cached images")
    add_client_flags(p)
    p.add_argument("reference", nargs="?", help="only images matching REPOSITORY[:TAG] (a glob)")
    p.add_argument("-a", "--all", action="store_true", help="also the platform images of multi-arch indexes")
    p.add_argument("--digests", action="store_true", help="show digests")
    p.add_argument("--pulled-by", action="store_true",
                   help="show who pulled each image last (user, token or anonymous; {{.LastPulledBy}})")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    p.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    p.add_argument(
        "-f",
        "--filter",
        action="append",
        default=[],
        help="dangling=true, before=IMAGE, since=IMAGE, reference=GLOB, upstream=NAME",
    )
    p.add_argument("--format", help="Go template: table, {{.ID}}, {{.Repository}}, {{.Tag}}, {{json .}} ...")
    p.add_argument("--tree", action="store_true",
                   help="each image with its platforms and its referrers (signatures, SBOMs) by artifact type")
    p = verbs.add_parser("rmi", help="remove cached images")
    add_client_flags(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="remove an image several names use")
    p = verbs.add_parser("search", help="search cached repositories and the upstreams")
    add_client_flags(p)
    p.add_argument("term")
    p.add_argument("--limit", type=int, default=25, help="at most this many results (default 25)")
    p.add_argument("-f", "--filter", action="append", default=[], help="stars=N, is-official=true|false")
    p.add_argument("--format", help="Go template: {{.Name}}, {{.Description}}, {{.StarCount}}, {{.Cached}} ...")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate descriptions")
    p = verbs.add_parser("pull", help="warm the cache with an image")
    add_client_flags(p)
    p.add_argument("image")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--platform", help="os/arch[/variant] of a multi-arch image (default the server's)")
    group.add_argument("-a", "--all-platforms", action="store_true", help="every platform of a multi-arch image")
    p.add_argument("-q", "--quiet", action="store_true", help="only the image reference at the end")
    p.add_argument("--no-referrers", action="store_true",
                   help="skip the image's signatures, SBOMs and attestations (OCI referrers)")
    for verb, text in (("pin", "keep images through eviction"), ("unpin", "let images be evicted again")):
        p = verbs.add_parser(verb, help=text)
        add_client_flags(p)
        p.add_argument("images", nargs="+", metavar="IMAGE")
    p = verbs.add_parser("gc", help="remove blobs nothing references")
    add_client_flags(p)
    p.add_argument("--grace", type=float, help="only what is older than this many seconds (default the server's)")
    p = verbs.add_parser("stats", help="store size, counts and hit ratio")
    add_client_flags(p)
    p.add_argument("--json", action="store_true", help="print the JSON as the server sent it")


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    try:
        client = AdminClient(args.server, resolve_token(args.token_file))
        return _VERBS[args.verb](client, args, out)
    except (AdminClientError, TemplateError) as exc:
        print(f"regcache {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _images(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    query = [("filter", f) for f in args.filter]
    if args.reference:
        query.append(("reference", args.reference))
    if args.all:
        query.append(("all", "1"))
    images = client.call("GET", "images", query)["images"]
    if args.tree:
        out.write(render_tree(images))
        return 0
    show_platforms = any(image.get("Platforms") for image in images)
    fmt = args.format or default_images_format(digests=args.digests, quiet=args.quiet, show_platforms=show_platforms,
                                               pulled_by=args.pulled_by)
    if args.quiet and args.format:
        fmt = "{{.ID}}"
    template = Template(fmt)
    rows = image_rows(images, digests=args.digests or "Digest" in template.fields(), no_trunc=args.no_trunc)
    out.write(render_all(template, rows, IMAGE_HEADERS))
    return 0


def _lines(results: list[dict[str, Any]], out: IO[str]) -> int:
    """docker's way: every success printed, every error one line on stderr, status 1 if any failed."""
    failed = 0
    for result in results:
        if "error" in result:
            failed += 1
            print(f"Error response from daemon: {result['error']}", file=sys.stderr)
            continue
        for line in result["lines"]:
            out.write(line + "\n")
    return 1 if failed else 0


def _rmi(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    return _lines(client.call("POST", "rmi", body={"images": args.images, "force": args.force})["results"], out)


def _pin(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    return _lines(client.call("POST", args.verb, body={"images": args.images})["results"], out)


def _search(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    query = [("term", args.term), ("limit", str(args.limit))] + [("filter", f) for f in args.filter]
    answer = client.call("GET", "search", query)
    for warning in answer.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    rows = []
    for r in answer["results"]:
        description = " ".join(r["description"].split())
        if not args.no_trunc and len(description) > DESCRIPTION_WIDTH:
            description = description[: DESCRIPTION_WIDTH - 1] + "…"
        rows.append(
            {
                "Name": r["name"],
                "Description": description,
                "StarCount": r["star_count"],
                "IsOfficial": _ok(r["is_official"]),
                "IsAutomated": _ok(r["is_automated"]),
                "Cached": _ok(r["cached"]),
                "Upstream": r["upstream"],
            }
        )
    out.write(render_all(Template(args.format or SEARCH_DEFAULT), rows, SEARCH_HEADERS))
    return 0


def _ok(flag: bool) -> str:
    return "[OK]" if flag else ""


def _pull(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    body: dict[str, Any] = {"image": args.image, "all_platforms": args.all_platforms}
    if args.no_referrers:
        body["referrers"] = False
    if args.platform:
        body["platform"] = args.platform
    return show_pull(client.lines("POST", "pull", body=body), out, quiet=args.quiet)


def _gc(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    query = [("grace", str(args.grace))] if args.grace is not None else []
    answer = client.call("POST", "gc", query)
    for image in answer.get("images", []):
        out.write(f"Evicted: {image['upstream']}/{image['repository']}@{image['manifest']}\n")
    out.write(f"Deleted blobs: {answer['blobs']}\nTotal reclaimed space: {_size(answer['bytes'])}\n")
    if answer.get("deferred"):
        out.write(f"In use, left for a later sweep: {answer['deferred']}\n")
    return 0


def _size(n: int) -> str:
    from proxy.cli.docker_format import human_size

    return human_size(n)


def _stats(client: AdminClient, args: argparse.Namespace, out: IO[str]) -> int:
    answer = client.call("GET", "stats")
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
        return 0
    ratio = answer.get("hit_ratio")
    budget = answer.get("max_size")
    lines = [
        f"Store size:     {_size(answer['size'])}" + (f" of {_size(budget)}" if budget else ""),
        f"Blobs:          {answer['blobs']}",
        f"Images:         {answer['images']} ({answer['pinned']} pinned)",
        f"Repositories:   {answer['repositories']}",
        f"Pulls:          {answer['pulls']}",
        f"Hit ratio:      {'n/a' if ratio is None else f'{ratio:.1%}'}",
    ]
    for name, upstream in (answer.get("upstreams") or {}).items():
        state = upstream["state"]
        if state == "open":
            state += f" (unreachable: {upstream['last_error']}; cached content is served)"
        lines.append(f"Upstream {name}: {state}")
    out.write("\n".join(lines) + "\n")
    return 0


_VERBS = {
    "images": _images,
    "rmi": _rmi,
    "search": _search,
    "pull": _pull,
    "pin": _pin,
    "unpin": _pin,
    "gc": _gc,
    "stats": _stats,
}
