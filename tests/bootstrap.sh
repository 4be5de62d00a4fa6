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
# A fresh machine often runs apt already (apt-daily, cloud-init): wait for it
# rather than fail. apt-get waits for the dpkg lock itself; `update` takes the
# package lists' lock, which that timeout does not cover (apt 2.6), so it is
# retried while the lock is held and fails at once on any other error.
APT_LOCK_TIMEOUT=600
apt_update() {
  local deadline=$((SECONDS + APT_LOCK_TIMEOUT)) output
  until output=$($SUDO env LC_ALL=C apt-get update -qq 2>&1); do
    if [[ $output != *"Could not get lock"* ]] || ((SECONDS >= deadline)); then
      printf '%s\n' "$output" >&2
      return 1
    fi
    sleep 2
  done
  [[ -z $output ]] || printf '%s\n' "$output" >&2
}
apt_update
$SUDO apt-get -o DPkg::Lock::Timeout=$APT_LOCK_TIMEOUT install -y -qq --no-install-recommends \
  "${DEBIAN_PACKAGES[@]}" >/dev/null

VENV="${REGCACHE_TEST_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'

export PATH="$PWD/$VENV/bin:$PATH"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
# Two workers, each given whole test files (module-scoped peers such as a dockerd stay with
# their file); each worker starts its own session peers (upstream registry, Ceph RGW). More
# workers than cores would only make the peers' waits longer. `-n 0` runs in this process.
exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
