#!/usr/bin/env bash
# Prepares this machine for the test suite; tests/run.sh runs it first. Installs the packages
# building and running need (tests/setup-host.sh) and the tools only the tests use (`nc`, `nft`,
# Python and headless Chromium for the dashboard test, `cargo nextest`), then prepares the
# User-Mode Linux guest the kernel-WireGuard tests run in (tests/uml/setup.sh, cached under
# /var/cache/lemonade-nexus/uml: the first time about 30 s plus a 138 MB download, or about 7
# minutes where it builds its own guest kernel; a few seconds afterwards). Run as root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup-host.sh netcat-openbsd nftables python3 chromium
# The test runner tests/run.sh uses (a few minutes to build, once).
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
bash tests/uml/setup.sh
