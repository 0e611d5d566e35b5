#!/usr/bin/env bash
# Runs inside the UML guest (started by run-kernel-tests.sh): checks that the kernel really has
# WireGuard, then runs each test binary given as an argument, from the crate's directory (as cargo
# would), one test at a time. Exits non-zero if the check or any binary fails.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../netlink" || exit 125

echo "guest kernel $(uname -r)"
if ! ip link add lnprobe0 type wireguard 2>/dev/null; then
    echo "guest-run-tests: this kernel cannot create a wireguard link" >&2
    exit 1
fi
ip link del lnprobe0

rc=0
for bin in "$@"; do
    echo "---- $(basename "$bin")"
    # shellcheck disable=SC2086 # an optional filter word
    "$bin" --test-threads=1 ${KERNEL_TESTS_FILTER:-} || rc=1
done
exit $rc
