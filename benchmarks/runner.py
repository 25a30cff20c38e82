"""One contender's workloads, in a process of its own.

    python -m benchmarks.runner CONFIG_JSON OUT_PATH

Each contender runs in a fresh process so that no pool inherits another's threads,
children or memory, and so that a peer that hangs can be killed without losing the rest
of the run.  Results are written to OUT_PATH after every workload (a timeout keeps what
finished).  Only the standard library is imported at the top: a pool that starts its
workers with ``spawn`` re-imports this module in every worker.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional


def _write(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0])
    out_path = argv[1]
    from benchmarks.contenders import CONTENDERS, NotApplicable
    from benchmarks.workloads import Runner

    cls = CONTENDERS[config["contender"]]
    data: Dict[str, Any] = {"version": cls.version(), "results": {}}
    results = data["results"]
    for workload in config["workloads"]:
        if cls.workloads is not None and workload not in cls.workloads:
            results[workload] = {"skipped": cls.not_applicable or "not applicable"}
            continue
        print(f"  {cls.key:10s} {workload:13s} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        try:
            results[workload] = getattr(Runner(cls(), config["sizes"]), workload)()
        except NotApplicable as exc:
            results[workload] = {"skipped": str(exc)}
        except Exception:  # noqa: BLE001 - recorded, the other workloads still run
            results[workload] = {"error": traceback.format_exc()}
            print(results[workload]["error"], file=sys.stderr, flush=True)
        results[workload]["wall_s"] = round(time.perf_counter() - began, 3)
        _write(out_path, data)
    _write(out_path, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
