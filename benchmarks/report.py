"""Turns the runners' samples into medians, ratios, a table and the issue's target verdicts."""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

from benchmarks.workloads import WORKLOADS

BASE = "gprocpool"

# Short notes shown next to a figure; (workload, contender), with "*" for any workload.
NOTES = {
    ("*", "raw"): "",
    ("L", "raw"): "pickles (f, args) and the result; u64 length-prefixed frames",
    ("L_free", "raw"): "pickles (f, args) and the result; u64 length-prefixed frames",
    ("T_map", "raw"): "one pickled batch per child (the floor of any map)",
    ("H_map", "raw"): "one pickled batch per child",
    ("T_map", "mp_pool"): "default chunksize",
    ("T_map", "ppe"): "default chunksize=1",
    ("T_map", "pebble"): "default chunksize=1",
    ("T_map", "loky"): "default chunksize=1",
    ("T_concurrent", "gprocpool"): "{callers} greenlets calling process()",
    ("H_concurrent", "gprocpool"): "{callers} greenlets calling process()",
    ("T_concurrent", "raw"): "one greenlet per child, item by item",
    ("H_concurrent", "raw"): "one greenlet per child, item by item",
    ("T_concurrent", "mp_pool"): "{callers} threads calling apply()",
    ("T_concurrent", "ppe"): "{callers} threads calling submit().result()",
    ("T_concurrent", "pebble"): "{callers} threads calling schedule().result()",
    ("T_concurrent", "loky"): "{callers} threads calling submit().result()",
    ("B", "raw"): "echo of raw bytes, no pickling",
    ("R", "raw"): "fork of the benchmark process per task",
    ("R", "ppe"): "max_tasks_per_child=1 forces spawn",
    ("R", "mp_pool"): "maxtasksperchild=1",
    ("R", "pebble"): "max_tasks=1",
    ("S", "raw"): "exec of a child, first round trip",
    ("S", "loky"): "fork+exec workers",
    ("R", "exec"): "interpreter start and exit, no task",
    ("S", "exec"): "interpreter start and exit, no task",
}
BLOCKING_NOTE = "blocks the hub for the whole run (not gevent-aware, no monkey patching)"


def _cost(value: float, lower_is_better: bool) -> float:
    return value if lower_is_better else 1.0 / value


def summarize(raw: Dict[str, Dict[str, Any]], workloads: List[str], contenders: List[str]
              ) -> Dict[str, Dict[str, Any]]:
    """raw[contender][workload] -> summary[workload][contender] with median, range and ratio.

    ratio: the contender's cost divided by gprocpool's for the same work (time, or the
    inverse of a rate): above 1, gprocpool is faster (or stalls the hub less).
    """
    summary: Dict[str, Dict[str, Any]] = {}
    for w in workloads:
        _title, unit, lower = WORKLOADS[w]
        row: Dict[str, Any] = {}
        for c in contenders:
            entry = raw.get(c, {}).get(w)
            if entry is None:
                row[c] = {"error": "no result (the runner crashed or timed out)"}
                continue
            samples = entry.get("samples") or []
            if "skipped" in entry or "error" in entry or not samples:
                row[c] = {k: entry[k] for k in ("skipped", "error") if k in entry} or \
                    {"error": "no samples"}
                continue
            row[c] = {
                "median": statistics.median(samples),
                "min": min(samples),
                "max": max(samples),
                "repeats": len(samples),
                "unit": unit,
                "samples": samples,
                "extra": {k: statistics.median(v) for k, v in entry.get("extra", {}).items()},
            }
        base = row.get(BASE, {}).get("median")
        for c, r in row.items():
            if "median" in r and base:
                r["ratio"] = _cost(r["median"], lower) / _cost(base, lower)
        summary[w] = row
    return summary


def _num(value: float, unit: str) -> str:
    if unit in ("tasks/s", "MB/s"):
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def note_for(workload: str, contender: str, labels: Dict[str, Dict[str, Any]],
             sizes: Dict[str, Any]) -> str:
    text = NOTES.get((workload, contender), NOTES.get(("*", contender), ""))
    if workload.startswith("H_") and not labels.get(contender, {}).get("gevent_aware", True):
        text = BLOCKING_NOTE + ("; " + text if text else "")
    return text.format(callers=sizes.get("T_callers", ""))


def table(summary: Dict[str, Dict[str, Any]], labels: Dict[str, Dict[str, Any]],
          sizes: Dict[str, Any]) -> str:
    """A markdown table, ratios first."""
    lines = ["| workload | contender | x gprocpool | median | min - max (repeats) | note |",
             "|---|---|--:|--:|--:|---|"]
    for w, row in summary.items():
        _title, unit, lower = WORKLOADS[w]
        better = "lower is better" if lower else "higher is better"
        first = True
        for c, r in row.items():
            name = f"**{w}** {unit}, {better}" if first else ""
            label = labels.get(c, {}).get("label", c)
            if "median" not in r:
                if labels.get(c, {}).get("reference") and "skipped" in r:
                    continue
                why = r.get("skipped") or "ERROR: " + r.get("error", "").strip().splitlines()[-1][:80]
                lines.append(f"| {name} | {label} | - | - | - | {why} |")
                first = False
                continue
            spread = f"{_num(r['min'], unit)} - {_num(r['max'], unit)} ({r['repeats']})"
            note = note_for(w, c, labels, sizes)
            if w.startswith("H_") and "tasks_per_s" in r["extra"]:
                note = (note + "; " if note else "") + f"{r['extra']['tasks_per_s']:,.0f} tasks/s meanwhile"
            lines.append(f"| {name} | {label} | {_ratio(r.get('ratio'))} | {_num(r['median'], unit)} "
                         f"| {spread} | {note} |")
            first = False
    return "\n".join(lines)


def _median(summary: Dict[str, Dict[str, Any]], w: str, c: str) -> Optional[float]:
    return summary.get(w, {}).get(c, {}).get("median")


def targets(summary: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, as ratios of medians from this run (missing figures are skipped)."""
    out: List[Dict[str, Any]] = []

    def add(name: str, goal: str, value: Optional[float], ok: Optional[bool], detail: str) -> None:
        if name.split(":")[0] in summary:   # only the workloads of this run
            out.append({"target": name, "goal": goal, "measured": value, "met": ok, "detail": detail})

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    # L only: L_free flips between two scheduler modes from run to run (see workloads.py).
    for lw in ("L",):
        g = _median(summary, lw, BASE)
        r = ratio(g, _median(summary, lw, "raw"))
        add(f"{lw}: gprocpool / raw pipe round trip", "<= 1.3", r, None if r is None else r <= 1.3,
            "gprocpool latency over the raw framed-pipe ping-pong")
        for peer, what in (("mp_pool", "multiprocessing.Pool.apply"),
                           ("ppe", "ProcessPoolExecutor.submit().result()")):
            r = ratio(_median(summary, lw, peer), g)
            add(f"{lw}: {what} / gprocpool", ">= 2", r, None if r is None else r >= 2,
                "how many times faster gprocpool is")
    r = ratio(_median(summary, "T_map", BASE), _median(summary, "T_map", "mp_pool"))
    add("T_map: gprocpool map / multiprocessing.Pool.map throughput", ">= 1", r, None if r is None else r >= 1, "")
    r = ratio(_median(summary, "T_concurrent", BASE), _median(summary, "T_concurrent", "ppe"))
    add("T_concurrent: gprocpool process() from greenlets / ProcessPoolExecutor from threads", ">= 3", r,
        None if r is None else r >= 3, "")
    r = ratio(_median(summary, "B", BASE), _median(summary, "B", "raw"))
    add("B: gprocpool / raw pipe bandwidth", ">= 0.7", r, None if r is None else r >= 0.7, "")
    r = ratio(_median(summary, "R", BASE), _median(summary, "R", "exec"))
    add("R: gprocpool per recycled task / python -c pass", "<= 0.2", r, None if r is None else r <= 0.2, "")
    for hw in ("H_map", "H_concurrent"):
        g = _median(summary, hw, BASE)
        add(f"{hw}: gprocpool largest hub gap (ms)", "< 10", g, None if g is None else g < 10, "")
    return out


def format_targets(rows: List[Dict[str, Any]]) -> str:
    lines = ["| target | goal | measured | verdict |", "|---|--:|--:|---|"]
    for t in rows:
        value = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        verdict = {True: "met", False: "**NOT met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {verdict} |")
    return "\n".join(lines)
