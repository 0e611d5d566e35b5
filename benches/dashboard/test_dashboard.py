#!/usr/bin/env python3
"""Tests of the benchmark harness and dashboard (Python 3 standard library + Debian's `chromium`).

    python3 benches/dashboard/test_dashboard.py

Renders the dashboard from the committed sample results (sample-history.jsonl, four recorded runs)
and loads it in headless Chromium: fails on any console message (errors, CSP violations from a
network load) and on any chart that was not drawn. Negative controls prove those checks can fail.
Also tests the mapping of raw benchmark outputs to figures and the history file. Ends with a line
"N passed, M failed"; exit status 1 when any test failed. Chromium missing is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from html.parser import HTMLParser
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import render  # noqa: E402
import run  # noqa: E402  (benches/run.py)
import figures as F  # noqa: E402

SAMPLE = HERE / "sample-history.jsonl"
# Charts the sample's latest run must produce, counted by hand from the sample:
#   state_ops: 2 figures x (bars + trend) = 4; state_ipam: 1 x (bars + trend) = 2;
#   netlink_encode: 2 series x (curve + trend) = 4; netlink_setconf: userspace program and
#   incremental series x (curve + trend) = 4, kernel series unmeasured = 0; join_load and
#   gossip_convergence unmeasured = 0.
SAMPLE_CHARTS = 14


# ----------------------------------------------------------------------------- chromium


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("headless Chromium not found: install Debian's `chromium` (tests/setup-host.sh does)")


def load_in_chromium(html_path: Path) -> tuple[str, list[str]]:
    """Loads a page from disk in headless Chromium; returns (DOM after scripts ran, console lines)."""
    profile = tempfile.mkdtemp(prefix="dash-chromium-")
    try:
        proc = subprocess.run(
            [
                chromium_binary(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=3000",
                "--dump-dom",
                html_path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    # Chromium logs every console message of the page (any level) as ":CONSOLE(" / ":CONSOLE:" lines.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise AssertionError(f"chromium failed (status {proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout, console


class _ChartScan(HTMLParser):
    """Collects the chart elements (class "chart"), their marks, the <svg> count and <body> attrs."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[str] = []
        self.svgs = 0
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        elif tag == "svg":
            self.svgs += 1
        elif tag == "div" and "chart" in (a.get("class") or "").split():
            self.marks.append(a.get("data-rendered") or "missing")


def chart_report(dom: str) -> dict:
    """What the page's script left in the DOM: chart marks and the counters on <body>."""
    scan = _ChartScan()
    scan.feed(dom)
    return {
        "charts": len(scan.marks),
        "ok": scan.marks.count("ok"),
        "error": scan.marks.count("error"),
        "unmarked": scan.marks.count("missing"),
        "svgs": scan.svgs,
        "expected": int(scan.body.get("data-charts-expected", "-1")),
        "rendered": int(scan.body.get("data-charts-rendered", "-1")),
    }


def problems(dom: str, console: list[str], want_charts: int) -> list[str]:
    """Everything wrong with a loaded dashboard (empty when it is fine)."""
    r = chart_report(dom)
    found = [f"console: {line}" for line in console]
    if r["ok"] != want_charts:
        found.append(f"{r['ok']} charts rendered, expected {want_charts} ({r})")
    if r["error"] or r["unmarked"]:
        found.append(f"{r['error'] + r['unmarked']} charts failed to render")
    if r["expected"] != r["rendered"] or r["rendered"] != r["ok"]:
        found.append(f"page counters disagree: {r}")
    if r["svgs"] < r["ok"]:
        found.append(f"only {r['svgs']} <svg> for {r['ok']} charts")
    return found


# ----------------------------------------------------------------------------- helpers


def render_sample(tmp: Path) -> Path:
    out = tmp / "index.html"
    out.write_text(render.render_html(render.load_history(SAMPLE)), encoding="utf-8")
    return out


def write_criterion(root: Path, full_id: str, mean_ns: float, elements: int | None) -> Path:
    """A criterion output directory as criterion 0.5 writes it (the two files we read)."""
    d = root.joinpath(*full_id.split("/"), "new")
    d.mkdir(parents=True, exist_ok=True)
    (d / "estimates.json").write_text(json.dumps({"mean": {"point_estimate": mean_ns}, "median": {"point_estimate": mean_ns}}))
    throughput = {"Elements": elements} if elements else None
    (d / "benchmark.json").write_text(json.dumps({"full_id": full_id, "throughput": throughput}))
    return d / "estimates.json"


def bench_spec(bench_id: str) -> F.Bench:
    return next(b for b in F.BENCHMARKS if b.id == bench_id)


# ----------------------------------------------------------------------------- tests


def test_sample_renders_in_chromium_with_every_chart_and_no_console_message(tmp: Path) -> None:
    page = render_sample(tmp)
    dom, console = load_in_chromium(page)
    found = problems(dom, console, SAMPLE_CHARTS)
    assert not found, "\n".join(found)
    # The headline figures are on the page as text, not only inside charts.
    assert "42,146" in dom and "0.852×" in dom, "latest verify/apply figure and ratio missing"
    assert "not yet measured" in dom and "skipped" in dom, "unmeasured benchmarks must be shown as such"


def test_first_recorded_run_renders_without_trend_charts(tmp: Path) -> None:
    # One run: the 7 trend charts of the sample are left out (a trend needs two runs); the 7 bar
    # and scaling charts remain.
    page = tmp / "index.html"
    page.write_text(render.render_html(render.load_history(SAMPLE)[-1:]), encoding="utf-8")
    dom, console = load_in_chromium(page)
    found = problems(dom, console, SAMPLE_CHARTS - 7)
    assert not found, "\n".join(found)
    assert "The trend chart appears once two recorded runs" in dom


def test_negative_control_broken_chart_is_detected(tmp: Path) -> None:
    page = render_sample(tmp)
    html = page.read_text(encoding="utf-8")
    broken = html.replace("{&quot;kind&quot;:&quot;bar&quot;", "{&quot;kind&quot;:&quot;pie&quot;", 1)
    assert broken != html, "sample has no bar chart to break"
    page.write_text(broken, encoding="utf-8")
    dom, console = load_in_chromium(page)
    found = problems(dom, console, SAMPLE_CHARTS)
    assert any("charts failed to render" in p for p in found), f"a broken chart went unnoticed: {found}"


def test_negative_control_page_without_script_is_detected(tmp: Path) -> None:
    page = render_sample(tmp)
    html = page.read_text(encoding="utf-8")
    start = html.rindex("<script>")
    page.write_text(html[:start] + html[html.rindex("</script>") + len("</script>"):], encoding="utf-8")
    dom, console = load_in_chromium(page)
    found = problems(dom, console, SAMPLE_CHARTS)
    assert any("0 charts rendered" in p for p in found), f"undrawn charts went unnoticed: {found}"


def test_negative_control_console_error_and_network_load_are_detected(tmp: Path) -> None:
    page = render_sample(tmp)
    html = page.read_text(encoding="utf-8")
    html = html.replace("</main>", '</main><img src="http://192.0.2.1/x.png"><script>console.error("injected")</script>', 1)
    page.write_text(html, encoding="utf-8")
    dom, console = load_in_chromium(page)
    text = "\n".join(console)
    assert "injected" in text, f"console.error not seen: {console}"
    assert "Content Security Policy" in text, f"blocked network load not seen: {console}"
    assert problems(dom, console, SAMPLE_CHARTS), "console messages must fail the check"


def test_page_is_self_contained(tmp: Path) -> None:
    html = render_sample(tmp).read_text(encoding="utf-8")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    for pattern in (r"<link\b", r"@import", r"url\(", r"""(src|href)\s*=\s*["']?(https?:)?//"""):
        assert not re.search(pattern, html, re.I), f"external resource reference: {pattern}"


def test_readme_table_shows_latest_headline_figures() -> None:
    table = render.readme_table(render.load_history(SAMPLE)[-1])
    lines = table.splitlines()
    assert lines[0].startswith("Latest recorded run: 2026-11-25, quick mode, commit `4444444d`")
    assert "| Signed ops verified and applied (one core) | 42,146 ops/s | raw Ed25519 verify: 49,469 verifies/s | 0.852× | ✓ ≥ 70% of the raw verify rate |" in lines
    assert "| Program N peers, userspace backend (wireguard-go), N = 50,000 | 971 ms | wg setconf: 1,233 ms | 0.788× | ✓ ≤ 1.0× wg setconf |" in lines
    assert any(line.startswith("| Joins: 64 concurrent clients against one server | not yet measured |") for line in lines)
    assert any(line.startswith("| Program N peers, kernel backend (User-Mode Linux) | not measured in this run |") for line in lines)
    # Short: one row per headline figure, not one per N: state_ops 2, state_ipam 1,
    # netlink_encode 2 series, netlink_setconf 4 series, join_load 1, gossip_convergence 1.
    assert lines[2].startswith("| figure |") and lines[3].startswith("|---")
    assert len(lines[4:]) == 11, lines[4:]


def test_readme_table_is_replaced_between_markers_only(tmp: Path) -> None:
    latest = render.load_history(SAMPLE)[-1]
    readme = tmp / "README.md"
    readme.write_text(f"# X\n\n## Benchmarks\n\n{render.README_START}\nold table\n{render.README_END}\n\n## After\n", encoding="utf-8")
    assert render.update_readme(readme, latest)
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and "| Signed ops verified and applied (one core) | 42,146 ops/s |" in text
    assert text.startswith("# X\n\n## Benchmarks\n\n") and text.endswith(f"{render.README_END}\n\n## After\n")
    assert render.update_readme(readme, latest) and readme.read_text(encoding="utf-8") == text, "not idempotent"
    plain = tmp / "PLAIN.md"
    plain.write_text("# no markers\n", encoding="utf-8")
    assert not render.update_readme(plain, latest) and plain.read_text(encoding="utf-8") == "# no markers\n"


def test_trend_joins_every_recorded_run() -> None:
    runs = render.load_history(SAMPLE)
    spec = render.trend_spec(["state_ops.verify_apply"], ["ours"], runs, "ops/s", with_ref=True)
    assert spec is not None
    assert [len(line["points"]) for line in spec["lines"]] == [4, 4]
    assert [p[0] for p in spec["lines"][0]["points"]] == [0, 1, 2, 3]
    assert spec["x_categories"][-1] == "11-25 10:00|4444444"


def test_criterion_outputs_become_figures_with_reference_ratio_and_goal(tmp: Path) -> None:
    crit = tmp / "criterion"
    # 1000 ops per iteration in 25 ms -> 40,000 ops/s; raw verify 1000 in 20 ms -> 50,000/s.
    write_criterion(crit, "ops/verify_apply", 25e6, 1000)
    write_criterion(crit, "ops/raw_ed25519_verify", 20e6, 1000)
    write_criterion(crit, "ops/something_else", 5e3, None)
    raw = F.Raw(criterion=run.read_criterion(crit))
    rec = run.bench_record(bench_spec("state_ops"), "measured", raw)
    fig = next(f for f in rec["figures"] if f["id"] == "state_ops.verify_apply")
    assert abs(fig["value"] - 40_000) < 1e-6, fig
    assert abs(fig["reference"]["value"] - 50_000) < 1e-6, fig
    assert abs(fig["ratio"] - 0.8) < 1e-9 and fig["goal_met"] is True, fig
    grouped = next(f for f in rec["figures"] if f["id"] == "state_ops.redb_grouped")
    assert grouped["value"] is None and grouped["ratio"] is None and "not in this run" in grouped["note"]
    assert rec["status"] == "measured"
    assert [x["id"] for x in rec["extra"]] == ["ops/something_else"], rec["extra"]


def test_only_ids_printed_by_this_run_count() -> None:
    log = "Benchmarking ops/verify_apply_rows\nops/verify_apply_rows   time:   [1 ms 2 ms 3 ms]\n"
    assert run.printed("ops/verify_apply_rows", log)
    assert not run.printed("ops/verify_apply", log), "a prefix of a printed id is not printed"
    assert run.printed("ipam/propose", "ipam/propose\n                        time:   [1 µs 1 µs 1 µs]")


def test_goal_missed_and_stale_outputs_ignored(tmp: Path) -> None:
    crit = tmp / "criterion"
    old = write_criterion(crit, "ops/verify_apply", 50e6, 1000)  # 20,000 ops/s: 40% of raw
    write_criterion(crit, "ops/raw_ed25519_verify", 20e6, 1000)
    rec = run.bench_record(bench_spec("state_ops"), "measured", F.Raw(criterion=run.read_criterion(crit)))
    fig = rec["figures"][0]
    assert abs(fig["ratio"] - 0.4) < 1e-9 and fig["goal_met"] is False, fig
    # An output older than this run's start is not this run's measurement.
    past = time.time() - 3600
    os.utime(old, (past, past))
    fresh = run.read_criterion(crit, since=time.time() - 60)
    assert "ops/verify_apply" not in fresh and "ops/raw_ed25519_verify" in fresh


def test_summary_rows_and_unmeasured_benchmarks(tmp: Path) -> None:
    summaries = {"netlink_setconf": {"rows": [{"backend": "userspace", "peers": 1000, "ours_ms": 9.0, "wg_setconf_ms": 12.0}]}}
    rec = run.bench_record(bench_spec("netlink_setconf"), "measured", F.Raw(summaries=summaries))
    fig = next(f for f in rec["figures"] if f["id"] == "netlink_setconf.userspace_program.n1000")
    assert fig["value"] == 9.0 and fig["ratio"] == 0.75 and fig["goal_met"] is True and fig["n"] == 1000
    missing = run.bench_record(bench_spec("gossip_convergence"), "not_yet_measured", None, "does not exist yet")
    assert missing["status"] == "not_yet_measured"
    assert all(f["value"] is None and f["goal_met"] is None for f in missing["figures"])
    # A benchmark that ran but produced nothing the mapping knows is a failure, never "measured".
    empty = run.bench_record(bench_spec("state_ipam"), "measured", F.Raw())
    assert empty["status"] == "failed" and "none of its outputs" in empty["note"]


def test_collect_runs_existing_skips_root_only_and_reports_missing(tmp: Path) -> None:
    """The orchestration without cargo: which benchmark is run, skipped or not yet measured."""
    ran = []

    def fake_run_bench(bench, quick):
        ran.append((bench.id, quick))
        summary = {"rows": [{"backend": "userspace", "peers": 1000, "ours_ms": float("nan"), "wg_setconf_ms": 5.0}]}
        if bench.id == "netlink_setconf":
            (run.SUMMARY_DIR / "netlink_setconf.json").write_text(json.dumps(summary))  # NaN, as serde_json never writes but a bench might
        return True, "", 0.1

    saved = (run.existing_benches, run.run_bench, run.os.geteuid, run.SUMMARY_DIR, run.LOG_DIR, run.CRITERION_DIR)
    try:
        run.SUMMARY_DIR, run.LOG_DIR, run.CRITERION_DIR = tmp / "results", tmp / "results" / "logs", tmp / "criterion"
        run.LOG_DIR.mkdir(parents=True)
        for name in ("state_ipam", "netlink_setconf"):
            (run.LOG_DIR / f"{name}.log").write_text("")
        run.existing_benches = lambda: {"state_ipam", "netlink_setconf", "mystery"}
        run.run_bench = fake_run_bench
        run.os.geteuid = lambda: 1000  # not root
        with contextlib.redirect_stdout(io.StringIO()):
            record, ok = run.collect(quick=True, only=[])
        status = {b["id"]: b["status"] for b in record["benchmarks"]}
        assert ran == [("state_ipam", True)], ran
        assert status["netlink_setconf"] == "skipped" and status["state_ops"] == "not_yet_measured", status
        assert status["state_ipam"] == "failed", "ran but printed nothing: must not count as measured"
        assert record["unmapped_benches"] == ["mystery"] and not ok
        run.os.geteuid = lambda: 0  # root: the root-only bench runs; its NaN is no measurement
        ran.clear()
        with contextlib.redirect_stdout(io.StringIO()):
            record, ok = run.collect(quick=False, only=["netlink_setconf"])
        assert ran == [("netlink_setconf", False)], ran
        fig = next(f for f in record["benchmarks"][0]["figures"] if f["id"] == "netlink_setconf.userspace_program.n1000")
        assert fig["value"] is None and fig["reference"]["value"] == 5.0 and fig["ratio"] is None, fig
        json.dumps(record, allow_nan=False)  # the record stays valid JSON
    finally:
        run.existing_benches, run.run_bench, run.os.geteuid, run.SUMMARY_DIR, run.LOG_DIR, run.CRITERION_DIR = saved


def test_history_is_appended_and_latest_rewritten(tmp: Path) -> None:
    runs = render.load_history(SAMPLE)
    run.write_results(runs[0], tmp)
    run.write_results(runs[1], tmp)
    lines = (tmp / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["date"] for line in lines] == [runs[0]["date"], runs[1]["date"]]
    assert json.loads((tmp / "latest.json").read_text(encoding="utf-8"))["date"] == runs[1]["date"]
    assert render.load_history(tmp / "history.jsonl")[-1]["git"]["commit"] == runs[1]["git"]["commit"]


def test_every_record_has_the_documented_fields() -> None:
    required_run = {"schema", "date", "mode", "git", "machine", "benchmarks"}
    required_machine = {"cpu_model", "cores", "memory_bytes", "kernel", "rustc"}
    required_fig = {"id", "label", "value", "unit", "better", "reference", "ratio", "goal", "goal_met"}
    for r in render.load_history(SAMPLE):
        assert required_run <= r.keys() and r["schema"] == run.SCHEMA
        assert required_machine <= r["machine"].keys()
        for b in r["benchmarks"]:
            assert b["status"] in ("measured", "not_yet_measured", "skipped", "failed")
            for f in b["figures"]:
                assert required_fig <= f.keys(), f["id"]


def validate(value, schema: dict, root: dict, where: str = "$") -> list[str]:
    """A small JSON Schema subset (type, const, enum, required, properties, items, $ref)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return validate(value, root["$defs"][name], root, where)
    errors = []
    types = schema.get("type")
    if types is not None:
        kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
        ok = False
        for t in types if isinstance(types, list) else [types]:
            if t in ("number", "integer"):
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool) and (t == "number" or float(value).is_integer())
            else:
                ok |= isinstance(value, kinds[t])
        if not ok:
            return [f"{where}: {value!r:.60} is not {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                errors += validate(value[k], sub, root, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{where}[{i}]")
    return errors


def test_sample_and_recorded_runs_match_the_json_schema() -> None:
    schema = json.loads((HERE.parent / "results" / "schema.json").read_text(encoding="utf-8"))
    files = [SAMPLE] + [p for p in [HERE.parent / "results" / "history.jsonl"] if p.exists()]
    for path in files:
        for i, r in enumerate(render.load_history(path)):
            errors = validate(r, schema, schema)
            assert not errors, f"{path.name} run {i}: " + "; ".join(errors[:5])
    # The validator itself rejects a bad record.
    bad = dict(render.load_history(SAMPLE)[0], mode="fast")
    assert validate(bad, schema, schema), "schema check accepted mode=fast"


# ----------------------------------------------------------------------------- runner


def main() -> int:
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    passed = failed = 0
    for name, fn in tests:
        tmp = Path(tempfile.mkdtemp(prefix="dash-test-"))
        try:
            fn(tmp) if fn.__code__.co_argcount else fn()
            print(f"ok      {name}")
            passed += 1
        except Exception:  # noqa: BLE001  (report every failure, keep going)
            print(f"FAILED  {name}\n{traceback.format_exc()}")
            failed += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
