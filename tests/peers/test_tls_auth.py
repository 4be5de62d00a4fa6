"""HTTPS with a test CA, client authentication, and an upstream behind its own CA.

One regcache process serves the module: HTTPS with a certificate from CA "proxy",
htpasswd (bcrypt) user and a static token required for pulls, and as its upstream a real
distribution registry speaking HTTPS with a certificate from another CA, trusted only
through ``ca_bundle``. skopeo is the client, as a user would run it.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import Settings, UpstreamSettings
from proxy.app import create_app
from tests.support import skopeo
from tests.support.images import build_image
from tests.support.registry import HOST, Registry, bcrypt_hash, make_tls_files
from tests.support.seed import SeededImage, seed_upstream
from tests.support.serving import ServedRegcache

USER, PASSWORD = "puller", "correct horse battery"
TOKEN = "static-token-0123456789abcdef"
UPSTREAM_USER, UPSTREAM_PASSWORD = "mirror", "upstream-secret-pw"
REPO = "tiny/app"


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, SeededImage]]:
    work = tmp_path_factory.mktemp("tls-upstream")
    tls = make_tls_files(work / "certs")
    registry = Registry(work / "registry", tls=tls, htpasswd={UPSTREAM_USER: UPSTREAM_PASSWORD})
    with registry:
        image = build_image({"hello.txt": b"hello over tls\n"})
        seeded = seed_upstream(registry, work / "seed", images={f"{REPO}:1": image})
        yield registry, seeded[f"{REPO}:1"]


@pytest.fixture(scope="module")
def upstream_ca(tls_upstream: tuple[Registry, SeededImage]) -> Path:
    registry, _ = tls_upstream
    return registry.workdir.parent / "certs" / "ca.crt"


@pytest.fixture(scope="module")
def proxy_tls(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_tls_files(tmp_path_factory.mktemp("proxy-certs"))


@pytest.fixture(scope="module")
def secure_proxy(tls_upstream, upstream_ca, proxy_tls, tmp_path_factory) -> Iterator[ServedRegcache]:  # type: ignore[no-untyped-def]
    registry, _ = tls_upstream
    work = tmp_path_factory.mktemp("secure-proxy")
    htpasswd = work / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
    upstream = {
        "name": "secure.test",
        "url": registry.url,
        "default": True,
        "ca_bundle": str(upstream_ca),
        "username": UPSTREAM_USER,
        "password": UPSTREAM_PASSWORD,
    }
    settings = {
        "tls": {"cert": str(proxy_tls.certificate), "key": str(proxy_tls.key)},
        "auth": {"htpasswd": str(htpasswd), "tokens": [TOKEN], "realm": "regcache-test"},
    }
    server = ServedRegcache(work, [upstream], settings=settings, scheme="https")
    server.start()
    yield server
    server.stop()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_skopeo_pulls_over_tls_trusting_the_test_ca_with_credentials(secure_proxy, tls_upstream, proxy_tls, tmp_path):
    _, image = tls_upstream
    dest = tmp_path / "pulled"
    skopeo.copy(
        skopeo.docker_ref(secure_proxy.host, REPO, "1"),
        f"oci:{dest}:pulled",
        src_tls_verify=True,
        src_cert_dir=proxy_tls.ca_dir,
        src_creds=(USER, PASSWORD),
    )
    index = json.loads((dest / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.digest
    for digest in image.blob_digests:
        assert (dest / "blobs" / "sha256" / digest.split(":")[1]).is_file()


def test_client_that_does_not_trust_the_ca_is_refused(secure_proxy):
    with pytest.raises(skopeo.SkopeoError) as failure:
        skopeo.inspect(skopeo.docker_ref(secure_proxy.host, REPO, "1"), tls_verify=True, creds=(USER, PASSWORD))
    assert "certificate" in failure.value.stderr
    with pytest.raises(urllib.error.URLError) as refused:
        secure_proxy.get("/v2/", context=ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("creds", [(USER, "wrong password"), ("nobody", PASSWORD), None])
def test_wrong_or_missing_credentials_are_refused(secure_proxy, proxy_tls, creds):
    with pytest.raises(skopeo.SkopeoError) as failure:
        skopeo.inspect(
            skopeo.docker_ref(secure_proxy.host, REPO, "1"), tls_verify=True, cert_dir=proxy_tls.ca_dir, creds=creds
        )
    assert "unauthorized" in failure.value.stderr.lower() or "401" in failure.value.stderr


def test_unauthenticated_request_gets_a_basic_challenge_and_an_oci_error(secure_proxy):
    for path in ("/v2/", f"/v2/{REPO}/manifests/1", f"/v2/{REPO}/blobs/sha256:{'0' * 64}"):
        status, headers, body = secure_proxy.get(path)
        assert status == 401, path
        assert headers["WWW-Authenticate"] == 'Basic realm="regcache-test"'
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    status, _, _ = secure_proxy.get("/v2/", {"Authorization": _basic(USER, "nope")})
    assert status == 401


def test_probes_and_metrics_need_no_credentials(secure_proxy):
    assert secure_proxy.get("/healthz")[0] == 200
    assert secure_proxy.get("/readyz")[0] == 200
    status, _, body = secure_proxy.get("/metrics")
    assert status == 200
    assert b"registry_proxy_requests_total" in body


def test_static_token_is_accepted_as_bearer_and_as_basic_password(secure_proxy, proxy_tls):
    assert secure_proxy.get("/v2/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert secure_proxy.get("/v2/", {"Authorization": _basic("anyone", TOKEN)})[0] == 200
    assert secure_proxy.get("/v2/", {"Authorization": "Bearer not-the-token"})[0] == 401
    # docker login -u token -p TOKEN: what docker, containerd and skopeo can send.
    skopeo.inspect(
        skopeo.docker_ref(secure_proxy.host, REPO, "1"), tls_verify=True, cert_dir=proxy_tls.ca_dir,
        creds=("token", TOKEN),
    )


async def test_upstream_ca_is_required_unless_insecure(tls_upstream, upstream_ca, aiohttp_client, tmp_path):
    registry, image = tls_upstream

    async def status(**tls: object) -> tuple[int, str]:
        upstream = UpstreamSettings(name="secure.test", url=registry.url, default=True, retries=0,
                                    username=UPSTREAM_USER, password=UPSTREAM_PASSWORD, **tls)
        settings = Settings(data_dir=tmp_path / str(len(tls)) / str(sorted(tls)), upstreams=[upstream])
        client = await aiohttp_client(create_app(settings))
        r = await client.get(f"/v2/{REPO}/manifests/1", headers={"Accept": image.media_type})
        return r.status, r.headers.get("Docker-Content-Digest", "")

    assert (await status())[0] == 503  # the registry's CA is not a system root
    assert await status(ca_bundle=upstream_ca) == (200, image.digest)
    assert await status(insecure=True) == (200, image.digest)


def _served_certificate_issuer(port: int, ca: Path) -> bool:
    """Whether a TLS handshake with the server succeeds when trusting only ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((HOST, port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=HOST):
            return True
    except ssl.SSLCertVerificationError:
        return False


def test_sighup_reloads_the_certificate(tmp_path):
    old = make_tls_files(tmp_path / "old")
    new = make_tls_files(tmp_path / "new")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(old.certificate.read_bytes())
    live_key.write_bytes(old.key.read_bytes())
    upstream = {"name": "none.test", "url": f"http://{HOST}:9", "default": True}
    server = ServedRegcache(tmp_path / "proxy", [upstream], scheme="https",
                            settings={"tls": {"cert": str(live_cert), "key": str(live_key)}})
    with server:
        assert _served_certificate_issuer(server.port, old.ca_certificate)
        assert not _served_certificate_issuer(server.port, new.ca_certificate)
        # A broken pair (new certificate, old key) must not replace a working one.
        live_cert.write_bytes(new.certificate.read_bytes())
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "reload failed")
        assert _served_certificate_issuer(server.port, old.ca_certificate)
        live_key.write_bytes(new.key.read_bytes())
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "TLS certificate reloaded")
        assert _served_certificate_issuer(server.port, new.ca_certificate)
        assert not _served_certificate_issuer(server.port, old.ca_certificate)
        assert server.process.poll() is None


def _wait_for_log(server: ServedRegcache, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log_text()[-2000:]}"
        time.sleep(0.02)
