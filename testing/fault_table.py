"""Run each fault scenario several times on a local CPU/gloo job and print a Markdown table of the
median time from the fault to each surviving rank's exit (and each rank's exit code).

    python -m pp1.testing.fault_table --runs 3 [--scenario kill_leader_mid_chunk ...] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from pp1.testing.fault_scenarios import FLOOR, GRACE, SCENARIOS, STALL_S, H, W, run_scenario

ROLES = {0: "front", 1: "leader", 2: "worker"}

WHAT = {
    "kill_leader_mid_chunk": "SIGKILL leader after relaying chunk 2",
    "kill_worker_mid_chunk": "SIGKILL worker on chunk 2's header",
    "kill_front_idle": "SIGKILL front while idle (heartbeats only)",
    "kill_front_mid_chunk": "SIGKILL front right after sending chunk 2",
    "leader_stall": f"leader sleeps {STALL_S:g} s on chunk 2 (deadline floor {FLOOR:g} s)",
    "sigterm_idle": "SIGTERM front while idle (orderly shutdown)",
}


def run_table(names: list[str], runs: int, json_path: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        sc = SCENARIOS[name]
        detect: dict[int, list[float]] = {r: [] for r in range(sc.world)}
        codes: dict[int, Counter] = {r: Counter() for r in range(sc.world)}
        failures = 0
        for i in range(runs):
            res = run_scenario(sc, workdir=Path(tempfile.mkdtemp(prefix=f"pp1-{name}-{i}-")))
            rec = res.record()
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            failures += bool(res.problems())
            for r, c in res.codes.items():
                codes[r][c] += 1
            for r, t in res.detect_s.items():
                if r != sc.faulty_rank:
                    detect[r].append(t)
            print(f"{name} run {i + 1}/{runs}: codes={res.codes} detect_s="
                  f"{ {r: round(t, 3) for r, t in res.detect_s.items()} } problems={res.problems()}",
                  file=sys.stderr, flush=True)
        rows.append({"name": name, "runs": runs, "failures": failures, "detect": detect, "codes": codes,
                     "faulty": sc.faulty_rank})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | fault | front exit | leader exit | worker exit | exit codes (front/leader/worker) "
            "| runs ok |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for row in rows:
        cells = []
        for r in (0, 1, 2):
            if r == row["faulty"]:
                cells.append("(faulty)")
            elif row["detect"].get(r):
                cells.append(f"{statistics.median(row['detect'][r]):.2f} s")
            else:
                cells.append("-")
        codes = "/".join(",".join(str(c) for c in sorted(row["codes"][r], key=str)) for r in (0, 1, 2))
        lines.append(f"| {row['name']} | {WHAT.get(row['name'], '')} | {cells[0]} | {cells[1]} | {cells[2]} "
                     f"| {codes} | {row['runs'] - row['failures']}/{row['runs']} |")
    lines.append("")
    lines.append(f"Medians of the time from the fault (its own record, or the signal sent) to each surviving "
                 f"rank's process exit, CPU/gloo, 3 ranks (front + TP=2), H={H:g} s, W={W:g} s, deadline floor "
                 f"{FLOOR:g} s, front grace {GRACE:g} s. Exit codes: 0 shutdown, 1 failed, 3 orphan, -9 SIGKILL.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    p.add_argument("--json", default=None, help="append every run's record here (JSON lines)")
    args = p.parse_args(argv)
    rows = run_table(args.scenario or list(SCENARIOS), args.runs, args.json)
    print(markdown(rows))
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
