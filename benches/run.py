#!/usr/bin/env python3
"""Runs every benchmark of the project and records the results.

    bash benches/run.sh [--quick] [--only NAME]... [--no-record]

For each benchmark listed in benches/figures.py: runs it if it exists (a `[[bench]]` entry in
Cargo.toml and its file), skips it with a note when it needs root and we are not root, and reports
it as "not yet measured" when it does not exist yet. Then turns the raw outputs of this run into
figures (figure, in-run reference, ratio, goal), appends one run record to
benches/results/history.jsonl, writes it to benches/results/latest.json, renders the dashboard
to target/bench-dashboard/index.html and refreshes the table in README.md (between its markers).

Exit status: 0 when every existing benchmark ran, 1 when one failed (the record is still written).
Python 3.11+ standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "dashboard"))

import figures as F  # noqa: E402  (the mapping, next to this file)

SCHEMA = "lemonade-nexus-bench/1"
RESULTS = REPO / "benches" / "results"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
CRITERION_DIR = TARGET / "criterion"
SUMMARY_DIR = TARGET / "bench-results"
LOG_DIR = TARGET / "bench-results" / "logs"


# ----------------------------------------------------------------------------- raw outputs


def read_criterion(root: Path, since: float = 0.0) -> dict[str, dict]:
    """Every criterion result under `root` written at or after `since` (unix time), by full id."""
    out: dict[str, dict] = {}
    if not root.is_dir():
        return out
    for est_path in root.glob("**/new/estimates.json"):
        if est_path.stat().st_mtime < since:
            continue
        bench_path = est_path.with_name("benchmark.json")
        try:
            est = json.loads(est_path.read_text())
            meta = json.loads(bench_path.read_text()) if bench_path.exists() else {}
        except (OSError, json.JSONDecodeError) as e:
            print(f"  warning: unreadable criterion output {est_path}: {e}", file=sys.stderr)
            continue
        full_id = meta.get("full_id") or str(est_path.parent.parent.relative_to(root))
        throughput = meta.get("throughput") or {}
        out[full_id] = {
            "mean_ns": (est.get("mean") or {}).get("point_estimate"),
            "median_ns": (est.get("median") or {}).get("point_estimate"),
            "elements": throughput.get("Elements"),
            "bytes": throughput.get("Bytes") or throughput.get("BytesDecimal"),
        }
    return out


def read_summaries(root: Path, since: float = 0.0) -> dict[str, object]:
    """Every target/bench-results/*.json written at or after `since`, by file stem."""
    out: dict[str, object] = {}
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*.json")):
        if path.stat().st_mtime < since:
            continue
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"  warning: unreadable summary {path}: {e}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- figures


def _check(op: str, lhs: float, rhs: float) -> bool:
    return {">=": lhs >= rhs, "<=": lhs <= rhs, "<": lhs < rhs, ">": lhs > rhs}[op]


def finite(v: float | None) -> float | None:
    """A measurement that is NaN or infinite (a bench's division by zero) is no measurement."""
    return v if v is not None and math.isfinite(v) else None


def figure_record(fig: F.Figure, raw: F.Raw) -> dict:
    """One figure of the run record: value, in-run reference, ratio, goal and verdict."""
    value = finite(fig.source(raw))
    rec: dict = {
        "id": fig.id,
        "label": fig.label,
        "value": value,
        "unit": fig.unit,
        "better": fig.better,
        "source": fig.source.__doc__ or "",
        "reference": None,
        "ratio": None,
        "ratio_label": fig.ratio_label,
        "goal": None,
        "goal_met": None,
    }
    ref_value = None
    if fig.reference:
        ref_value = finite(fig.reference.source(raw))
        rec["reference"] = {
            "label": fig.reference.label,
            "value": ref_value,
            "unit": fig.reference.unit,
            "source": fig.reference.source.__doc__ or "",
        }
        if value is not None and ref_value:
            rec["ratio"] = value / ref_value
    if fig.goal:
        g = fig.goal
        rec["goal"] = {"on": g.on, "op": g.op, "value": g.value, "text": g.text}
        if g.at_n is not None:
            rec["goal"]["at_n"] = g.at_n
        subject = rec["ratio"] if g.on == "ratio" else value
        if subject is not None:
            rec["goal_met"] = _check(g.op, subject, g.value)
    if fig.series:
        rec.update(series=fig.series, series_label=fig.series_label, n=fig.n, n_label=fig.n_label)
    if value is None:
        rec["note"] = f"not in this run's output ({rec['source']})"
    elif fig.note:
        rec["note"] = fig.note
    return rec


def used_criterion_ids(bench: F.Bench, raw: F.Raw) -> set[str]:
    """Criterion ids some figure of `bench` read (to list the others as extra results)."""
    used = set()
    for full_id in raw.criterion:
        only = F.Raw(criterion={full_id: raw.criterion[full_id]})
        for fig in bench.figures:
            sources = [fig.source] + ([fig.reference.source] if fig.reference else [])
            if any(s(only) is not None for s in sources):
                used.add(full_id)
    return used


def bench_record(bench: F.Bench, status: str, raw: F.Raw | None, note: str = "", duration: float | None = None) -> dict:
    rec = {
        "id": bench.id,
        "title": bench.title,
        "issue": bench.issue,
        "description": bench.description,
        "kind": bench.kind,
        "status": status,
        "note": note,
        "duration_s": round(duration, 1) if duration is not None else None,
        "figures": [figure_record(fig, raw or F.Raw()) for fig in bench.figures],
        "extra": [],
    }
    if raw is not None:
        used = used_criterion_ids(bench, raw)
        rec["extra"] = [
            {"id": k, "mean_ns": v["mean_ns"], "elements": v["elements"]}
            for k, v in sorted(raw.criterion.items())
            if k not in used
        ]
    if status == "measured" and all(f["value"] is None for f in rec["figures"]):
        rec["status"] = "failed"
        rec["note"] = (note + " " if note else "") + "It ran, but none of its outputs matched benches/figures.py."
    return rec


# ----------------------------------------------------------------------------- environment


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    os_name = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "os": os_name,
        "rustc": _cmd(["rustc", "-V"]),
        "hostname": platform.node(),
    }


def git_info() -> dict:
    return {
        "commit": _cmd(["git", "rev-parse", "HEAD"]) or "unknown",
        "branch": _cmd(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        "dirty": bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
    }


def existing_benches() -> set[str]:
    """Names of the `[[bench]]` entries of the root Cargo.toml whose source file exists."""
    with open(REPO / "Cargo.toml", "rb") as f:
        cargo = tomllib.load(f)
    names = set()
    for entry in cargo.get("bench", []):
        name = entry.get("name")
        path = REPO / entry.get("path", f"benches/{name}.rs")
        if name and path.exists():
            names.add(name)
    return names


# ----------------------------------------------------------------------------- running


def printed(full_id: str, log_text: str) -> bool:
    """Whether criterion's output names this benchmark id as a whole word (not as a prefix of a
    longer id: "ops/verify_apply" is not "ops/verify_apply_rows")."""
    return re.search(rf"(^|\s){re.escape(full_id)}(\s|$)", log_text, re.M) is not None


def run_bench(bench: F.Bench, quick: bool) -> tuple[bool, str, float]:
    """Runs one benchmark through cargo; returns (ok, note, seconds). Output goes to a log file."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{bench.id}.log"
    args = list(bench.quick_args if quick else bench.full_args)
    cmd = ["cargo", "bench", "-j2", "--bench", bench.id]
    if args:
        cmd += ["--", *args]
    env = dict(os.environ)
    if quick:
        env.update(bench.quick_env)
    print(f"==> {bench.id}: {' '.join(cmd)}   (log: {log.relative_to(REPO) if log.is_relative_to(REPO) else log})", flush=True)
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.time() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        print("    FAILED (exit %d); last lines:\n      %s" % (proc.returncode, "\n      ".join(tail)), flush=True)
        return False, f"cargo bench exited with status {proc.returncode}; see {log.name}", seconds
    print(f"    done in {seconds:.0f} s", flush=True)
    return True, "", seconds


def collect(quick: bool, only: list[str]) -> tuple[dict, bool]:
    """Runs the benchmarks and returns (run record, every existing benchmark ran)."""
    started = time.time()
    exists = existing_benches()
    is_root = os.geteuid() == 0
    all_ok = True
    benches = []
    for bench in F.BENCHMARKS:
        if only and bench.id not in only:
            continue
        if bench.id not in exists:
            print(f"==> {bench.id}: not yet measured (no [[bench]] entry or no benches/{bench.id}.rs)")
            benches.append(bench_record(bench, "not_yet_measured", None, "The benchmark does not exist yet."))
            continue
        if bench.root_only and not is_root:
            print(f"==> {bench.id}: SKIPPED, needs root (network namespaces / WireGuard devices)")
            benches.append(bench_record(bench, "skipped", None, "Skipped: needs root; run benches/run.sh as root."))
            continue
        # Only outputs of this benchmark's run count: its old summary is removed first (a bench may
        # merge into an existing file), and anything older than this moment is ignored.
        (SUMMARY_DIR / f"{bench.id}.json").unlink(missing_ok=True)
        since = time.time() - 1
        ok, note, seconds = run_bench(bench, quick)
        log_text = (LOG_DIR / f"{bench.id}.log").read_text(errors="replace")
        # Criterion results count only when this run printed them (someone else may be running
        # other criterion benches into the same target directory at the same time).
        crit = {k: v for k, v in read_criterion(CRITERION_DIR, since).items() if printed(k, log_text)}
        raw = F.Raw(criterion=crit, summaries=read_summaries(SUMMARY_DIR, since))
        if bench.parse_log and bench.id not in raw.summaries:
            parsed = bench.parse_log(log_text)
            if parsed is not None:
                raw.summaries[bench.id] = parsed
        rec = bench_record(bench, "measured" if ok else "failed", raw, note, seconds)
        if rec["status"] != "measured":
            all_ok = False
        benches.append(rec)
    unknown = sorted(exists - {b.id for b in F.BENCHMARKS})
    record = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "mode": "quick" if quick else "full",
        "git": git_info(),
        "machine": machine(),
        "duration_s": round(time.time() - started, 1),
        "benchmarks": benches,
        "unmapped_benches": unknown,
    }
    if unknown:
        print(f"note: benches without an entry in benches/figures.py (not run): {', '.join(unknown)}")
    return record, all_ok


def write_results(record: dict, results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
    (results / "latest.json").write_text(json.dumps(record, ensure_ascii=False, allow_nan=False, indent=2) + "\n")


def print_summary(record: dict) -> None:
    import render  # benches/dashboard/render.py

    print()
    print(render.readme_table(record))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short measurements (a few minutes on 2 cores)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this benchmark (repeatable)")
    ap.add_argument("--no-record", action="store_true", help="do not append to the history (trial runs)")
    args = ap.parse_args(argv)
    unknown = [o for o in args.only if o not in {b.id for b in F.BENCHMARKS}]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(b.id for b in F.BENCHMARKS)}")

    record, ok = collect(args.quick, args.only)
    print_summary(record)
    if args.no_record or args.only:
        out = TARGET / "bench-results" / "trial.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"trial run: record written to {out} only (history untouched)")
        return 0 if ok else 1
    write_results(record)
    print(f"recorded in {RESULTS / 'history.jsonl'} and {RESULTS / 'latest.json'}")
    subprocess.run([sys.executable, str(HERE / "dashboard" / "render.py")], cwd=REPO, check=False)
    import render  # benches/dashboard/render.py

    if render.update_readme(REPO / "README.md", record):
        print("README.md: benchmark table updated")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
