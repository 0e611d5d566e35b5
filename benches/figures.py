"""The one place that says what every benchmark measures and how its raw output becomes figures.

`benches/run.py` runs the benchmarks listed in BENCHMARKS and turns their raw outputs into figures
with the sources below; the dashboard and the README table only read the resulting records. To add a
benchmark: add its `[[bench]]` to Cargo.toml, then a `Bench(...)` entry here.

Raw outputs, per benchmark run:
- criterion: `target/criterion/**/new/estimates.json` (+ `benchmark.json`), indexed by criterion's
  full id ("group/function/parameter"), e.g. "ops/verify_apply".
- summaries: `target/bench-results/<file>.json`, written by benches that count things (messages,
  bytes) or that time work criterion cannot (whole processes, root-only kernel work); or, for a
  bench that only prints such a table, what its `parse_log` makes of its output.

Every figure is measured beside an in-run reference (same machine, same run) and reported with the
ratio figure / reference. A goal, where an issue states one, applies either to that ratio
(`on="ratio"`) or to the figure itself (`on="value"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

# ----------------------------------------------------------------------------- raw outputs


@dataclass
class Raw:
    """What one benchmark run left behind (only outputs written during that run)."""

    # criterion full id -> {"mean_ns", "median_ns", "elements", "bytes"}
    criterion: dict[str, dict] = field(default_factory=dict)
    # summary file name (without .json) -> parsed JSON
    summaries: dict[str, object] = field(default_factory=dict)


Source = Callable[[Raw], Optional[float]]


def crit_rate(full_id: str, per_iter: float | None = None, stat: str = "mean_ns") -> Source:
    """Items per second of a criterion benchmark: its Throughput::Elements (or `per_iter`) / time."""

    def get(raw: Raw) -> Optional[float]:
        r = raw.criterion.get(full_id)
        if not r or not r.get(stat):
            return None
        n = per_iter if per_iter is not None else (r.get("elements") or 1)
        return n / (r[stat] * 1e-9)

    get.__doc__ = f"criterion {full_id}: items/s"
    return get


def crit_time(full_id: str, unit: str = "ms", stat: str = "mean_ns") -> Source:
    """Time per iteration of a criterion benchmark, in `unit` (ns, us, ms, s)."""
    div = {"ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}[unit]

    def get(raw: Raw) -> Optional[float]:
        r = raw.criterion.get(full_id)
        if not r or r.get(stat) is None:
            return None
        return r[stat] / div

    get.__doc__ = f"criterion {full_id}: time per iteration ({unit})"
    return get


def summary(file: str, *path: str | int, scale: float = 1.0) -> Source:
    """A number inside target/bench-results/<file>.json, found by keys/indices; times `scale`."""

    def get(raw: Raw) -> Optional[float]:
        node = raw.summaries.get(file)
        for key in path:
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
                node = node[key]
            else:
                return None
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            return None
        return float(node) * scale

    get.__doc__ = f"target/bench-results/{file}.json: {'.'.join(map(str, path))}"
    return get


def summary_row(file: str, list_key: str, match: dict, value_key: str, scale: float = 1.0) -> Source:
    """A number in the row of a list (summary[list_key]) whose fields equal `match`."""

    def get(raw: Raw) -> Optional[float]:
        node = raw.summaries.get(file)
        rows = node.get(list_key) if isinstance(node, dict) else None
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and all(row.get(k) == v for k, v in match.items()):
                v = row.get(value_key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return float(v) * scale
        return None

    get.__doc__ = f"target/bench-results/{file}.json: {list_key}[{match}].{value_key}"
    return get


# ----------------------------------------------------------------------------- figure specs


@dataclass
class Goal:
    on: str  # "ratio" (figure / reference) or "value" (the figure itself, in its unit)
    op: str  # ">=", "<=", "<", ">"
    value: float
    text: str  # how a person says it: "≥ 70% of raw verify rate"
    at_n: Optional[int] = None  # for a series: the N the goal is stated for (None: every N)


@dataclass
class Reference:
    label: str
    source: Source
    unit: str


@dataclass
class Figure:
    id: str  # stable across runs: the trend charts join runs on it
    label: str
    unit: str
    better: str  # "higher" or "lower"
    source: Source
    reference: Optional[Reference] = None
    goal: Optional[Goal] = None
    ratio_label: str = ""  # what the ratio means, e.g. "of the raw verify rate"
    note: str = ""
    # A point of a scaling series (cost against N): figures sharing `series` form one curve.
    series: Optional[str] = None
    series_label: str = ""
    n: Optional[int] = None
    n_label: str = "N"


@dataclass
class Bench:
    id: str  # the cargo bench name (benches/<id>.rs, [[bench]] name = "<id>")
    title: str
    issue: int
    description: str
    figures: list[Figure]
    kind: str = "criterion"  # "criterion" or "main" (a plain main that writes a summary)
    root_only: bool = False
    # Extra command-line arguments for the bench binary (after `--`), per mode.
    quick_args: tuple[str, ...] = ()
    full_args: tuple[str, ...] = ()
    # Environment for the bench, per mode (plain-main benches read their own knobs).
    quick_env: dict[str, str] = field(default_factory=dict)
    # For a bench that prints a table instead of writing a summary: turns its output (the log)
    # into the summary it would have written (used only when there is no such summary file).
    parse_log: Optional[Callable[[str], Optional[dict]]] = None


# Quick mode: short warm-up and measurement, 10 samples. Not criterion's own `--quick`, which
# skips the warm-up and stops after a handful of iterations: the first benchmark of a run then
# measures a cold CPU (a raw-verify reference 40% low made the verify+apply ratio read 1.7).
CRITERION_QUICK = ("--warm-up-time", "1", "--measurement-time", "2", "--sample-size", "10", "--noplot")
CRITERION_FULL = ("--noplot",)


def series(
    prefix: str,
    ns: tuple[int, ...],
    *,
    label: str,
    unit: str,
    better: str,
    source: Callable[[int], Source],
    reference: Optional[Callable[[int], Reference]] = None,
    goal: Optional[Goal] = None,
    ratio_label: str = "",
    n_label: str = "N",
    note: str = "",
) -> list[Figure]:
    """The same figure at several N: one Figure per N, id "<prefix>.n<N>"."""
    return [
        Figure(
            id=f"{prefix}.n{n}",
            label=f"{label}, N = {n:,}",
            unit=unit,
            better=better,
            source=source(n),
            reference=reference(n) if reference else None,
            goal=goal if goal is None or goal.at_n in (None, n) else None,
            ratio_label=ratio_label,
            note=note,
            series=prefix,
            series_label=label,
            n=n,
            n_label=n_label,
        )
        for n in ns
    ]


# ----------------------------------------------------------------------------- log parsers


def parse_encode_sizes(log: str) -> Optional[dict]:
    """netlink_encode prints, per N, the packed encoder's messages and bytes and the
    one-peer-per-message encoder's:  `   1000 |    12    45678 |    1000    56789 |   83.3x`."""
    import re

    rows = []
    for m in re.finditer(r"^\s*(\d+)\s*\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s+(\d+)\s*\|", log, re.M):
        n, pm, pb, om, ob = (int(x) for x in m.groups())
        rows.append({"peers": n, "messages": pm, "bytes": pb, "one_per_message_messages": om, "one_per_message_bytes": ob})
    return {"rows": rows} if rows else None


def parse_join_latency(log: str) -> Optional[dict]:
    """api_join prints `api/join64 latency over 2560 joins: p50 1.23 ms, p99 4.56 ms`."""
    import re

    m = re.search(r"latency over (\d+) joins: p50 ([\d.]+) ms, p99 ([\d.]+) ms", log)
    if not m:
        return None
    return {"joins": int(m.group(1)), "p50_ms": float(m.group(2)), "p99_ms": float(m.group(3))}


# ----------------------------------------------------------------------------- the benchmarks

PEER_NS = (1_000, 10_000, 50_000)

BENCHMARKS: list[Bench] = [
    Bench(
        id="state_ops",
        title="Signed op log: verify, apply, commit",
        issue=2,
        description=(
            "Signed ops verified (Ed25519) and folded into the state on one core, against the raw "
            "Ed25519 verification rate of the same run; and ops committed to redb with several ops "
            "per write transaction against one op per transaction."
        ),
        figures=[
            Figure(
                id="state_ops.verify_apply",
                label="Signed ops verified and applied (one core)",
                unit="ops/s",
                better="higher",
                source=crit_rate("ops/verify_apply"),
                reference=Reference("raw Ed25519 verify", crit_rate("ops/raw_ed25519_verify"), "verifies/s"),
                goal=Goal("ratio", ">=", 0.70, "≥ 70% of the raw verify rate"),
                ratio_label="of the raw Ed25519 verify rate",
            ),
            Figure(
                id="state_ops.verify_apply_rows",
                label="Signed ops verified, applied and turned into state rows",
                unit="ops/s",
                better="higher",
                source=crit_rate("ops/verify_apply_rows"),
                reference=Reference("raw Ed25519 verify", crit_rate("ops/raw_ed25519_verify"), "verifies/s"),
                ratio_label="of the raw Ed25519 verify rate",
                note="All the CPU work of committing an op except redb itself.",
            ),
            Figure(
                id="state_ops.redb_grouped",
                label="Ops committed to redb, grouped transactions",
                unit="ops/s",
                better="higher",
                source=crit_rate("redb/commit_grouped"),
                reference=Reference("one op per transaction", crit_rate("redb/commit_single"), "ops/s"),
                ratio_label="the rate with one op per transaction",
            ),
            Figure(
                id="state_ops.redb_single",
                label="Ops committed to redb, one op per transaction (fsync each)",
                unit="ops/s",
                better="higher",
                source=crit_rate("redb/commit_single"),
                reference=Reference("bare redb commit of one 300-byte row", crit_rate("redb/raw_commit_single"), "commits/s"),
                ratio_label="of the bare redb commit rate",
            ),
            Figure(
                id="state_ops.late_arrival_refold",
                label="A late-arriving op into a 4,096-op log (full refold)",
                unit="ms",
                better="lower",
                source=crit_time("redb/late_arrival_refold_4k", "ms"),
                reference=Reference("an in-order op, one per transaction", crit_time("redb/commit_single", "ms"), "ms"),
                ratio_label="of an in-order op's commit time",
                note="An op that sorts before everything already folded makes the store rebuild the state from the log.",
            ),
            Figure(
                id="state_ops.late_arrival_replay",
                label="A slightly late op into a 4,096-op log (undo + replay)",
                unit="ms",
                better="lower",
                source=crit_time("redb/late_arrival_replay_4k", "ms"),
                reference=Reference("an in-order op, one per transaction", crit_time("redb/commit_single", "ms"), "ms"),
                ratio_label="of an in-order op's commit time",
                note="The common case of a late op: it sorts just behind the newest, so only the tail is undone and replayed.",
            ),
        ],
        quick_args=CRITERION_QUICK,
        full_args=CRITERION_FULL,
    ),
    Bench(
        id="state_ipam",
        title="IPAM: tunnel address allocation",
        issue=2,
        description=(
            "Tunnel address allocations per second with 100,000 addresses already allocated: choose "
            "the free slot and apply the signed AllocateAddress op (authorization, invariants, lease "
            "and indexes), against one insert + remove in a 100k-entry BTreeMap in the same run (the "
            "floor cost of touching one ordered index)."
        ),
        figures=[
            Figure(
                id="state_ipam.alloc_100k",
                label="Tunnel address allocations with 100k allocated",
                unit="allocs/s",
                better="higher",
                source=crit_rate("ipam/propose_apply"),
                reference=Reference(
                    "BTreeMap insert + remove (100k entries)", crit_rate("ipam/reference_btreemap_insert_remove"), "ops/s"
                ),
                ratio_label="of the BTreeMap insert + remove rate",
            ),
            Figure(
                id="state_ipam.propose_100k",
                label="Free-slot proposals with 100k allocated (choice only, no apply)",
                unit="proposals/s",
                better="higher",
                source=crit_rate("ipam/propose"),
                reference=Reference(
                    "BTreeMap insert + remove (100k entries)", crit_rate("ipam/reference_btreemap_insert_remove"), "ops/s"
                ),
                ratio_label="of the BTreeMap insert + remove rate",
            ),
        ],
        quick_args=CRITERION_QUICK,
        full_args=CRITERION_FULL,
    ),
    Bench(
        id="netlink_encode",
        title="Kernel encoder: netlink messages for N peers",
        issue=3,
        description=(
            "Messages and bytes the kernel backend's encoder needs to program N peers (split at the "
            "message budget), against a one-peer-per-message encoder (what wgctrl-go and defguard do), "
            "and the encoder's own speed."
        ),
        figures=[
            *series(
                "netlink_encode.messages",
                PEER_NS,
                label="Netlink messages to program N peers",
                unit="messages",
                better="lower",
                source=lambda n: summary_row("netlink_encode", "rows", {"peers": n}, "messages"),
                reference=lambda n: Reference(
                    "one peer per message", summary_row("netlink_encode", "rows", {"peers": n}, "one_per_message_messages"), "messages"
                ),
                ratio_label="of one-peer-per-message",
                n_label="peers (N)",
            ),
            *series(
                "netlink_encode.bytes",
                PEER_NS,
                label="Netlink bytes to program N peers",
                unit="KiB",
                better="lower",
                source=lambda n: summary_row("netlink_encode", "rows", {"peers": n}, "bytes", scale=1 / 1024),
                reference=lambda n: Reference(
                    "one peer per message",
                    summary_row("netlink_encode", "rows", {"peers": n}, "one_per_message_bytes", scale=1 / 1024),
                    "KiB",
                ),
                ratio_label="of one-peer-per-message",
                n_label="peers (N)",
            ),
            *series(
                "netlink_encode.encode_time",
                PEER_NS,
                label="Time to encode N peers (packed, 4 KiB messages)",
                unit="ms",
                better="lower",
                source=lambda n: crit_time(f"encode_full_config/packed_4KiB/{n}", "ms"),
                reference=lambda n: Reference(
                    "one-peer-per-message encoder", crit_time(f"encode_full_config/one_peer_per_message/{n}", "ms"), "ms"
                ),
                ratio_label="of the one-peer-per-message encoder's time",
                n_label="peers (N)",
            ),
            *series(
                "netlink_encode.incremental_endpoint",
                PEER_NS,
                label="Compute and encode one endpoint change on N peers",
                unit="µs",
                better="lower",
                source=lambda n: crit_time(f"incremental_change/change_one_endpoint/{n}", "us"),
                reference=lambda n: Reference(
                    "whole-device diff", crit_time(f"incremental_change/whole_device_diff_one_endpoint/{n}", "us"), "µs"
                ),
                ratio_label="of a whole-device diff",
                n_label="peers on the device (N)",
                note="Should stay flat in N: the controller diffs only the changed peer.",
            ),
            *series(
                "netlink_encode.dump_merge",
                PEER_NS,
                label="Decode and merge a GET_DEVICE dump of N peers",
                unit="ms",
                better="lower",
                source=lambda n: crit_time(f"decode_and_merge_dump/peers/{n}", "ms"),
                reference=lambda n: Reference(
                    "encoding the same N peers (packed)", crit_time(f"encode_full_config/packed_4KiB/{n}", "ms"), "ms"
                ),
                ratio_label="of the encode time for the same N",
                n_label="peers (N)",
            ),
        ],
        quick_args=CRITERION_QUICK,
        full_args=CRITERION_FULL,
        parse_log=parse_encode_sizes,
    ),
    Bench(
        id="netlink_setconf",
        title="Programming N peers: ours against wg setconf",
        issue=3,
        kind="main",
        root_only=True,
        description=(
            "Time to program N peers into an empty device through our crate, against `wg setconf` of "
            "the same configuration on the same backend in the same run (goal: no slower than "
            "wireguard-tools); and one incremental change on a device that already has N peers "
            "(goal: flat in N, under 2 ms at 50,000)."
        ),
        figures=[
            *[
                fig
                for backend, what in (
                    ("userspace", "userspace backend (wireguard-go)"),
                    ("kernel", "kernel backend (User-Mode Linux)"),
                )
                for fig in series(
                    f"netlink_setconf.{backend}_program",
                    PEER_NS,
                    label=f"Program N peers, {what}",
                    unit="ms",
                    better="lower",
                    source=lambda n, b=backend: summary_row("netlink_setconf", "rows", {"backend": b, "peers": n}, "ours_ms"),
                    reference=lambda n, b=backend: Reference(
                        "wg setconf", summary_row("netlink_setconf", "rows", {"backend": b, "peers": n}, "wg_setconf_ms"), "ms"
                    ),
                    goal=Goal("ratio", "<=", 1.0, "≤ 1.0× wg setconf"),
                    ratio_label="of the wg setconf time",
                    n_label="peers (N)",
                )
            ],
            *[
                fig
                for backend, what in (("userspace", "userspace backend"), ("kernel", "kernel backend (UML)"))
                for fig in series(
                    f"netlink_setconf.{backend}_incremental",
                    PEER_NS,
                    label=f"One incremental change on N peers, {what}",
                    unit="ms",
                    better="lower",
                    source=lambda n, b=backend: summary_row("netlink_setconf", "rows", {"backend": b, "peers": n}, "incremental_ms"),
                    reference=lambda n, b=backend: Reference(
                        "full reconcile (dump N + diff)",
                        summary_row("netlink_setconf", "rows", {"backend": b, "peers": n}, "reconcile_add_ms"),
                        "ms",
                    ),
                    goal=Goal("value", "<", 2.0, "< 2 ms at N = 50,000", at_n=50_000),
                    ratio_label="of a full reconcile's time",
                    n_label="peers on the device (N)",
                    note="The slowest of three one-peer changes (add, remove, change endpoint), median of repeats.",
                )
            ],
        ],
        quick_env={"LEMONADE_BENCH_QUICK": "1"},
    ),
    Bench(
        id="api_join",
        title="Joins: 64 concurrent clients against one server",
        issue=4,
        description=(
            "Joins per second and join latency with 64 joins in flight against one server, through "
            "the real API handlers (proof check, join plan, one redb commit per join, token), "
            "against GET /api/health throughput in the same run. Goal on 2 cores: ≥ 1,000 joins/s, "
            "p99 < 50 ms. Not yet the issue's full path: no TLS, no TCP, no WireGuard peer "
            "programming (the benchmark's service runs without a dataplane)."
        ),
        figures=[
            Figure(
                id="api_join.joins_per_s",
                label="Joins per second (64 in flight)",
                unit="joins/s",
                better="higher",
                source=crit_rate("api/join64"),
                reference=Reference("GET /api/health", crit_rate("api/health"), "requests/s"),
                goal=Goal("value", ">=", 1000, "≥ 1,000 joins/s"),
                ratio_label="of the /api/health request rate",
                note="Handlers only: no TLS, TCP or WireGuard programming yet.",
            ),
            Figure(
                id="api_join.p99_ms",
                label="Join latency p99 (64 in flight)",
                unit="ms",
                better="lower",
                source=summary("api_join", "p99_ms"),
                reference=Reference("join latency p50", summary("api_join", "p50_ms"), "ms"),
                goal=Goal("value", "<", 50, "p99 < 50 ms"),
                ratio_label="of the p50 latency",
                note="Over every join of every measured batch.",
            ),
        ],
        quick_args=CRITERION_QUICK,
        full_args=CRITERION_FULL,
        parse_log=parse_join_latency,
    ),
    Bench(
        id="api_join_wg",
        title="Joins, full server path: 64 concurrent clients, WireGuard peers programmed",
        issue=4,
        kind="main",
        root_only=True,
        description=(
            "The real `lemonade-nexus serve` with the userspace WireGuard dataplane (wireguard-go) in "
            "a network namespace; 64 clients join at once over HTTPS (pinned client: one TLS handshake "
            "per request, then 64 kept-alive connections) and each answer waits until the peer is programmed (peer_programmed: true; "
            "`wg show` lists every joined device at the end). Against GET /api/health over the same "
            "TLS path, 64 in flight, in the same run. Goal on 2 cores: ≥ 1,000 joins/s, p99 < 50 ms."
        ),
        figures=[
            Figure(
                id="api_join_wg.joins_per_s",
                label="Joins per second, full path (64 in flight)",
                unit="joins/s",
                better="higher",
                source=summary("api_join_wg", "joins_per_s"),
                reference=Reference("GET /api/health over TLS (64 in flight)", summary("api_join_wg", "health64_per_s"), "requests/s"),
                goal=Goal("value", ">=", 1000, "≥ 1,000 joins/s"),
                ratio_label="of the /api/health request rate",
                note="TLS, TCP and wireguard-go peer programming included; client and server share 2 cores.",
            ),
            Figure(
                id="api_join_wg.p99_ms",
                label="Join latency p99, full path (64 in flight)",
                unit="ms",
                better="lower",
                source=summary("api_join_wg", "p99_ms"),
                reference=Reference("join latency p50", summary("api_join_wg", "p50_ms"), "ms"),
                goal=Goal("value", "<", 50, "p99 < 50 ms"),
                ratio_label="of the p50 latency",
                note="Over every join of every batch; each answer waited for its WireGuard peer.",
            ),
            Figure(
                id="api_join_wg.keepalive_joins_per_s",
                label="Joins per second, full path, 64 kept-alive connections",
                unit="joins/s",
                better="higher",
                source=summary("api_join_wg", "keepalive_joins_per_s"),
                reference=Reference("GET /api/health, 64 kept-alive connections", summary("api_join_wg", "health64_keepalive_per_s"), "requests/s"),
                goal=Goal("value", ">=", 1000, "≥ 1,000 joins/s"),
                ratio_label="of the kept-alive /api/health request rate",
                note="64 load generators, each joining a fresh device per round over one HTTPS connection (a device joins once; no client-side handshake per join on the shared cores).",
            ),
            Figure(
                id="api_join_wg.keepalive_p99_ms",
                label="Join latency p99, full path, 64 kept-alive connections",
                unit="ms",
                better="lower",
                source=summary("api_join_wg", "keepalive_p99_ms"),
                reference=Reference("join latency p50", summary("api_join_wg", "keepalive_p50_ms"), "ms"),
                goal=Goal("value", "<", 50, "p99 < 50 ms"),
                ratio_label="of the p50 latency",
                note="Each answer waited for its WireGuard peer.",
            ),
        ],
        quick_env={"LEMONADE_BENCH_QUICK": "1"},
    ),
    Bench(
        id="gossip_convergence",
        title="Gossip: time for an op to reach every server",
        issue=5,
        kind="main",
        root_only=False,
        description=(
            "Time for one op to reach all N servers (p50, p99) and UDP bytes sent per server per op, "
            "for the default push (ops packed into QUIC datagrams, sent to every peer) against a naive "
            "baseline in the same run (one reliable QUIC stream per op per peer), and the epidemic "
            "fanout alternative. Every server is its own process with its own redb store and real QUIC "
            "on 127.0.0.1 (no WireGuard); times on CLOCK_MONOTONIC from the origin's commit to the last "
            "server's commit. Goal: p99 under 1 s at N = 30."
        ),
        figures=[
            *series(
                "gossip_convergence.p99",
                (3, 10, 30),
                label="Op reaches all N servers, p99",
                unit="ms",
                better="lower",
                source=lambda n: summary_row("gossip_convergence", "rows", {"servers": n}, "p99_ms"),
                reference=lambda n: Reference(
                    "naive send-to-everyone", summary_row("gossip_convergence", "rows", {"servers": n}, "naive_p99_ms"), "ms"
                ),
                goal=Goal("value", "<", 1000, "p99 < 1 s at N = 30", at_n=30),
                ratio_label="of the naive baseline's p99",
                n_label="servers (N)",
            ),
            *series(
                "gossip_convergence.p50",
                (3, 10, 30),
                label="Op reaches all N servers, p50",
                unit="ms",
                better="lower",
                source=lambda n: summary_row("gossip_convergence", "rows", {"servers": n}, "p50_ms"),
                reference=lambda n: Reference(
                    "naive send-to-everyone", summary_row("gossip_convergence", "rows", {"servers": n}, "naive_p50_ms"), "ms"
                ),
                ratio_label="of the naive baseline's p50",
                n_label="servers (N)",
            ),
            *series(
                "gossip_convergence.fanout_p99",
                (3, 10, 30),
                label="Op reaches all N servers, p99, epidemic fanout (k = 4)",
                unit="ms",
                better="lower",
                source=lambda n: summary_row("gossip_convergence", "rows", {"servers": n}, "fanout_p99_ms"),
                reference=lambda n: Reference(
                    "default push (send to all)", summary_row("gossip_convergence", "rows", {"servers": n}, "p99_ms"), "ms"
                ),
                ratio_label="of the default strategy's p99",
                n_label="servers (N)",
            ),
            *series(
                "gossip_convergence.bytes",
                (3, 10, 30),
                label="UDP bytes sent per server per op (all gossip traffic)",
                unit="bytes",
                better="lower",
                source=lambda n: summary_row("gossip_convergence", "rows", {"servers": n}, "bytes_per_server_per_op"),
                reference=lambda n: Reference(
                    "naive send-to-everyone",
                    summary_row("gossip_convergence", "rows", {"servers": n}, "naive_bytes_per_server_per_op"),
                    "bytes",
                ),
                ratio_label="of the naive baseline's bytes",
                n_label="servers (N)",
                note="quinn's udp_tx bytes of every gossip connection during the measured window (QUIC "
                "overhead, ACKs, SWIM, anti-entropy and keep-alives included), / N / ops.",
            ),
        ],
        quick_env={"LEMONADE_BENCH_QUICK": "1"},
    ),
]
