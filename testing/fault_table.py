"""Run the fault drills several times and print one Markdown table: each case, what was injected, what is
expected, the exit code(s), the time from the injection to every process of the job gone (median / max),
the cause named, and the runs that met every expectation.

Two kinds of case: the drills on the real ``pp1 run`` (``launcher_faults.DRILLS``: signals to the launcher,
torchrun and each rank, each PP1_FAULT point; the job's processes found in /proc), and the local-job
scenarios (``fault_scenarios.SCENARIOS``: ranks as direct subprocesses, for what ``pp1 run`` cannot reach,
e.g. a front idle on heartbeats; the cause is what the launcher would name from the ranks' events).

    python -m pp1.testing.fault_table --runs 3 [--case NAME ...] [--json runs.jsonl] [--md table.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pp1.adapters.launch.launcher import root_failure
from pp1.testing import launcher_faults
from pp1.testing.fault_scenarios import FLOOR, GRACE, SCENARIOS, STALL_S, H, W, run_scenario
from pp1.testing.launcher_faults import DRILLS, run_drill

ROLES = {0: "front", 1: "leader", 2: "worker"}

WHAT = {  # the local-job scenarios, in words
    "kill_leader_mid_chunk": "local job: `PP1_FAULT=rank=1,at=relayed:2,do=kill` (leader SIGKILLs itself after "
                             "relaying chunk 2)",
    "kill_worker_mid_chunk": "local job: `PP1_FAULT=rank=2,at=chunk:2,do=kill` (worker, on chunk 2's header)",
    "kill_front_idle": "local job: `PP1_FAULT=rank=0,at=idle,do=kill` (front SIGKILLs itself idle on heartbeats)",
    "kill_front_mid_chunk": "local job: `PP1_FAULT=rank=0,at=sent:2,do=kill` (front, after sending chunk 2)",
    "leader_stall": f"local job: `PP1_FAULT=rank=1,at=chunk:2,do=stall:{STALL_S:g}` (leader; deadline floor "
                    f"{FLOOR:g} s)",
    "sigterm_idle": "local job: SIGTERM front idle on heartbeats (`--after-chunks idle`)",
}

CASES = [*DRILLS, *SCENARIOS]


@dataclass
class Outcome:
    """One run of a case, from its record (a run's JSON line: the table can be rebuilt from saved runs)."""

    code: str  # the launcher's exit code (local job: front/leader/worker)
    gone_s: float | None  # injection -> every process of the job gone
    ranks_s: float | None  # injection -> every rank gone
    cause: str
    ok: bool
    load: float

    @classmethod
    def of(cls, rec: dict[str, Any]) -> Outcome:
        ok, load = not rec.get("problems"), float(rec.get("load") or 0.0)
        if "drill" in rec:
            per = rec.get("per_process_s") or {}
            ranks = [t for kind, t in per.items() if kind.startswith("rank")]
            return cls(str(rec["code"]), rec.get("gone_s"), max(ranks) if ranks and not rec.get("leftovers") else None,
                       _drill_cause(rec), ok, load)
        codes = {int(r): c for r, c in rec["codes"].items()}
        detect = list((rec.get("detect_s") or {}).values())
        gone = max(detect) if detect and None not in codes.values() else None
        return cls("/".join(str(codes[r]) for r in sorted(codes)), gone, gone, rec.get("cause") or "-", ok, load)


def _drill_cause(rec: dict[str, Any]) -> str:
    """The cause named on pp1 run's last line, without what changes from run to run (times, ports)."""
    line = str(rec.get("last_line") or "")
    if not line.startswith(("pp1 run: ok", "pp1 run: FAILED", "pp1 run: invalid")):
        exits = rec.get("rank_exits") or {}
        codes = ", ".join(f"{k} {v}" for k, v in sorted(exits.items()))
        return f"no last line (pp1 run was killed); the ranks' own exits: {codes or 'none seen'}"
    return _quiet(re.sub(r"^ok \([\d.]+ s\)", "ok", line.removeprefix("pp1 run: ")))


def _quiet(cause: str) -> str:
    """gloo's words without what differs between runs (ports) or says nothing (its source path, its advice)."""
    cause = re.sub(r"\[/[^\]]*gloo[^\]]*\] ", "", cause)
    cause = re.sub(r"\. This is typically caused by.*?GLHF!\s*\S*", "", cause)
    return re.sub(r"\]:\d+", "]:PORT", cause)


@dataclass
class Row:
    name: str
    what: str
    expect: str
    codes: Counter = field(default_factory=Counter)
    gone_s: list[float] = field(default_factory=list)
    ranks_s: list[float] = field(default_factory=list)
    causes: Counter = field(default_factory=Counter)
    loads: list[float] = field(default_factory=list)  # the 1-minute load average after each run
    runs: int = 0
    ok: int = 0

    def add(self, out: Outcome) -> None:
        self.runs += 1
        self.ok += out.ok
        self.codes[out.code] += 1
        self.causes[out.cause] += 1
        self.loads.append(out.load)
        if out.gone_s is not None:
            self.gone_s.append(out.gone_s)
        if out.ranks_s is not None:
            self.ranks_s.append(out.ranks_s)


def _drill_run(name: str, i: int) -> dict[str, Any]:
    """One run of a pp1 run drill: its record."""
    return run_drill(DRILLS[name], workdir=Path(tempfile.mkdtemp(prefix=f"pp1-drill-{i}-"))).record()


def _scenario_run(name: str, i: int) -> dict[str, Any]:
    """One run of a local-job scenario: its record, with the cause as the launcher would name it."""
    sc = SCENARIOS[name]
    res = run_scenario(sc, workdir=Path(tempfile.mkdtemp(prefix=f"pp1-{name}-{i}-")))
    codes = [f"exitcode: {rp.exit_code} (pid: {rp.popen.pid})" for rp in res.job.procs if rp.exit_code is not None]
    _rank, why = root_failure([e for r in range(sc.world) for e in res.job.events(r)], codes)  # as torchrun reports
    why = _quiet(why) if why else "ok (every rank exited 0)"
    return {**res.record(), "cause": why, "load": os.getloadavg()[0]}


def _row(name: str) -> Row:
    drill = DRILLS.get(name)
    if drill is not None:
        return Row(name, _drill_what(drill), drill.expect)
    return Row(name, WHAT.get(name, name), _scenario_expect(name))


def run_table(names: list[str], runs: int, json_path: str | None = None) -> list[Row]:
    rows = []
    for name in names:
        row = _row(name)
        for i in range(runs):
            rec = {"case": name, "run": i, **(_drill_run if name in DRILLS else _scenario_run)(name, i)}
            out = Outcome.of(rec)
            row.add(out)
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(rec, default=str) + "\n")
            print(f"{name} run {i + 1}/{runs}: exit {out.code} ranks gone {out.ranks_s} all gone {out.gone_s} "
                  f"ok={out.ok} {out.cause[:150]}{'' if out.ok else ' PROBLEMS: ' + str(rec.get('problems'))}",
                  file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def rows_from_json(paths: list[str], names: list[str]) -> list[Row]:
    """The table of saved runs (JSON lines of ``--json``), in the order of ``names``."""
    rows = {name: _row(name) for name in names}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("case") in rows:
                rows[rec["case"]].add(Outcome.of(rec))
    return [row for row in rows.values() if row.runs]


def _drill_what(d: launcher_faults.Drill) -> str:
    fault = f" (`PP1_FAULT={d.fault}`)" if d.fault and d.sig is not None else ""
    return f"{d.what}{fault}" if d.sig is not None else f"`PP1_FAULT={d.fault}`: {d.what}"


def _scenario_expect(name: str) -> str:
    sc = SCENARIOS[name]
    want = {"zero": "0", "nonzero": "≠0", "killed": "-9"}
    codes = "/".join(want.get(sc.expect.get(r, ""), "?") for r in range(sc.world))
    bounds = ", ".join(f"{ROLES[r]} ≤ {b:g} s" for r, b in sorted(sc.bound_s.items()))
    return f"front/leader/worker exit {codes}; {bounds}"


def _cell(text: str, limit: int = 160) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _times(values: list[float], runs: int) -> str:
    out = f"{statistics.median(values):.2f} / {max(values):.2f} s" if values else "-"
    return out + (f" ({runs - len(values)} not timed)" if values and len(values) < runs else "")


def markdown(rows: list[Row]) -> str:
    lines = ["| case | injected | expected | exit code | ranks gone: median / max | all gone: median / max "
             "| named cause | runs ok |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        codes = ", ".join(f"{c}" + (f" ×{n}" if len(row.codes) > 1 else "") for c, n in row.codes.most_common())
        gone, ranks = _times(row.gone_s, row.runs), _times(row.ranks_s, row.runs)
        cause, n = row.causes.most_common(1)[0] if row.causes else ("-", 0)
        others = row.runs - n
        cause_cell = _cell(cause, 230) + (f" (and {others} other)" if others else "")
        lines.append(f"| {row.name} | {_cell(row.what, 200)} | {row.expect} | {codes} | {ranks} | {gone} | {cause_cell} "
                     f"| {row.ok}/{row.runs} |")
    return "\n".join(lines)


def machine(rows: list[Row]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    loads = sorted(x for row in rows for x in row.loads)
    load = (f"; the 1-minute load average after each run (the box is shared): min {loads[0]:.1f}, median "
            f"{statistics.median(loads):.1f}, max {loads[-1]:.1f}" if loads else "")
    return (f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, CPU/gloo{load}")


def legend() -> str:
    return (f"The job: `pp1 run` (launcher -> torchrun -> front + TP=2, 3 ranks, `{' '.join(launcher_faults.RUN_ARGS)}`) "
            f"or the local job (ranks as direct subprocesses, H={H:g} s, W={W:g} s, deadline floor {FLOOR:g} s, the "
            f"front's fail grace {GRACE:g} s). All gone: from the injection (the signal sent, or the fault's own "
            f"record) to the last process of the job (launcher, torchrun, every rank; local job: every rank) gone "
            f"from /proc. Exit code: the launcher's (-9: it was the one SIGKILLed; 128+N: torchrun killed by signal "
            f"N); local job: front/leader/worker. Named cause: the last line of `pp1 run` without its prefix (local "
            f"job: what the launcher names from the ranks' events). Runs ok: runs meeting every expectation at "
            f"the issue's bounds, without slack.")


BEGIN, END = "<!-- fault table: generated -->", "<!-- end of the fault table -->"


def write_md(path: Path, text: str) -> None:
    """``text`` into ``path``: between its BEGIN and END markers when it has them, else the whole file."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--case", action="append", choices=CASES, metavar="NAME",
                   help="a case (default: all): " + ", ".join(CASES))
    p.add_argument("--json", default=None, help="append every run's record here (JSON lines)")
    p.add_argument("--md", default=None, help="also write the table, its legend and the machine here (between "
                   f"{BEGIN} and {END} when the file has them: the rest is kept)")
    p.add_argument("--from-json", action="append", default=[], metavar="PATH",
                   help="build the table from saved runs (--json files) instead of running anything")
    args = p.parse_args(argv)
    if args.from_json:
        rows = rows_from_json(args.from_json, args.case or CASES)
    else:
        rows = run_table(args.case or CASES, args.runs, args.json)
    table = markdown(rows)
    print(table)
    if args.md:
        write_md(Path(args.md), f"{table}\n\n{legend()}\n\nMeasured on: {machine(rows)}.\n")
    return 0 if all(r.ok == r.runs for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
