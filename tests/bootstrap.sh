#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (as root,
# or through sudo), then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests drive (see tests/support/): the distribution registry as
# upstream, skopeo/dockerd/containerd/podman as clients, busybox for a runnable
# image, iproute2 for loopback-only network namespaces.
DEBIAN_PACKAGES=(
  python3 python3-venv python3-pip ca-certificates
  docker-registry skopeo busybox-static
  docker.io containerd runc podman crun conmon uidmap slirp4netns catatonit
  iproute2 procps
  nginx-light wrk hey curl
  radosgw ceph-mon ceph-osd ceph-mgr
)

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${DEBIAN_PACKAGES[@]}" >/dev/null

VENV="${REGCACHE_TEST_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'

export PATH="$PWD/$VENV/bin:$PATH"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest "$@"
