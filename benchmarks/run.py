"""The benchmark driver: gprocpool and its peers side by side, in one run, on this machine.

    python -m benchmarks                  the full run (a few minutes)
    python -m benchmarks --quick          small sizes, under a minute
    python -m benchmarks --only L,T       some workloads (L, L_free, T, B, R, S, H or exact keys)
    python benchmarks/run.py --help       the same, from a checkout

Layout::

    run.py (this driver) --one process per contender--> runner.py --> workloads.py
                                                                        |  same code for all
                                                                   contenders.py adapters
                                                                   (gprocpool, raw pipe floor,
                                                                    multiprocessing, PPE, pebble,
                                                                    loky, exec reference)
    runner writes samples as JSON --> report.py: medians, ratios, table, targets --> stdout + --json

Each contender runs in a fresh process (no pool inherits another's threads, children or
memory; a peer that hangs is killed after --timeout without losing the rest).  Nothing is
monkey patched: peers that are not gevent-aware are called as a gevent program would call
them, and block its hub while they wait (H measures that).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    # Run as a script (python benchmarks/run.py): import the package from the checkout.
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.path.insert(0, _ROOT)

from benchmarks import report  # noqa: E402
from benchmarks.contenders import CONTENDERS  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results.json")

MB = 1000 * 1000
# Sizes per mode.  "<workload>_repeats" overrides "repeats"; after "min_repeats" runs a
# figure stops repeating once it has used "budget" seconds (slow peers stay bounded).
SIZES: Dict[str, Dict[str, Any]] = {
    "full": {"L_calls": 500, "L_repeats": 15, "L_free_repeats": 15,
             "T_tasks": 20000, "T_callers": 100, "T_map_repeats": 15, "H_map_repeats": 15,
             "B_tasks": 20, "B_bytes": 10 * MB, "R_tasks": 200, "R_repeats": 3, "S_repeats": 10,
             "repeats": 5, "min_repeats": 3, "budget": 10.0},
    "quick": {"L_calls": 300, "L_repeats": 5, "L_free_repeats": 5,
              "T_tasks": 4000, "T_callers": 100, "T_map_repeats": 5, "H_map_repeats": 5,
              "B_tasks": 4, "B_bytes": 10 * MB, "R_tasks": 20, "S_repeats": 3,
              "repeats": 3, "min_repeats": 3, "budget": 1.0},
    # Only proves that every path still runs: the figures mean nothing.
    "smoke": {"L_calls": 10, "T_tasks": 200, "T_callers": 10, "B_tasks": 2, "B_bytes": 100_000,
              "R_tasks": 2, "repeats": 1, "min_repeats": 1, "budget": 0.0},
}
TIMEOUT = {"full": 900.0, "quick": 180.0, "smoke": 60.0}
GROUPS = {"L": ["L", "L_free"], "T": ["T_map", "T_concurrent"], "H": ["H_map", "H_concurrent"]}
LEFTOVER_GRACE = 2.0


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    mode.add_argument("--smoke", action="store_true",
                      help="tiny sizes, a few seconds: proves every path runs (figures mean nothing)")
    p.add_argument("--only", default="",
                   help="comma-separated workloads: L, L_free, T, T_map, T_concurrent, B, R, S, H, H_map, "
                        "H_concurrent (default: all)")
    p.add_argument("--contenders", default="",
                   help=f"comma-separated subset of {','.join(CONTENDERS)} (gprocpool always runs)")
    p.add_argument("--json", default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results as JSON (default: benchmarks/results.json)")
    p.add_argument("--jobs", type=int, default=1,
                   help="contenders run at once (default 1; more only for smoke runs: they disturb the timings)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per contender before it is killed")
    return p.parse_args(argv)


def select(spec: str, known: List[str], groups: Dict[str, List[str]], what: str) -> List[str]:
    if not spec:
        return list(known)
    chosen: List[str] = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        names = groups.get(part) or groups.get(part.upper()) or ([part] if part in known else None)
        if names is None:
            raise SystemExit(f"unknown {what} {part!r}; choose from {', '.join(known)}")
        chosen += [n for n in names if n not in chosen]
    return [k for k in known if k in chosen]


# -- machine and versions -----------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def idle_ticker_gap(seconds: float = 0.5) -> float:
    """The ticker's largest gap with nothing else running: the noise floor of H (ms)."""
    import gevent

    from benchmarks.workloads import Ticker
    with Ticker() as ticker:
        gevent.sleep(seconds)
    return ticker.max_gap * 1e3


def checkout_info() -> Optional[str]:
    """The commit measured, and whether gprocpool/ had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "gprocpool"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit:
        return None
    return commit + (" with uncommitted changes in gprocpool/" if dirty else "")


def machine_info() -> Dict[str, Any]:
    mem = _memory_gb()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "memory_gb": round(mem, 1) if mem else None,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
    }


# -- running the contenders ---------------------------------------------------------------

def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Job:
    def __init__(self, key: str, workloads: List[str], sizes: Dict[str, Any], tmpdir: str) -> None:
        self.key = key
        self.out = os.path.join(tmpdir, f"{key}.json")
        config = json.dumps({"contender": key, "workloads": workloads, "sizes": sizes})
        # A session of its own: on timeout the whole tree (pool workers included) is killed.
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.runner", config, self.out],
                                     env=_env(), cwd=ROOT, start_new_session=True)
        self.began = time.monotonic()
        self.problem: Optional[str] = None

    def finish(self, timed_out: bool) -> Dict[str, Any]:
        pgid = self.proc.pid
        if timed_out:
            self.problem = "timed out; killed"
            _kill_group(pgid)
        self.proc.wait()
        deadline = time.monotonic() + LEFTOVER_GRACE
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(pgid):
            print(f"warning: {self.key} left processes behind; killing them", file=sys.stderr)
            _kill_group(pgid)
        if self.proc.returncode and not timed_out:
            self.problem = f"runner exited with code {self.proc.returncode}"
        try:
            with open(self.out) as f:
                data: Dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            data = {"results": {}}
        data["problem"] = self.problem
        data["wall_s"] = round(time.monotonic() - self.began, 2)
        return data


def run_contenders(keys: List[str], workloads: List[str], sizes: Dict[str, Any], jobs: int,
                   timeout: float) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    todo = list(keys)
    running: List[_Job] = []
    with tempfile.TemporaryDirectory(prefix="gprocpool-bench-") as tmpdir:
        try:
            while todo or running:
                while todo and len(running) < max(1, jobs):
                    key = todo.pop(0)
                    print(f"running {key} ...", file=sys.stderr, flush=True)
                    running.append(_Job(key, workloads, sizes, tmpdir))
                time.sleep(0.02)
                for job in list(running):
                    timed_out = time.monotonic() - job.began > timeout
                    if job.proc.poll() is not None or timed_out:
                        running.remove(job)
                        out[job.key] = job.finish(timed_out)
        except BaseException:
            for job in running:
                _kill_group(job.proc.pid)
                job.proc.wait()
            raise
    return out


# -- main ---------------------------------------------------------------------------------

def header(data: Dict[str, Any]) -> str:
    m = data["machine"]
    v = data["versions"]
    load = " ".join(f"{x:.2f}" for x in m["load_avg"]) if m.get("load_avg") else "?"
    load_end = " ".join(f"{x:.2f}" for x in data["load_avg_end"]) if data.get("load_avg_end") else "?"
    lines = [
        "# gprocpool benchmarks",
        f"command: `{data['command']}` ({data['mode']} run, {data['date']})",
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['platform']}, "
        f"{m['memory_gb']} GB RAM; load average {load} at start, {load_end} at the end",
        f"python: {m['python']} ({m['executable']})",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + (f"; checkout {data['checkout']}" if data.get("checkout") else ""),
        "start methods: " + ("; ".join(f"{c['label']}: {c['version']}" for k, c in data["contenders"].items()
                                       if c.get("version") and k != report.BASE) or "-"),
        "gevent: no monkey patching anywhere; peers that are not gevent-aware are called from a greenlet as "
        "they are, so they block the hub while they wait",
        f"sizes: {json.dumps(data['sizes'])}",
        f"idle 1 ms ticker, largest gap over 0.5 s with nothing running: {data['idle_ticker_gap_ms']:.2f} ms",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    workloads = select(args.only, list(WORKLOADS), GROUPS, "workload")
    contenders = select(args.contenders, list(CONTENDERS), {}, "contender")
    if report.BASE not in contenders:
        contenders.insert(0, report.BASE)
    timeout = args.timeout or TIMEOUT[mode]

    script = sys.argv[0] if sys.argv and sys.argv[0] else "-m benchmarks"
    prog = ("python -m benchmarks" if argv is not None or os.path.basename(script) == "__main__.py"
            else "python " + script)
    command = " ".join([prog] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    data: Dict[str, Any] = {
        "command": command,
        "mode": mode,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "checkout": checkout_info(),
        "versions": {d: _version(d) for d in ("gprocpool", "gevent", "greenlet", "dill", "pebble", "loky")},
        "sizes": sizes,
        "idle_ticker_gap_ms": idle_ticker_gap(0.1 if mode == "smoke" else 0.5),
    }

    runnable: List[str] = []
    raw: Dict[str, Dict[str, Any]] = {}
    data["contenders"] = {}
    for key in contenders:
        cls = CONTENDERS[key]
        info: Dict[str, Any] = {"label": cls.label, "gevent_aware": cls.gevent_aware, "note": cls.note,
                                "reference": cls.reference}
        why = cls.available()
        if why:
            info["status"] = "skipped: " + why
            raw[key] = {"results": {w: {"skipped": why} for w in workloads}}
        else:
            runnable.append(key)
        data["contenders"][key] = info

    began = time.monotonic()
    raw.update(run_contenders(runnable, workloads, sizes, args.jobs, timeout))
    errors: List[str] = []
    for key in runnable:
        info = data["contenders"][key]
        info["version"] = raw[key].get("version", "")
        info["wall_s"] = raw[key].get("wall_s")
        info["status"] = raw[key].get("problem") or "ok"
        if raw[key].get("problem"):
            errors.append(f"{key}: {raw[key]['problem']}")
        for w, r in raw[key].get("results", {}).items():
            if "error" in r:
                errors.append(f"{key} {w}: {r['error'].strip().splitlines()[-1]}")
    data["wall_s"] = round(time.monotonic() - began, 1)
    data["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if raw.get(report.BASE, {}).get("version"):
        data["versions"]["gprocpool"] = raw[report.BASE]["version"]  # the checkout's, as measured

    summary = report.summarize({k: v.get("results", {}) for k, v in raw.items()}, workloads, contenders)
    data["workloads"] = {w: {"title": WORKLOADS[w][0], "unit": WORKLOADS[w][1],
                             "lower_is_better": WORKLOADS[w][2]} for w in workloads}
    data["results"] = summary
    data["targets"] = report.targets(summary)
    data["errors"] = errors

    print(header(data))
    print()
    print("Ratios first: `x gprocpool` is the contender's cost divided by gprocpool's for the same work "
          "(time per task, or the inverse of a rate; for H the gap): above 1, gprocpool does better. "
          "Medians over the repeats; min - max in the same unit.")
    print()
    print(report.table(summary, data["contenders"], sizes))
    print()
    for w in workloads:
        print(f"- **{w}**: {WORKLOADS[w][0]}")
    print()
    print("Targets (issue 3), from the medians of this run:")
    print()
    print(report.format_targets(data["targets"]))
    print()
    print(f"total {data['wall_s']} s; JSON: {args.json}")
    if errors:
        print("\nERRORS:\n" + "\n".join(errors))

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
