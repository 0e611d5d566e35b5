#!/usr/bin/env python3
"""Renders the benchmark dashboard (one self-contained HTML file) from the results history.

Input: a history file of run records, one JSON object per line (the format is described in
docs/benchmarks.md and benches/results/schema.json). The last line is the latest run.

Output: target/bench-dashboard/index.html by default. Everything is inline (CSS, the small chart
script, the data); the page loads nothing from the network and opens from disk. The page layout and
text are written here in Python; the charts are drawn by the inline script from a JSON spec placed
on each chart element, and the script marks every chart it drew with data-rendered="ok" (the
dashboard test counts those marks in headless Chromium).

    python3 benches/dashboard/render.py                       # writes the dashboard
    python3 benches/dashboard/render.py --readme              # prints the README table (markdown)
    python3 benches/dashboard/render.py --update-readme README.md   # rewrites it in README.md

Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_HISTORY = REPO / "benches" / "results" / "history.jsonl"
DEFAULT_OUT = REPO / "target" / "bench-dashboard" / "index.html"
TEMPLATE = HERE / "template.html"

# How many recorded runs the trend charts show (the newest ones).
TREND_RUNS = 30


# ----------------------------------------------------------------------------- loading


def load_history(path: Path) -> list[dict]:
    """Reads every run record of a history file; a malformed line is an error naming the line."""
    runs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                run = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not a JSON record: {e}") from e
            if not isinstance(run, dict) or "benchmarks" not in run:
                raise SystemExit(f"{path}:{lineno}: not a run record (no 'benchmarks')")
            runs.append(run)
    if not runs:
        raise SystemExit(f"{path}: no run recorded yet; run `bash benches/run.sh --quick` first")
    return runs


# ----------------------------------------------------------------------------- formatting


def fmt_num(v: float | None) -> str:
    """Three significant digits with thousands separators: 41,200 / 1.23 / 0.0456."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    a = abs(v)
    if a >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:,.1f}"
    if a >= 1:
        return f"{v:,.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


def fmt_ratio(r: float | None) -> str:
    """0.852× / 20.7×; tiny ratios as a fraction, which reads better: 1/340 rather than 0.00294×."""
    if r is None:
        return ""
    if 0 < r < 0.1:
        return f"1/{round(1 / r):,}"
    return f"{fmt_num(r)}×"


def fmt_value(v: float | None, unit: str) -> str:
    return f"{fmt_num(v)} {unit}".strip() if v is not None else "not measured"


def goal_text(goal: dict | None) -> str:
    return goal.get("text", "") if goal else ""


def verdict(fig: dict) -> str:
    """'met', 'missed' or '' (no goal or not measured)."""
    met = fig.get("goal_met")
    if met is True:
        return "met"
    if met is False:
        return "missed"
    return ""


def run_label(run: dict) -> str:
    """"MM-DD HH:MM|commit" (the chart script draws the two parts on two lines)."""
    date = str(run.get("date", ""))[5:16].replace("T", " ")
    commit = str(run.get("git", {}).get("commit", ""))[:7]
    return f"{date}|{commit}"


# ----------------------------------------------------------------------------- chart specs


def goal_position(fig: dict) -> float | None:
    """Where the goal sits on the figure's own axis (figure units), or None."""
    goal = fig.get("goal")
    if not goal:
        return None
    if goal.get("on") == "ratio":
        ref = fig.get("reference") or {}
        if ref.get("value") is None:
            return None
        return goal["value"] * ref["value"]
    return goal.get("value")


def goal_label(goal: dict | None) -> str:
    if not goal:
        return ""
    return "goal: " + goal.get("text", f"{goal.get('op', '')} {goal.get('value', '')}")


def bar_spec(fig: dict) -> dict:
    ref = fig.get("reference") or {}
    rows = [{"label": "Lemonade Nexus", "value": fig["value"], "role": "ours"}]
    if ref.get("value") is not None:
        rows.append({"label": ref.get("label", "reference"), "value": ref["value"], "role": "ref"})
    spec = {"kind": "bar", "unit": fig.get("unit", ""), "rows": rows, "title": fig.get("label", "")}
    pos = goal_position(fig)
    if pos is not None:
        spec["goal"] = {"value": pos, "label": goal_label(fig.get("goal"))}
    return spec


def spans_decades(values: list[float]) -> bool:
    """Log axes when the values span a decade or more (N = 1k..10k does)."""
    pos = [v for v in values if v and v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) >= 10


def axis_quantity(unit: str) -> str:
    """A short y-axis label: "time" for time units, else the unit itself ("messages", "KiB")."""
    return "time" if unit in ("ns", "us", "µs", "ms", "s") else unit


def scaling_spec(series_id: str, figs: list[dict]) -> dict:
    figs = sorted(figs, key=lambda f: f["n"])
    first = figs[0]
    ours = [[f["n"], f["value"]] for f in figs if f.get("value") is not None]
    refs = [
        [f["n"], f["reference"]["value"]]
        for f in figs
        if (f.get("reference") or {}).get("value") is not None
    ]
    lines = [{"label": "Lemonade Nexus", "role": "ours", "points": ours}]
    if refs:
        lines.append({"label": first["reference"].get("label", "reference"), "role": "ref", "points": refs})
    xs = [p[0] for p in ours + refs]
    ys = [p[1] for p in ours + refs]
    spec = {
        "kind": "line",
        "x_label": first.get("n_label", "N"),
        "y_label": axis_quantity(first.get("unit", "")),
        "unit": first.get("unit", ""),
        "lines": lines,
        "logx": spans_decades(xs),
        "logy": spans_decades(ys),
    }
    goal = next((f["goal"] for f in figs if f.get("goal")), None)
    if goal and goal.get("on") != "ratio":
        spec["goal"] = {"value": goal["value"], "label": goal_label(goal)}
        if goal.get("at_n") is not None:
            spec["goal"]["at_x"] = goal["at_n"]
    return spec


def trend_spec(fig_ids: list[str], labels: list[str], runs: list[dict], unit: str, with_ref: bool) -> dict | None:
    """One line per figure id (or figure and reference) across the recorded runs; None when fewer
    than two runs measured it."""
    lines = []
    for fid, label in zip(fig_ids, labels):
        ours, refs = [], []
        for i, run in enumerate(runs):
            fig = find_figure(run, fid)
            if fig is None or fig.get("value") is None:
                continue
            ours.append([i, fig["value"]])
            ref = fig.get("reference") or {}
            if with_ref and ref.get("value") is not None:
                refs.append([i, ref["value"]])
        if ours:
            lines.append({"label": label, "role": "ours" if len(fig_ids) == 1 else "multi", "points": ours})
        if refs:
            ref_label = (find_figure(runs[-1], fid) or {}).get("reference", {}).get("label", "reference")
            lines.append({"label": ref_label, "role": "ref", "points": refs})
    runs_with_values = {p[0] for line in lines for p in line["points"]}
    if len(runs_with_values) < 2:
        return None  # a trend needs two recorded runs
    ys = [p[1] for line in lines for p in line["points"]]
    return {
        "kind": "line",
        "x_label": "recorded run",
        "y_label": unit,
        "unit": unit,
        "x_categories": [run_label(r) for r in runs],
        "lines": lines,
        "logx": False,
        "logy": spans_decades(ys) and len(fig_ids) > 1,
    }


def find_figure(run: dict, fig_id: str) -> dict | None:
    for bench in run.get("benchmarks", []):
        for fig in bench.get("figures", []):
            if fig.get("id") == fig_id:
                return fig
    return None


# ----------------------------------------------------------------------------- HTML


def e(s) -> str:
    return html.escape(str(s), quote=True)


def chart_div(spec: dict, cls: str = "") -> str:
    data = e(json.dumps(spec, separators=(",", ":"), allow_nan=False))
    return f'<div class="chart {cls}" data-chart="{data}" role="img" aria-label="{e(spec.get("title", spec["kind"]))}"></div>'


def status_badge(status: str) -> str:
    text = {
        "measured": "measured",
        "not_yet_measured": "not yet measured",
        "skipped": "skipped",
        "failed": "failed",
    }.get(status, status)
    return f'<span class="badge st-{e(status)}">{e(text)}</span>'


def verdict_pill(fig: dict) -> str:
    v = verdict(fig)
    if not v:
        return ""
    mark = "✓" if v == "met" else "✗"
    return f'<span class="pill {v}" title="{e(goal_label(fig.get("goal")))}">{mark} goal {e(goal_text(fig.get("goal")))}</span>'


def series_pill(figs: list[dict]) -> str:
    """One verdict for a series: met when every judged N met the goal ("2/3 N" otherwise)."""
    judged = [f for f in figs if verdict(f)]
    if not judged:
        return ""
    met = sum(1 for f in judged if verdict(f) == "met")
    v = "met" if met == len(judged) else "missed"
    goal = judged[0].get("goal")
    count = f" ({met}/{len(judged)} N)" if len(judged) > 1 else ""
    return f'<span class="pill {v}">{"✓" if v == "met" else "✗"} goal {e(goal_text(goal))}{count}</span>'


def ratio_callout(fig: dict) -> str:
    ratio = fig.get("ratio")
    ref = fig.get("reference") or {}
    if ratio is None:
        return ""
    return (
        f'<div class="ratio"><span class="ratio-num">{fmt_ratio(ratio)}</span>'
        f'<span class="ratio-txt">{e(fig.get("ratio_label") or ("of " + ref.get("label", "reference")))}</span></div>'
    )


def not_measured_text(fig: dict) -> str:
    src = fig.get("source")
    where = f'<br><span class="src">expected from {e(src)}</span>' if src else ""
    return f"Not measured in this run.{where}"


def figure_block(fig: dict, runs: list[dict]) -> tuple[str, int]:
    """A non-series figure: headline value, ratio callout, bars against the reference, trend."""
    charts = 0
    parts = ['<div class="figure">']
    parts.append(f'<div class="fig-head"><h3>{e(fig.get("label", fig["id"]))}</h3>{verdict_pill(fig)}</div>')
    if fig.get("value") is None:
        parts.append(f'<p class="muted">{not_measured_text(fig)}</p></div>')
        return "".join(parts), 0
    ref = fig.get("reference") or {}
    parts.append('<div class="headline">')
    parts.append(f'<div class="big"><span class="big-num">{fmt_num(fig["value"])}</span> <span class="unit">{e(fig.get("unit", ""))}</span></div>')
    parts.append(ratio_callout(fig))
    parts.append("</div>")
    if ref.get("value") is not None:
        parts.append(
            f'<p class="refline">reference in the same run: {e(ref.get("label", ""))} = '
            f'{e(fmt_value(ref["value"], ref.get("unit", fig.get("unit", ""))))}</p>'
        )
    parts.append(chart_div(bar_spec(fig), "bars"))
    charts += 1
    trend = trend_spec([fig["id"]], ["Lemonade Nexus"], runs, fig.get("unit", ""), with_ref=True)
    html, n = trend_section(trend, fig.get("label", fig["id"]), "figure")
    parts.append(html)
    charts += n
    if fig.get("note"):
        parts.append(f'<p class="note">{e(fig["note"])}</p>')
    parts.append("</div>")
    return "".join(parts), charts


def trend_section(trend: dict | None, title: str, what: str) -> tuple[str, int]:
    """The trend chart under its heading, or (fewer than two recorded runs) a note saying when it
    appears; returns the HTML and the number of charts it holds."""
    if not trend:
        return f'<p class="note">The trend chart appears once two recorded runs have this {what}.</p>', 0
    trend["title"] = f"trend: {title}"
    return '<h4>Trend across recorded runs</h4>' + chart_div(trend, "trend"), 1


def series_block(series_id: str, figs: list[dict], runs: list[dict]) -> tuple[str, int]:
    """A scaling series (the same figure at several N): curve against N, ratio table, trend per N."""
    figs = sorted(figs, key=lambda f: f["n"])
    first = figs[0]
    measured = [f for f in figs if f.get("value") is not None]
    parts = ['<div class="figure series">']
    pills = series_pill(figs)
    title = first.get("series_label", series_id)
    parts.append(f'<div class="fig-head"><h3>{e(title)}</h3>{pills}</div>')
    if not measured:
        parts.append(f'<p class="muted">{not_measured_text(first)}</p></div>')
        return "".join(parts), 0
    charts = 0
    spec = scaling_spec(series_id, figs)
    spec["title"] = title
    parts.append(chart_div(spec, "scaling"))
    charts += 1
    ref_label = (first.get("reference") or {}).get("label")
    head = f"<th>{e(first.get('n_label', 'N'))}</th><th>Lemonade Nexus</th>"
    if ref_label:
        head += f"<th>{e(ref_label)}</th><th>ratio</th>"
    head += "<th>goal</th>"
    rows = []
    for f in figs:
        ref = f.get("reference") or {}
        cells = f"<td>{fmt_num(f['n'])}</td><td>{e(fmt_value(f.get('value'), f.get('unit', '')))}</td>"
        if ref_label:
            cells += f"<td>{e(fmt_value(ref.get('value'), ref.get('unit', f.get('unit', ''))))}</td>"
            cells += f"<td class='num'>{fmt_ratio(f.get('ratio'))}</td>"
        v = verdict(f)
        cells += f"<td class='{v}'>{('✓ ' if v == 'met' else '✗ ' if v == 'missed' else '')}{e(goal_text(f.get('goal')) if v else '')}</td>"
        rows.append(f"<tr>{cells}</tr>")
    parts.append(f'<table class="ratios"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    ids = [f["id"] for f in measured]
    labels = [f"N = {fmt_num(f['n'])}" for f in measured]
    trend = trend_spec(ids, labels, runs, first.get("unit", ""), with_ref=False)
    html, n = trend_section(trend, title, "series")
    parts.append(html)
    charts += n
    if first.get("note"):
        parts.append(f'<p class="note">{e(first["note"])}</p>')
    parts.append("</div>")
    return "".join(parts), charts


def bench_panel(bench: dict, runs: list[dict]) -> tuple[str, int]:
    status = bench.get("status", "measured")
    parts = [f'<section class="panel st-{e(status)}" id="{e(bench["id"])}">']
    issue = bench.get("issue")
    issue_txt = f'<span class="issue">issue #{e(issue)}</span>' if issue else ""
    parts.append(f'<header><h2>{e(bench.get("title", bench["id"]))}</h2>{status_badge(status)}{issue_txt}</header>')
    if bench.get("description"):
        parts.append(f'<p class="desc">{e(bench["description"])}</p>')
    if bench.get("note"):
        parts.append(f'<p class="note">{e(bench["note"])}</p>')
    charts = 0
    singles, series = [], {}
    for fig in bench.get("figures", []):
        if fig.get("series") and fig.get("n") is not None:
            series.setdefault(fig["series"], []).append(fig)
        else:
            singles.append(fig)
    body = []
    for fig in singles:
        block, n = figure_block(fig, runs)
        body.append(block)
        charts += n
    for sid, figs in series.items():
        block, n = series_block(sid, figs, runs)
        body.append(block)
        charts += n
    parts.append(f'<div class="figures">{"".join(body)}</div>')
    parts.append(extra_table(bench.get("extra") or []))
    parts.append("</section>")
    return "".join(parts), charts


def fmt_ns(ns: float | None) -> str:
    """A time per iteration in the unit that reads best."""
    if ns is None:
        return "–"
    for div, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
        if ns >= div:
            return f"{fmt_num(ns / div)} {unit}"
    return f"{fmt_num(ns)} ns"


def extra_table(extra: list[dict]) -> str:
    """Criterion results of the benchmark that no headline figure uses (nothing measured is hidden)."""
    if not extra:
        return ""
    rows = []
    for x in extra:
        rate = ""
        if x.get("mean_ns") and x.get("elements"):
            rate = f"{fmt_num(x['elements'] / (x['mean_ns'] * 1e-9))} /s"
        rows.append(f"<tr><td><code>{e(x['id'])}</code></td><td class='num'>{fmt_ns(x.get('mean_ns'))}</td><td class='num'>{rate}</td></tr>")
    return (
        "<details class='extra'><summary>Other measurements of this benchmark "
        f"({len(extra)})</summary><table><thead><tr><th>criterion id</th><th>mean time per iteration</th>"
        f"<th>throughput</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>"
    )


def compact_rows(run: dict) -> list[dict]:
    """The short list of headline figures of a run (dashboard summary and README table).

    One row per single figure; one row per scaling series, at the N its goal names or else the
    largest measured N; one row for a benchmark that was not measured, saying why.
    """
    rows = []
    status_text = {"not_yet_measured": "not yet measured", "skipped": "skipped (needs root)", "failed": "failed"}
    for bench in run.get("benchmarks", []):
        figs = bench.get("figures", [])
        status = bench.get("status", "measured")
        if all(f.get("value") is None for f in figs):
            goals = sorted({goal_text(f.get("goal")) for f in figs if f.get("goal")})
            rows.append({"bench": bench["id"], "label": bench.get("title", bench["id"]), "fig": None,
                         "value": status_text.get(status, "not measured"), "goal": "; ".join(goals)})
            continue
        if status == "failed":  # it failed part-way: say so, then show what it did measure
            rows.append({"bench": bench["id"], "label": f"{bench.get('title', bench['id'])}: failed part-way",
                         "fig": None, "value": "see its log", "goal": ""})
        seen = set()
        for fig in figs:
            sid = fig.get("series")
            if sid and fig.get("n") is not None:
                if sid in seen:
                    continue
                seen.add(sid)
                members = [f for f in figs if f.get("series") == sid]
                measured = [f for f in members if f.get("value") is not None]
                if not measured:
                    goals = sorted({goal_text(f.get("goal")) for f in members if f.get("goal")})
                    rows.append({"bench": bench["id"], "label": fig.get("series_label", sid), "fig": None,
                                 "value": "not measured in this run", "goal": "; ".join(goals)})
                    continue
                with_goal = [f for f in measured if (f.get("goal") or {}).get("at_n") == f["n"]]
                fig = with_goal[0] if with_goal else max(measured, key=lambda f: f["n"])
                label = f"{fig.get('series_label', fig['id'])}, N = {fmt_num(fig['n'])}"
            elif fig.get("value") is None:
                rows.append({"bench": bench["id"], "label": fig.get("label", fig["id"]), "fig": None,
                             "value": "not measured in this run", "goal": goal_text(fig.get("goal"))})
                continue
            else:
                label = fig.get("label", fig["id"])
            ref = fig.get("reference") or {}
            rows.append({
                "bench": bench["id"],
                "label": label,
                "fig": fig,
                "value": fmt_value(fig.get("value"), fig.get("unit", "")),
                "ref_label": ref.get("label", "") if ref.get("value") is not None else "",
                "ref_value": fmt_value(ref["value"], ref.get("unit", fig.get("unit", ""))) if ref.get("value") is not None else "",
                "ratio": fmt_ratio(fig.get("ratio")),
                "verdict": verdict(fig),
                "goal": goal_text(fig.get("goal")),
            })
    return rows


def mark(v: str) -> str:
    return "✓ " if v == "met" else "✗ " if v == "missed" else ""


def summary_table(run: dict) -> str:
    rows = []
    for r in compact_rows(run):
        cls = "" if r["fig"] else " class='muted'"
        rows.append(
            f"<tr{cls}>"
            f'<td><a href="#{e(r["bench"])}">{e(r["label"])}</a></td>'
            f"<td class='num'>{e(r['value'])}</td>"
            f"<td>{e(r.get('ref_label', ''))}</td>"
            f"<td class='num'>{e(r.get('ref_value', ''))}</td>"
            f"<td class='num'>{e(r.get('ratio', ''))}</td>"
            f"<td class='{r.get('verdict', '')}'>{mark(r.get('verdict', ''))}{e(r['goal'])}</td>"
            "</tr>"
        )
    return (
        '<table class="summary"><thead><tr><th>figure</th><th>value</th><th>in-run reference</th>'
        '<th>reference value</th><th>ratio</th><th>goal</th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table>'
    )


def machine_line(run: dict) -> str:
    m = run.get("machine", {})
    mem = m.get("memory_bytes")
    mem_txt = f"{mem / 2**30:.1f} GiB" if isinstance(mem, (int, float)) else "?"
    bits = [
        m.get("cpu_model", "unknown cpu"),
        f"{m.get('cores', '?')} cores",
        mem_txt,
        f"Linux {m.get('kernel', '?')}",
        m.get("os", ""),
        m.get("rustc", ""),
    ]
    return " · ".join(e(b) for b in bits if b)


def render_html(runs: list[dict]) -> str:
    runs = runs[-TREND_RUNS:]
    latest = runs[-1]
    panels, charts = [], 0
    for bench in latest.get("benchmarks", []):
        panel, n = bench_panel(bench, runs)
        panels.append(panel)
        charts += n
    git = latest.get("git", {})
    commit = str(git.get("commit", "unknown"))
    dirty = " (with uncommitted changes)" if git.get("dirty") else ""
    counts = {}
    for bench in latest.get("benchmarks", []):
        counts[bench.get("status", "measured")] = counts.get(bench.get("status", "measured"), 0) + 1
    goals = [verdict(f) for b in latest.get("benchmarks", []) for f in b.get("figures", []) if verdict(f)]
    overview = (
        f'<div class="stats"><div><b>{counts.get("measured", 0)}</b> benchmarks measured</div>'
        f'<div class="missed"><b>{counts.get("failed", 0)}</b> failed</div>'
        f'<div><b>{counts.get("not_yet_measured", 0) + counts.get("skipped", 0)}</b> not measured in this run</div>'
        f'<div class="met"><b>{goals.count("met")}</b> goals met</div>'
        f'<div class="missed"><b>{goals.count("missed")}</b> goals missed</div>'
        f'<div><b>{len(runs)}</b> recorded runs</div></div>'
    )
    header = (
        f'<h1>Lemonade Nexus — benchmarks</h1>'
        f'<p class="meta">Latest run {e(str(latest.get("date", "")))} · {e(latest.get("mode", ""))} mode · '
        f'commit <code>{e(commit[:12])}</code>{e(dirty)}</p>'
        f'<p class="meta">{machine_line(latest)}</p>'
        f"{overview}"
    )
    body = (
        f"<header class='top'>{header}</header>"
        f"<section class='panel'><header><h2>All figures of the latest run</h2></header>{summary_table(latest)}"
        "<p class='note'>Every figure is measured beside an in-run reference on the same machine in the same run; "
        "the ratio is figure ÷ reference. Charts: bars compare the figure with its reference (dashed line = goal); "
        "curves show cost against N; trends show the recorded runs, oldest left.</p></section>"
        + "".join(panels)
        + "<footer>Generated by benches/dashboard/render.py from benches/results/history.jsonl · "
        "self-contained: no network access needed.</footer>"
    )
    template = TEMPLATE.read_text(encoding="utf-8")
    return template.replace("__CHART_COUNT__", str(charts)).replace("<!--__BODY__-->", body)


# ----------------------------------------------------------------------------- README table


def readme_table(run: dict) -> str:
    """The short markdown table of the latest figures that README.md shows."""
    git = run.get("git", {})
    m = run.get("machine", {})
    lines = [
        f"Latest recorded run: {str(run.get('date', ''))[:10]}, {run.get('mode', '')} mode, commit "
        f"`{str(git.get('commit', ''))[:8]}`, {m.get('cpu_model', '?')} ({m.get('cores', '?')} cores), "
        f"Linux {m.get('kernel', '?')}.",
        "",
        "| figure | value | in-run reference | ratio | goal |",
        "|---|---:|---|---:|---|",
    ]
    for r in compact_rows(run):
        ref = f"{r['ref_label']}: {r['ref_value']}" if r.get("ref_label") else ""
        goal = f"{mark(r.get('verdict', ''))}{r['goal']}".strip()
        lines.append(f"| {r['label']} | {r['value']} | {ref} | {r.get('ratio', '')} | {goal} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- bench-table:start (generated by benches/dashboard/render.py --update-readme) -->"
README_END = "<!-- bench-table:end -->"


def update_readme(readme: Path, run: dict) -> bool:
    """Replaces the table between the markers in README.md; False when the markers are absent."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{readme_table(run)}{README_END}{tail}", encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=Path, default=DEFAULT_HISTORY, help="history file (JSON lines)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the HTML")
    ap.add_argument("--readme", action="store_true", help="print the README table of the latest run and exit")
    ap.add_argument("--update-readme", type=Path, metavar="README", help="rewrite the table between the markers in README and exit")
    args = ap.parse_args(argv)
    runs = load_history(args.history)
    if args.readme:
        sys.stdout.write(readme_table(runs[-1]))
        return 0
    if args.update_readme:
        if not update_readme(args.update_readme, runs[-1]):
            raise SystemExit(f"{args.update_readme}: no bench-table markers; nothing updated")
        print(f"benchmark table in {args.update_readme} updated")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_html(runs), encoding="utf-8")
    print(f"dashboard written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
