#!/usr/bin/env bash
# Installs every system package the build and the tests need on a fresh Debian 12 machine, and
# prepares the User-Mode Linux guest that runs the kernel-WireGuard tests. Run as root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    gcc make pkg-config ca-certificates \
    iproute2 iputils-ping nftables netcat-openbsd procps \
    wireguard-tools wireguard-go python3 chromium \
    >/dev/null

if [ -x tests/uml/setup.sh ]; then
    bash tests/uml/setup.sh
fi
