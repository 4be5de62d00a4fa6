"""The distribution registry's notification format (its docs/notifications.md).

Field names and types are the registry's, so its consumers parse regcache's events
unchanged; like the registry (Go's ``omitempty``), target fields that are not known
are left out. What the registry has no word for goes in regcache's own ``regcache``
object: the cache result, the upstream, why an image left.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from proxy.metrics.events import ClientRequest, Content

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"


def event(action: str, content: Content, request: ClientRequest | None, source: dict[str, str],
          **regcache: str) -> dict[str, Any]:
    target: dict[str, Any] = {"mediaType": content.media_type, "size": content.size, "digest": content.digest,
                              "length": content.size, "repository": content.repository, "url": content.url,
                              "tag": content.tag}
    return {
        "id": str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "action": action,
        "target": {k: v for k, v in target.items() if v is not None},
        "request": {
            "id": request.id if request else "",
            "addr": request.addr if request else "",
            "host": request.host if request else "",
            "method": request.method if request else "",
            "useragent": request.useragent if request else "",
        },
        "source": source,
        "regcache": {"upstream": content.upstream, **regcache},
    }


def envelope(events: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"events": list(events)}, separators=(",", ":")).encode()
