"""Serving HTTPS from ``settings.tls``, with the certificate reloaded on SIGHUP.

The listener keeps one ``SSLContext`` for its whole life; reloading calls
``load_cert_chain`` on that same context, which OpenSSL applies to every
handshake from then on. Connections already open keep the certificate they
negotiated. A reload that fails (a half-written file, a key that does not
match) keeps serving the old certificate and says so in the log.
"""

from __future__ import annotations

import logging
import ssl

from config.settings import ConfigError, TLSSettings

log = logging.getLogger("regcache.tls")


class ServerTLS:
    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        # aiohttp's server speaks HTTP/1.1 only.
        self.context.set_alpn_protocols(["http/1.1"])
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls: cannot load {self.settings.cert} / {self.settings.key}: {_reason(exc)}") from None

    def _load(self) -> None:
        cert, key = str(self.settings.cert), str(self.settings.key)
        # A throwaway context first: a failed load half-way through (new
        # certificate, old key) must never reach the live one.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        self.context.load_cert_chain(cert, key)

    def reload(self) -> bool:
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate reload failed, keeping the old one: %s", _reason(exc))
            return False
        log.info("TLS certificate reloaded from %s", self.settings.cert)
        return True


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
