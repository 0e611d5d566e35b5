#!/usr/bin/env bash
# Runs the kernel-WireGuard integration tests of lemonade-nexus-netlink inside a User-Mode Linux
# guest that has real in-kernel WireGuard (see README.md beside this file):
#
#   netlink/tests/kernel_*.rs   the kernel backend's own tests
#   netlink/tests/netns_kernel.rs  the backend-generic namespace scenario, kernel backend
#   tests/e2e_three_clients.rs  the product's scenario (serve + three agents), kernel backend
#   tests/e2e_cluster.rs        three servers: convergence, backbone, cross-server clients
#   tests/e2e_demo.rs           `lemonade-nexus demo --for 20s`
#
# The test binaries are built on the host (cargo test --no-run) and run unchanged in the guest,
# which sees the host's files through hostfs. One guest boot runs them all. Exits non-zero if any
# test fails, if the guest fails, or if no test ran at all.
#
# Env: UML_TIMEOUT (seconds for the whole guest, default 1800), UML_MEM (default 1G),
#      KERNEL_TESTS_FILTER (passed to every test binary as its name filter).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"

echo "== building the kernel test binaries"
# The JSON lines name each test executable; integration test binaries are <target>-<hash>.
BINS=$(cargo test -j2 -p lemonade-nexus-netlink --tests --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' \
    | grep -E '/(kernel_[a-z0-9_]+|netns_kernel)-[0-9a-f]+$' | sort -u || true)
if [ -z "$BINS" ]; then
    # Show the build error, if that is why.
    cargo test -j2 -p lemonade-nexus-netlink --tests --no-run >&2 || true
    echo "run-kernel-tests: no kernel test binaries were built (netlink/tests/kernel_*.rs, netns_kernel.rs)" >&2
    exit 1
fi
# The product's scenario (one server, three clients: tests/e2e_three_clients.rs) on kernel WireGuard.
# (The JSON also names the lemonade-nexus binary the test needs: pick the test executable.)
ROOT_BIN=$(cargo test -j2 --test e2e_three_clients --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' \
    | grep '/e2e_three_clients-' | head -1 || true)
if [ -z "$ROOT_BIN" ]; then
    echo "run-kernel-tests: tests/e2e_three_clients.rs did not build" >&2
    exit 1
fi
# The cluster's convergence scenario (tests/e2e_cluster.rs: three servers, their backbone, clients
# of different servers) and the backbone's own test, on kernel WireGuard. The guest runs every
# binary with the same arguments, so a wrapper picks these two tests (the partition, kill and
# revocation scenarios stay on the host: they prove gossip, not the kernel dataplane).
CLUSTER_BIN=$(cargo test -j2 --test e2e_cluster --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' \
    | grep '/e2e_cluster-' | head -1 || true)
if [ -z "$CLUSTER_BIN" ]; then
    echo "run-kernel-tests: tests/e2e_cluster.rs did not build" >&2
    exit 1
fi
CLUSTER_WRAPPER="$REPO/target/uml-e2e-cluster.sh"
cat > "$CLUSTER_WRAPPER" <<EOF
#!/usr/bin/env bash
# Written by tests/uml/run-kernel-tests.sh: the kernel-WireGuard part of tests/e2e_cluster.rs.
# A filter given to the run (KERNEL_TESTS_FILTER) replaces the default selection.
if [ \$# -gt 1 ]; then shift; exec "$CLUSTER_BIN" --test-threads=1 "\$@"; fi
exec "$CLUSTER_BIN" --test-threads=1 --exact backbone_full_mesh_and_revocation cluster_converges_and_clients_of_different_servers_talk
EOF
chmod +x "$CLUSTER_WRAPPER"
# `lemonade-nexus demo --for 20s` (tests/e2e_demo.rs) on kernel WireGuard.
DEMO_BIN=$(cargo test -j2 --test e2e_demo --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' \
    | grep '/e2e_demo-' | head -1 || true)
if [ -z "$DEMO_BIN" ]; then
    echo "run-kernel-tests: tests/e2e_demo.rs did not build" >&2
    exit 1
fi
BINS="$BINS
$ROOT_BIN
$CLUSTER_WRAPPER
$DEMO_BIN"
export LN_E2E_DATAPLANE=kernel
echo "$BINS" | sed 's|^|   |'

# Inside the guest the tests must run for real: never inherit the host run's skip switch.
unset LN_SKIP_KERNEL_WG_TESTS
LOG=$(mktemp "${TMPDIR:-/tmp}/ln-uml-tests.XXXXXX")
trap 'rm -f "$LOG"' EXIT

echo "== booting User-Mode Linux"
set +e
# shellcheck disable=SC2086 # BINS is one path per line, none with spaces
UML_TIMEOUT=${UML_TIMEOUT:-1800} UML_MEM=${UML_MEM:-1G} \
    bash "$HERE/run-in-uml.sh" --module bridge -- bash "$HERE/guest-run-tests.sh" $BINS 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
set -e

PASSED=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$LOG" | awk '{s += $4} END {print s + 0}')
FAILED=$(grep -oE '[0-9]+ failed' "$LOG" | awk '{s += $1} END {print s + 0}')
echo "== kernel tests in UML: $PASSED passed, $FAILED failed (guest exit $RC)"
if [ "$RC" != 0 ] || [ "$FAILED" != 0 ]; then
    echo "run-kernel-tests: FAILED" >&2
    exit 1
fi
if [ "$PASSED" = 0 ]; then
    echo "run-kernel-tests: no test ran inside UML; refusing to report success" >&2
    exit 1
fi
