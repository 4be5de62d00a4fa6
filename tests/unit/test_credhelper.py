"""``credential_helper``: a fake ``docker-credential-fake`` on PATH, run for real.

The fake answers with a password that counts its runs (``secret-1``, ``secret-2``, ...), or fails
with a secret on stderr and stdout when told to, so each test sees when the helper ran and that
its output never reaches an error message or a log.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from config.settings import UpstreamSettings
from proxy.errors import CredentialHelperFailed
from proxy.http.errors import oci_code
from proxy.upstream.auth import UpstreamAuth
from proxy.upstream.credhelper import CredentialHelper

HELPER = """#!/bin/sh
read server
echo "$server" >> "{dir}/servers"
if [ -e "{dir}/fail" ]; then
  echo "LEAKED-SECRET-STDERR" >&2
  echo "LEAKED-SECRET-STDOUT"
  exit 3
fi
n=$(( $(cat "{dir}/count" 2>/dev/null || echo 0) + 1 ))
echo $n > "{dir}/count"
printf '{{"ServerURL":"%s","Username":"AWS","Secret":"secret-%s"}}' "$server" "$n"
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def helper_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    program = tmp_path / "docker-credential-fake"
    program.write_text(HELPER.format(dir=tmp_path))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return tmp_path


async def test_success_gives_the_helpers_answer_for_the_upstreams_host(helper_dir: Path) -> None:
    helper = CredentialHelper("ecr", "fake", "123.dkr.example:443", ttl=600)
    assert await helper.get() == ("AWS", "secret-1")
    assert await helper.get() == ("AWS", "secret-1")  # used again, not run again
    assert (helper_dir / "servers").read_text() == "123.dkr.example:443\n"


async def test_refreshes_before_expiry_and_keeps_a_valid_answer_when_a_refresh_fails(
    helper_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    helper = CredentialHelper("ecr", "fake", "host", ttl=100, clock=clock)
    assert await helper.get() == ("AWS", "secret-1")
    clock.now += 79
    assert await helper.get() == ("AWS", "secret-1")
    clock.now += 2  # past 80 % of the ttl: refreshed before it expires
    assert await helper.get() == ("AWS", "secret-2")
    (helper_dir / "fail").touch()
    clock.now += 85  # refresh due, and failing: the answer of 85 s ago is still valid
    with caplog.at_level(logging.WARNING):
        assert await helper.get() == ("AWS", "secret-2")
    clock.now += 20  # now expired, and the helper still fails
    with pytest.raises(CredentialHelperFailed):
        await helper.get()
    (helper_dir / "fail").unlink()
    assert await helper.get() == ("AWS", "secret-3")
    assert "LEAKED" not in caplog.text


async def test_failure_is_503_naming_the_upstream_and_never_the_helpers_output(helper_dir: Path) -> None:
    (helper_dir / "fail").touch()
    helper = CredentialHelper("ecr.example", "fake", "host", ttl=600)
    with pytest.raises(CredentialHelperFailed) as raised:
        await helper.get()
    assert oci_code(raised.value) == ("UNAVAILABLE", 503)
    assert "upstream ecr.example" in raised.value.message and "exit status 3" in raised.value.message
    assert "LEAKED" not in raised.value.message


async def test_a_helper_not_on_path_is_a_clear_failure(helper_dir: Path) -> None:
    helper = CredentialHelper("ecr.example", "absent", "host", ttl=600)
    with pytest.raises(CredentialHelperFailed, match="docker-credential-absent could not be run"):
        await helper.get()


async def test_an_upstream_refusal_makes_the_next_use_ask_the_helper_again(helper_dir: Path) -> None:
    async def no_token(url, authorization):  # type: ignore[no-untyped-def]
        raise AssertionError("no token realm in this test")

    settings = UpstreamSettings(name="ecr.example", url="https://ecr.example", credential_helper="fake")
    auth = UpstreamAuth(settings, no_token)
    first = await auth.answer('Basic realm="ecr"', "repository:a:pull")
    assert first is not None and await auth.known("repository:a:pull") == first
    auth.forget(first, "repository:a:pull")  # the upstream answered 401 to it
    second = await auth.answer('Basic realm="ecr"', "repository:a:pull")
    assert second is not None and second != first
    assert (helper_dir / "count").read_text().strip() == "2"
