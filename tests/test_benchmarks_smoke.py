"""A cheap run of the benchmark suite (benchmarks/), so that it never rots.

Only that every workload runs for every contender and that the JSON is complete is
checked here; the figures of a smoke run mean nothing and no speed is asserted.
"""
from __future__ import annotations

import json
import os
import sys

import gevent.subprocess as subprocess
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Generous: the smoke run takes a few seconds; a stuck one must still fail, not hang.
RUN_TIMEOUT = 50

WORKLOADS = {"L", "L_free", "T_map", "T_concurrent", "B", "R", "S", "H_map", "H_concurrent"}
CONTENDERS = {"gprocpool", "raw", "mp_pool", "ppe", "pebble", "loky", "exec"}
# Contenders that sit some workloads out by design (the JSON says why).
NOT_APPLICABLE = {("loky", "R")} | {("exec", w) for w in WORKLOADS - {"R", "S"}}


def _run(args, timeout=RUN_TIMEOUT):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the suite must find gprocpool and itself from the checkout
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.subprocess
def test_smoke_run_covers_every_workload_and_contender(tmp_path):
    out = tmp_path / "results.json"
    proc = _run(["-m", "benchmarks", "--smoke", "--jobs", "3", "--json", str(out)])
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())

    assert set(data["results"]) == WORKLOADS
    assert set(data["contenders"]) == CONTENDERS
    for workload, row in data["results"].items():
        assert set(row) == CONTENDERS, workload
        for contender, entry in row.items():
            assert "error" not in entry, (workload, contender, entry["error"])
            if (contender, workload) in NOT_APPLICABLE or "not installed" in entry.get("skipped", ""):
                assert entry.get("skipped"), (workload, contender)
            else:
                assert entry["median"] > 0 and entry["repeats"] >= 1, (workload, contender)
                assert entry["ratio"] > 0, (workload, contender)
    assert data["targets"] and data["errors"] == []
    # The table and the machine header went to stdout.
    assert "| workload | contender | x gprocpool |" in proc.stdout
    assert "command: `python -m benchmarks --smoke" in proc.stdout


@pytest.mark.subprocess
def test_script_entry_point():
    proc = _run([os.path.join("benchmarks", "run.py"), "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--only" in proc.stdout
