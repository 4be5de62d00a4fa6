"""Replica lease timing settings: a dead holder's lease lapses in seconds, a live one is renewed in time."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, load_settings


def _s3(**extra: str) -> dict[str, str]:
    environ = {"REGCACHE_STORAGE__BACKEND": "s3", "REGCACHE_STORAGE__S3__BUCKET": "regcache"}
    environ.update({f"REGCACHE_STORAGE__S3__{key.upper()}": value for key, value in extra.items()})
    return environ


def test_default_lease_lapses_in_seconds_and_is_renewed_several_times_before():
    s3 = load_settings(environ=_s3()).storage.s3
    assert s3 is not None
    assert s3.lease_ttl <= 15
    assert s3.lease_renewal * 4 <= s3.lease_ttl  # a few renewals may fail before a live holder loses it


def test_renew_interval_follows_a_configured_ttl_or_is_given():
    assert load_settings(environ=_s3(lease_ttl="30s")).storage.s3.lease_renewal == 6  # type: ignore[union-attr]
    given = load_settings(environ=_s3(lease_ttl="30s", lease_renew_interval="5s")).storage.s3
    assert given is not None and given.lease_renewal == 5


def test_renew_interval_above_half_the_ttl_is_refused_naming_the_keys():
    with pytest.raises(ConfigError, match="lease_renew_interval must be at most half of lease_ttl"):
        load_settings(environ=_s3(lease_ttl="10s", lease_renew_interval="6s"))
