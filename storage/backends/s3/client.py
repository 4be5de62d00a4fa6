"""The bucket's one client, and the one place botocore's errors become regcache's.

Every call the S3 backend, its leases and its records make goes through
``S3Client.api`` inside ``translated(...)``, so nothing above this package sees
a botocore or aiohttp exception: a missing key is ``StoreObjectUnknown``, a
lost conditional write ``StoreObjectExists``, a request the store does not
support ``StoreRejected``, and anything else (refused credentials, a missing
bucket, 5xx, a connection that fails or times out) ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import os
import ssl
import warnings
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import convert_body_to_file_like_object
from botocore.httpsession import get_cert_path
from botocore.utils import get_environ_proxies

from config.settings import S3Settings
from storage.errors import (
    RegcacheError,
    StoreObjectExists,
    StoreObjectUnknown,
    StoreRejected,
    StoreUnavailable,
)

# Bodies go to aiohttp as the bytes they are (``S3Client.open``): its warning that a big bytes
# body "might lock the event loop" does not apply, the socket takes what fits at once and the
# rest is sent as it drains, without a copy.
warnings.filterwarnings("ignore", "Sending a large body directly with raw bytes", ResourceWarning)

# What the client and the bodies it streams raise (botocore wraps most of aiohttp's, not all).
FAILURES: tuple[type[BaseException], ...] = (ClientError, BotoCoreError, aiohttp.ClientError)
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # seconds without a byte from the store
# How long a presigned URL for one transfer stays valid: a part or a blob body sent at the
# slowest pace a fill tolerates still starts well within it (S3 checks it when a request begins).
PRESIGN_TTL = 3600.0
# HEAD answers carry no error body, hence the bare status code among the names.
NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})


def translate(exc: BaseException, what: str) -> RegcacheError:
    """The regcache error for a failed store call on ``what`` (a key, or the bucket)."""
    if not isinstance(exc, ClientError):
        return StoreUnavailable(f"object store unreachable for {what}: {exc}")
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return answer_error(status, code, what, exc)


def answer_error(status: int | None, code: str, what: str, detail: object) -> RegcacheError:
    """The regcache error for the store's error answer (its status and S3 error code) about ``what``;
    also for the answers ``transfer`` reads itself."""
    if code == "NoSuchBucket":  # the whole store is unusable, not one key missing
        return StoreUnavailable(f"object store has no bucket for {what}: {detail}")
    if status == 404 or code in NOT_FOUND:
        return StoreObjectUnknown(f"no object {what}")
    if status == 412 or code == "PreconditionFailed":
        return StoreObjectExists(f"object {what} exists")
    if status in (400, 501) or code == "NotImplemented":
        return StoreRejected(f"object store rejected the request for {what}: {detail}")
    return StoreUnavailable(f"object store refused {what}: {detail}")


class translated:
    """``with translated(key): await client.api...`` raises regcache's error instead of botocore's.

    A class, not a generator: it wraps the blob read and stat paths, so it costs no more than a try.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and isinstance(exc, FAILURES):
            raise translate(exc, self.what) from exc


def _credentials(settings: S3Settings) -> dict[str, str]:
    """Config, then ``credentials_file``, then botocore's own chain (AWS_ACCESS_KEY_ID, ...)."""
    if settings.access_key and settings.secret_key is not None:
        return {
            "aws_access_key_id": settings.access_key,
            "aws_secret_access_key": settings.secret_key.get_secret_value(),
        }
    if settings.credentials_file is not None:
        # The AWS shared-credentials format: [default] aws_access_key_id = ... (a mounted Secret works too).
        parser = configparser.ConfigParser()
        try:
            parser.read_string(settings.credentials_file.read_text())
        except (OSError, configparser.Error) as exc:
            raise StoreUnavailable(f"storage.s3.credentials_file: cannot read: {exc}") from None
        section = parser["default"] if parser.has_section("default") else next(iter(parser.values()))
        key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if not key or not secret:
            raise StoreUnavailable("storage.s3.credentials_file: needs aws_access_key_id and aws_secret_access_key")
        return {"aws_access_key_id": key, "aws_secret_access_key": secret}
    return {}


async def read_body(got: dict[str, Any], what: str) -> bytes:
    """The whole body of a small object (a lease, a record) from a ``get_object`` answer."""
    body = got["Body"]
    try:
        with translated(what):
            return bytes(await body.read())
    finally:
        body.close()


class S3Client:
    """One aiobotocore client plus the bucket and key prefix every call uses."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/") + "/" if settings.prefix.strip("/") else ""
        self._stack = contextlib.AsyncExitStack()
        self.api: Any = None

    async def open(self) -> None:
        s = self.settings
        config = AioConfig(
            s3={
                "addressing_style": "path" if s.path_style else "auto",
                # botocore hashes every body it sends for the signature, on the event loop, over plain
                # http and over TLS alike (no checksum header goes along): a second SHA-256 of every
                # blob on top of its digest's, which the store computes again to check. It protects
                # the upload only; a network that could alter it could alter every GET's body, which
                # no signature covers. Blobs are verified before their upload is completed and
                # clients verify digests themselves. UNSIGNED-PAYLOAD is part of SigV4 for S3.
                "payload_signing_enabled": s.sign_payload,
            },
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=64,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            # Trailing CRC checksums (aws-chunked bodies) are not understood by every
            # S3-compatible store; bytes are verified against their digest anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        verify: bool | str | None = None
        if s.insecure:
            verify = False
        elif s.ca_bundle is not None:
            verify = str(s.ca_bundle)
        self.api = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=s.endpoint, region_name=s.region, config=config, verify=verify, **_credentials(s)
            )
        )
        # botocore wraps a bytes body in a BytesIO, which aiohttp copies whole to size it and again
        # in 256 KiB reads, on the event loop: two copies of every part for nothing, as retries
        # resend bytes as they are.
        for operation in ("UploadPart", "PutObject"):
            self.api.meta.events.unregister(
                f"before-parameter-build.s3.{operation}", convert_body_to_file_like_object
            )

    async def close(self) -> None:
        await self._stack.aclose()

    async def presign(self, operation: str, key: str, expires: float = PRESIGN_TTL, **params: object) -> str:
        """A URL that lets anyone holding it make this one request on ``key`` until it expires
        (no body hash in it: query-signed S3 requests are UNSIGNED-PAYLOAD)."""
        with translated(key):
            url: str = await self.api.generate_presigned_url(
                operation, Params={"Bucket": self.bucket, "Key": key, **params}, ExpiresIn=max(1, int(expires))
            )
        return url

    async def direct_tls(self) -> tuple[bool, ssl.SSLContext | None]:
        """Whether ``transfer`` may reach the store past aiobotocore, and the TLS context for an
        https endpoint. Not when a proxy applies to it: botocore honours HTTP(S)_PROXY and
        NO_PROXY, ``transfer`` does not, so every request then goes through aiobotocore."""
        url = urlsplit(await self.presign("head_object", "probe"))
        if get_environ_proxies(url.geturl()).get(url.scheme):
            return False, None
        if url.scheme != "https":
            return True, None
        if self.settings.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return True, context
        # As botocore verifies: the configured bundle, then AWS_CA_BUNDLE, then its default bundle.
        bundle = self.settings.ca_bundle or os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
        return True, await asyncio.to_thread(ssl.create_default_context, cafile=str(bundle))

    def key(self, relative: str) -> str:
        return self.prefix + relative

    def relative(self, key: str) -> str:
        return key[len(self.prefix) :]

    async def head_bucket(self) -> dict[str, Any]:
        """The bucket's HEAD answer (its Date is the store's clock); a missing bucket is an unusable store."""
        try:
            with translated(f"bucket {self.bucket!r}"):
                answer: dict[str, Any] = await self.api.head_bucket(Bucket=self.bucket)
        except StoreObjectUnknown as exc:
            raise StoreUnavailable(f"object store has no bucket {self.bucket!r}") from exc
        return answer

    async def list(self, relative_prefix: str) -> AsyncIterator[dict[str, Any]]:
        paginator = self.api.get_paginator("list_objects_v2")
        with translated(f"listing {relative_prefix}"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(relative_prefix)):
                for item in page.get("Contents", []):
                    yield item
