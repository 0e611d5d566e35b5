#!/usr/bin/env bash
# Installs the system packages that building and running lemonade-nexus (and its `demo`) need on a
# fresh Debian 12 machine: a C compiler for `ring`, `ip`, `ping`, `kill`, `wg` and `wireguard-go`.
# Run as root. Idempotent: when every package is installed it does nothing (no `apt-get update`).
# Package names given as arguments are installed along (tests/setup-tests.sh passes the tools only
# the tests use); the test suite's own preparation is tests/setup-tests.sh, which tests/run.sh runs.
set -euo pipefail

PACKAGES=(
    gcc libc6-dev ca-certificates
    iproute2 iputils-ping procps wireguard-tools wireguard-go
    "$@"
)
MISSING=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -qx 'install ok installed' || MISSING+=("$p")
done
[ "${#MISSING[@]}" = 0 ] && exit 0

export DEBIAN_FRONTEND=noninteractive
echo "tests/setup-host.sh: installing ${MISSING[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
