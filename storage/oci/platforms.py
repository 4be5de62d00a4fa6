"""Platforms as ``os/architecture[/variant]`` strings, and which one this machine is."""

from __future__ import annotations

import platform as host

# uname -m -> the OCI architecture (and variant) docker would pick on that machine.
_MACHINES = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm/v7", "armv6l": "arm/v6", "i386": "386", "i686": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}


def host_platform() -> str:
    machine = host.machine().lower()
    return f"linux/{_MACHINES.get(machine, machine)}"


def platform_matches(wanted: str, offered: str | None) -> bool:
    """``linux/arm64`` matches ``linux/arm64/v8``; a variant asked for must match,
    except that arm64's default variant ``v8`` also matches an index entry without one."""
    if not offered:
        return False
    want, have = wanted.split("/"), offered.split("/")
    if want[:2] != have[:2]:
        return False
    return len(want) < 3 or want[2:] == have[2:] or (want[2] == "v8" and len(have) == 2)
