#!/usr/bin/env bash
# Runs every benchmark of the project, records the results in benches/results/ and renders the
# dashboard to target/bench-dashboard/index.html. See docs/benchmarks.md.
#
#   bash benches/run.sh            # full measurements
#   bash benches/run.sh --quick    # short measurements: a few minutes on 2 cores
#
# Root-only benchmarks (WireGuard devices, network namespaces) are skipped with a note when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benches/run.py "$@"
