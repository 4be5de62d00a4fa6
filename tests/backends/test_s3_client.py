"""The S3 client's one error translation: botocore's and aiohttp's errors become regcache's.

The table is checked on botocore's own exception types; the answers a real store gives (a missing
key, a lost conditional write, wrong credentials, no bucket, nobody listening) against the
session's Ceph RGW and a closed port.
"""

from __future__ import annotations

import hashlib

import aiohttp
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from config.settings import S3Settings
from storage.backends.s3.client import S3Client, read_body, translate, translated
from storage.errors import StoreObjectExists, StoreObjectUnknown, StoreRejected, StoreUnavailable
from tests.support.daemons import closed_port


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error(404, "NoSuchKey"), StoreObjectUnknown),
        (client_error(404, "404"), StoreObjectUnknown),  # a HEAD answer has no body, only the status
        (client_error(404, "NoSuchUpload"), StoreObjectUnknown),
        (client_error(404, "NoSuchBucket"), StoreUnavailable),
        (client_error(412, "PreconditionFailed"), StoreObjectExists),
        (client_error(403, "AccessDenied"), StoreUnavailable),
        (client_error(403, "SignatureDoesNotMatch"), StoreUnavailable),
        (client_error(501, "NotImplemented"), StoreRejected),
        (client_error(503, "SlowDown"), StoreUnavailable),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
        (aiohttp.ClientPayloadError("cut"), StoreUnavailable),
    ],
)
def test_not_found_denied_and_connection_errors_become_regcache_errors(error, expected) -> None:
    translated_error = translate(error, "blobs/sha256/ab/abc")
    assert type(translated_error) is expected
    assert "blobs/sha256/ab/abc" in str(translated_error)


def test_translated_raises_the_regcache_error_caused_by_the_botocore_one() -> None:
    original = client_error(404, "NoSuchKey")
    with pytest.raises(StoreObjectUnknown) as raised, translated("leases/gc"):
        raise original
    assert raised.value.__cause__ is original


def test_translated_lets_every_other_error_through_unchanged() -> None:
    with pytest.raises(ValueError, match="not a store error"), translated("leases/gc"):
        raise ValueError("not a store error")


@pytest.fixture
async def make_client(rgw):
    """``await make_client(**s3)``: an open ``S3Client`` on the session's RGW, closed at the end."""
    opened: list[S3Client] = []

    async def make(**s3: object) -> S3Client:
        client = S3Client(S3Settings(**{**rgw.s3_settings("unset"), **s3}))
        await client.open()
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


async def test_a_missing_key_on_a_real_store_is_store_object_unknown(rgw, make_client) -> None:
    client = await make_client(bucket=rgw.make_bucket())
    with pytest.raises(StoreObjectUnknown), translated("absent"):
        await client.api.get_object(Bucket=client.bucket, Key="absent")
    with pytest.raises(StoreObjectUnknown), translated("absent"):
        await client.api.head_object(Bucket=client.bucket, Key="absent")


async def test_a_lost_conditional_put_on_a_real_store_is_store_object_exists(rgw, make_client) -> None:
    client = await make_client(bucket=rgw.make_bucket())
    await client.api.put_object(Bucket=client.bucket, Key="lease", Body=b"first", IfNoneMatch="*")
    with pytest.raises(StoreObjectExists), translated("lease"):
        await client.api.put_object(Bucket=client.bucket, Key="lease", Body=b"second", IfNoneMatch="*")


async def test_wrong_credentials_make_the_real_store_unavailable(rgw, make_client) -> None:
    client = await make_client(bucket=rgw.make_bucket(), secret_key="not-the-secret")
    with pytest.raises(StoreUnavailable) as raised:
        await client.head_bucket()
    assert type(raised.value) is StoreUnavailable
    with pytest.raises(StoreUnavailable), translated("key"):
        await client.api.get_object(Bucket=client.bucket, Key="key")


async def test_a_missing_bucket_makes_the_real_store_unavailable(make_client) -> None:
    client = await make_client(bucket="regcache-no-such-bucket")
    with pytest.raises(StoreUnavailable, match="no bucket"):
        await client.head_bucket()


async def test_a_store_nobody_listens_on_is_unavailable() -> None:
    client = S3Client(
        S3Settings(endpoint=f"http://127.0.0.1:{closed_port()}", bucket="b", access_key="k", secret_key="s")
    )
    await client.open()
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await client.head_bucket()
    finally:
        await client.close()


@pytest.mark.parametrize("sign_payload", [False, True])
async def test_bodies_go_unsigned_unless_sign_payload_and_the_real_store_takes_both(
    rgw, make_client, sign_payload
) -> None:
    client = await make_client(bucket=rgw.make_bucket(), sign_payload=sign_payload)
    sent: list[bytes] = []
    client.api.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers["X-Amz-Content-SHA256"])
    )
    body = b"part of a blob" * 1000
    await client.api.put_object(Bucket=client.bucket, Key="blob", Body=body)
    got = await client.api.get_object(Bucket=client.bucket, Key="blob")
    assert await read_body(got, "blob") == body
    # Signed, the header is the body's SHA-256: botocore hashed every byte of it.
    assert sent == [hashlib.sha256(body).hexdigest().encode() if sign_payload else b"UNSIGNED-PAYLOAD"]


async def test_part_bodies_reach_the_http_layer_as_the_bytes_given(rgw, make_client) -> None:
    # botocore's default wraps them in a BytesIO, which aiohttp copies twice on the event loop.
    client = await make_client(bucket=rgw.make_bucket())
    bodies: list[object] = []
    client.api.meta.events.register("before-send.s3.UploadPart", lambda request, **_: bodies.append(request.body))
    part = b"x" * (5 * 1024 * 1024)
    created = await client.api.create_multipart_upload(Bucket=client.bucket, Key="blob")
    sent = await client.api.upload_part(
        Bucket=client.bucket, Key="blob", UploadId=created["UploadId"], PartNumber=1, Body=part
    )
    await client.api.complete_multipart_upload(
        Bucket=client.bucket, Key="blob", UploadId=created["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": sent["ETag"]}]},
    )
    assert len(bodies) == 1 and bodies[0] is part
    got = await client.api.get_object(Bucket=client.bucket, Key="blob")
    assert await read_body(got, "blob") == part
