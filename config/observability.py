"""Settings for what regcache sends out besides responses: notifications and traces.

Notification endpoints take the distribution registry's keys (``notifications.endpoints``
in its config), so an operator can copy an endpoint over; ``header_files`` and
``queue_size`` are regcache's own.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from config.model import Duration, Model

ACTIONS = ("pull", "push", "delete", "fill", "digest_mismatch", "evict")


class IgnoreSettings(Model):
    mediatypes: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list, description=f"any of {', '.join(ACTIONS)}")

    @model_validator(mode="after")
    def _check(self) -> IgnoreSettings:
        unknown = sorted(set(self.actions) - set(ACTIONS))
        if unknown:
            raise ValueError(f"ignore.actions: unknown action(s) {unknown}; known: {list(ACTIONS)}")
        return self


class EndpointSettings(Model):
    name: str
    url: str
    headers: dict[str, list[str]] = Field(default_factory=dict, description="sent with every POST; no secrets here")
    header_files: dict[str, Path] = Field(
        default_factory=dict,
        description="header name -> file holding its value (a token): read at each delivery, never logged",
    )
    timeout: Duration = Field(default=5.0, gt=0)
    threshold: int = Field(default=5, ge=1, description="failed deliveries in a row before the endpoint backs off")
    backoff: Duration = Field(default=10.0, gt=0, description="wait between attempts once past threshold")
    queue_size: int = Field(default=1000, ge=1, description="events held for this endpoint; beyond it, dropped")
    ignoredmediatypes: list[str] = Field(default_factory=list)
    ignore: IgnoreSettings = IgnoreSettings()

    @model_validator(mode="after")
    def _check(self) -> EndpointSettings:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/path, got {self.url!r}")
        both = {h.lower() for h in self.headers} & {h.lower() for h in self.header_files}
        if both:
            raise ValueError(f"header(s) {sorted(both)} given both in headers and header_files")
        return self

    def ignores(self, action: str, media_type: str | None) -> bool:
        if action in self.ignore.actions:
            return True
        return media_type is not None and (media_type in self.ignoredmediatypes or media_type in self.ignore.mediatypes)


class NotificationSettings(Model):
    endpoints: list[EndpointSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> NotificationSettings:
        names = [e.name for e in self.endpoints]
        if len(names) != len(set(names)):
            raise ValueError("notifications.endpoints: names must be unique")
        return self


class TracingSettings(Model):
    """OpenTelemetry traces (``pip install '.[tracing]'``); the exporter is configured by the
    standard ``OTEL_EXPORTER_OTLP_*`` variables (default ``http://localhost:4318``)."""

    enabled: bool = False
    service_name: str = Field(default="regcache", description="unless OTEL_SERVICE_NAME says otherwise")
