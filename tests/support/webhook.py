"""A notification endpoint in the test process, and the distribution registry's event schema.

``Webhook`` records every POST it gets; a test can make it hold every POST (an
endpoint that accepts and never answers) or fail the first few with 500.
``check_event`` checks one event against the field names and types of the
registry's docs/notifications.md, the contract its consumers parse.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from typing import Any

from aiohttp import web

ENVELOPE_TYPE = "application/vnd.docker.distribution.events.v1+json"
REGISTRY_ACTIONS = {"pull", "push", "mount", "delete"}
REGCACHE_ACTIONS = {"fill", "digest_mismatch", "evict"}
TARGET_TYPES: dict[str, type | tuple[type, ...]] = {
    "mediaType": str, "size": int, "digest": str, "length": int, "repository": str, "url": str, "tag": str,
    "references": list,
}
REQUEST_FIELDS = ("id", "addr", "host", "method", "useragent")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class Webhook:
    def __init__(self) -> None:
        self.attempts: list[dict[str, str]] = []  # headers of every POST, answered or not
        self.envelopes: list[dict[str, Any]] = []  # bodies of the POSTs answered 200
        self.held = asyncio.Event()  # set once a POST is being held
        self.hold = False
        self.fail_first = 0
        self._release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/events", self._post)
        self.url = ""

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for envelope in self.envelopes for e in envelope["events"]]

    def release(self) -> None:
        self._release.set()

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts.append(dict(request.headers))
        if self.hold:
            self.held.set()
            await self._release.wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        assert request.headers["Content-Type"] == ENVELOPE_TYPE
        self.envelopes.append(json.loads(body))
        return web.Response(status=200)


async def start_webhook(aiohttp_server: Any) -> Webhook:
    hook = Webhook()
    server = await aiohttp_server(hook.app, host="127.0.0.1")
    hook.url = str(server.make_url("/events"))
    return hook


def check_event(event: dict[str, Any]) -> None:
    """Raises AssertionError naming the first field that breaks the registry's schema."""
    assert set(event) <= {"id", "timestamp", "action", "target", "request", "actor", "source", "regcache"}, event
    assert isinstance(event["id"], str) and event["id"]
    assert isinstance(event["timestamp"], str)
    datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))  # RFC 3339
    assert event["timestamp"].endswith("Z")
    assert event["action"] in REGISTRY_ACTIONS | REGCACHE_ACTIONS, event["action"]
    target = event["target"]
    for key, value in target.items():
        assert key in TARGET_TYPES, f"unknown target field {key}"
        assert isinstance(value, TARGET_TYPES[key]) and not isinstance(value, bool), f"target.{key}: {value!r}"
    assert DIGEST.match(target["digest"]) and isinstance(target["repository"], str)
    if "size" in target:
        assert target["length"] == target["size"]
    request = event["request"]
    assert set(request) == set(REQUEST_FIELDS) and all(isinstance(request[k], str) for k in REQUEST_FIELDS)
    assert set(event["source"]) == {"addr", "instanceID"} and all(isinstance(v, str) for v in event["source"].values())
    if "actor" in event:
        assert isinstance(event["actor"].get("name"), str)
