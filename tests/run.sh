#!/usr/bin/env bash
# The project's whole test suite: formatting, lints, every unit, property and integration test
# (the network-namespace tests need root), and the kernel-WireGuard tests inside User-Mode Linux.
# Run as root. It first prepares what only the tests need (tests/setup-tests.sh: test tools and the
# User-Mode Linux guest; cached, a few seconds once done).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup-tests.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets -j2 -- -D warnings
LN_SKIP_KERNEL_WG_TESTS=1 cargo nextest run --workspace -j2 --no-fail-fast  # kernel-WireGuard tests run in UML below
python3 benches/dashboard/test_dashboard.py   # benchmark harness + dashboard in headless Chromium
bash tests/uml/run-kernel-tests.sh   # kernel-WireGuard tests in User-Mode Linux; fails if none ran
