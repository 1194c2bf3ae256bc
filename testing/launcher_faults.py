"""Fault drills on the real ``pp1 run``, from outside, as an operator would: the CLI (``python -m pp1 run``
-> the launcher -> torchrun -> 3 ranks: front + TP=2 on CPU/gloo, the stand-in pipeline) runs as a
subprocess in its own session; every process of the job is found in /proc (the launcher, torchrun, each
rank by its ``RANK``); the drill injects a signal into one of them or a ``PP1_FAULT``, then times the
injection to "every process of the job gone" and reads the launcher's exit code and last line (the named
cause, or ``pp1 run: ok``).

A signal lands in a phase through a *hold point*: a short ``PP1_FAULT`` stall keeps the job there (the
front held between READY and its first chunk, rank 2 held in loading) and the signal goes out once the
stall has fired; mid-stream signals go out once the launcher printed chunk 3.

One table of drills (:data:`DRILLS`), one runner (:func:`run_drill`); ``python -m pp1.testing.fault_table``
prints them with the local-job scenarios.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pp1.adapters.launch.launcher import RANK_ENTRY

H, W, FLOOR = 0.25, 1.5, 1.5  # heartbeat, watchdog, deadline floor (s): short, as the local-job drills
RUN_ARGS = ["--pipeline", "pp1.testing.standin:factory", "--tp", "2", "--heartbeat-s", str(H), "--watchdog-s",
            str(W), "--deadline-floor-s", str(FLOOR), "--timeout-s", "120"]
ROLES = {0: "front", 1: "leader", 2: "worker"}
RANK_OF = {role: rank for rank, role in ROLES.items()}
TARGETS = ("launcher", "torchrun", "front", "leader", "worker")

# the bounds (s), from the injection to every process of the job gone
DRAIN_S = 5.0  # a SIGTERM / SIGINT anywhere: an orderly drain of the whole job
ORPHAN_S = 2.0  # torchrun killed: every rank gone
FAIL_S = 10.0  # any rank failed: every process gone
REFUSE_S = 30.0  # a refused drill: the launcher's start (imports, checks) to its exit
RUN_S = 120.0  # a whole 5-chunk run, from the launcher's start

HOLD_READY = "rank=0,at=ready,do=stall:0.5"  # the front between READY and its first chunk (< W: no watchdog)
HOLD_LOADING = "rank=2,at=loading,do=stall:3"  # rank 2 loading; the others wait in the load vote
STREAM = "chunk:3"  # mid-stream: the launcher printed chunk 3


@dataclass(frozen=True)
class Drill:
    """``fault``: PP1_FAULT for every rank; ``target``/``sig``: the signal, sent once ``when`` happened
    (``chunk:N``: the launcher printed chunk N; ``fault``: the fault fired). Without a signal the injection
    is the fault itself (its moment: the rank's record). ``code``: the launcher's exit code (None: any
    non-zero); ``line``: what its last line must contain ("" for none: the launcher itself was killed)."""

    name: str
    what: str
    code: int | None
    line: str
    bound_s: float
    ranks_bound_s: float | None = None  # every rank gone within this (torchrun killed: the parent-death watch)
    fault: str = ""
    target: str = ""
    sig: int | None = None
    when: str = "fault"
    chunks: int = 100_000
    args: tuple[str, ...] = ()
    printed: str = ""  # a line of the launcher's output must contain this

    @property
    def expect(self) -> str:
        if self.code == 2:
            return f"exit 2 naming {self.line}, no process started"
        code = "exit 0" if self.code == 0 else "non-zero" if self.code is None else f"exit {self.code}"
        named = f" naming `{self.line}`" if self.line and self.code != 0 else ""
        also = f", prints `{self.printed}`" if self.printed else ""
        ranks = f", ranks gone ≤ {self.ranks_bound_s:g} s" if self.ranks_bound_s is not None else ""
        return f"{code}{named}{also}{ranks}, all gone ≤ {self.bound_s:g} s"


def _signal_drills() -> list[Drill]:
    """Every target x SIGTERM / SIGINT / SIGKILL, at three moments."""
    moments = [  # (name, words, hold fault, when)
        ("streaming", "mid-stream (after chunk 3)", "", STREAM),
        ("ready", "between READY and chunk 0 (front held 0.5 s)", HOLD_READY, "fault"),
        ("loading", "while loading (rank 2 held in loading 3 s, the rest in the vote)", HOLD_LOADING, "fault"),
    ]
    out = []
    for moment, words, hold, when in moments:
        for target in TARGETS:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
                if moment != "streaming" and sig == signal.SIGINT and target != "launcher":
                    continue  # SIGINT is SIGTERM to a rank and to torchrun; Ctrl-C is the launcher's
                code, line, bound = _expect(target, sig, moment)
                orphans = ORPHAN_S if target == "torchrun" and sig == signal.SIGKILL else None
                out.append(Drill(f"{sig.name}-{target}-{moment}", f"{sig.name} {target} {words}", code, line, bound,
                                 orphans, fault=hold, target=target, sig=sig, when=when))
    return out


def _expect(target: str, sig: int, moment: str) -> tuple[int | None, str, float]:
    """The issue's expectation for a signal to ``target`` at ``moment``."""
    if sig == signal.SIGKILL:
        if target == "launcher":
            return -signal.SIGKILL, "", DRAIN_S  # torchrun sees its parent die and drains the job
        if target == "torchrun":
            return None, "torchrun killed by SIGKILL", FAIL_S
        return None, f"rank {RANK_OF[target]} ({target})", FAIL_S
    if moment == "loading":  # a signal inside the startup collectives fails the job at once (it cannot drain)
        if target in RANK_OF:
            return None, f"rank {RANK_OF[target]} ({target}): SIGTERM during", FAIL_S
        return None, "stopped by a signal to pp1 run" if target == "launcher" else "SIGTERM during", FAIL_S
    return 0, "pp1 run: ok", DRAIN_S


def _fault_drills() -> list[Drill]:
    """Each PP1_FAULT point that matters, each action; drift drills; faults refused at start."""
    rows = [  # (fault, words, line)
        ("rank=0,at=load,do=fail", "front fails its load", "rank 0 (front)"),
        ("rank=2,at=load,do=fail", "worker fails its load", "rank 2 (worker)"),
        ("rank=1,at=warmup,do=kill", "leader SIGKILLs itself entering warmup", "rank 1 (leader)"),
        ("rank=2,at=warmup,do=exit:3", "worker exits 3 entering warmup", "rank 2 (worker)"),
        ("rank=0,at=ready,do=kill", "front SIGKILLs itself on READY", "rank 0 (front)"),
        ("rank=1,at=serving,do=fail", "leader raises entering serving (after READY)", "rank 1 (leader)"),
        ("rank=1,at=chunk:3,do=kill", "leader SIGKILLs itself on chunk 3's envelope", "rank 1 (leader)"),
        ("rank=2,at=chunk:3,do=kill", "worker SIGKILLs itself on chunk 3's header", "rank 2 (worker)"),
        ("rank=0,at=chunk:3,do=kill", "front SIGKILLs itself before sending chunk 3", "rank 0 (front)"),
        ("rank=0,at=sent:3,do=kill", "front SIGKILLs itself after sending chunk 3", "rank 0 (front)"),
        ("rank=1,at=relayed:3,do=kill", "leader SIGKILLs itself after relaying chunk 3", "rank 1 (leader)"),
        ("rank=1,at=chunk:3,do=fail", "leader raises on chunk 3", "rank 1 (leader)"),
        ("rank=2,at=chunk:3,do=exit:1", "worker exits 1 on chunk 3", "rank 2 (worker)"),
        ("rank=0,at=sent:3,do=fail", "front raises after sending chunk 3", "rank 0 (front)"),
        ("rank=1,at=chunk:3,do=stall:30", "leader stalls 30 s on chunk 3", "rank 1 (leader)"),
        ("rank=2,at=chunk:3,do=stall:30", "worker stalls 30 s on chunk 3", "rank 2 (worker)"),
        ("rank=0,at=chunk:3,do=stall:30", "front stalls 30 s before chunk 3", "rank 0 (front)"),
        ("rank=2,at=chunk:3,do=perturb_inputs", "worker's inputs drift on chunk 3 (+0.25)", "rank 2 (worker)"),
        ("rank=1,at=warmup,do=perturb_weights", "leader's weights drift after load (+0.5)", "rank 1 (leader)"),
    ]
    out = [Drill(f, w, None, line, FAIL_S, fault=f) for f, w, line in rows]
    refused = [  # (fault, words): refused before any process starts (the time: the launcher's whole run)
        ("rank=1,at=chunck:3,do=kill", "a mistyped point"),
        ("rank=1,at=chunk:3,do=explode", "an unknown action"),
        ("rank=7,at=chunk:3,do=kill", "a rank the job does not have"),
    ]
    out += [Drill(f, w, 2, "PP1_FAULT", REFUSE_S, fault=f, when="start") for f, w in refused]
    out.append(Drill("rank=1,at=relayed:999,do=kill", "a point a 5-chunk run never reaches", 0, "pp1 run: ok",
                     RUN_S, fault="rank=1,at=relayed:999,do=kill", when="start", chunks=5, printed="never fired"))
    return out


DRILLS: dict[str, Drill] = {d.name: d for d in [*_signal_drills(), *_fault_drills()]}


# -- the processes of the job ---------------------------------------------------------------------------


@dataclass
class Proc:
    pid: int
    start: str  # /proc/<pid>/stat starttime: a pid reused later is another process
    parent: int = 0
    kind: str = "?"  # launcher | torchrun | rank<N> | ? (not yet exec'd)
    gone_at: float | None = None


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, starttime) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(rest[1]), rest[0], rest[19]


def _kind(pid: int, parent: str) -> str:
    """What ``pid`` is, by its parent (a child not yet exec'd still shows its parent's command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if parent == "launcher" and b"torch.distributed.run" in argv:
            return "torchrun"
        if parent == "torchrun" and RANK_ENTRY.encode() in argv and b"torch.distributed.run" not in argv:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            return f"rank{int(env[b'RANK'])}"
    except (OSError, KeyError, ValueError):
        pass
    return "?"


class JobProcesses:
    """Every process descended from the launcher, as found in /proc (kept after it is reparented)."""

    def __init__(self, root: int) -> None:
        self.procs: dict[int, Proc] = {}
        st = _stat(root)
        if st is not None:
            self.procs[root] = Proc(root, st[2], kind="launcher")

    def scan(self) -> None:
        now = time.time()
        table: dict[int, tuple[int, str, str]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None:
                    table[int(name)] = st
        for pid, (ppid, _state, start) in table.items():
            if pid not in self.procs and ppid in self.procs and self.procs[ppid].gone_at is None:
                self.procs[pid] = Proc(pid, start, parent=ppid)
        for p in self.procs.values():
            st = table.get(p.pid)
            if p.gone_at is None and (st is None or st[2] != p.start or st[1] in "ZX"):
                p.gone_at = now
            elif p.gone_at is None and p.kind == "?":
                p.kind = _kind(p.pid, self.procs[p.parent].kind if p.parent in self.procs else "")

    def pid_of(self, kind: str) -> int | None:
        return next((p.pid for p in self.procs.values() if p.kind == kind and p.gone_at is None), None)

    def alive(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.gone_at is None]

    def kill_alive(self) -> list[str]:
        """SIGKILL every process still alive (the drill's cleanup); their kinds."""
        self.scan()
        left = self.alive()
        for p in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
        return [p.kind for p in left]


# -- one run of a drill ------------------------------------------------------------------------------


@dataclass
class DrillResult:
    drill: Drill
    code: int | None
    last_line: str
    gone_s: float | None  # injection -> every process gone (None: never injected, or not all gone)
    injected: bool
    chunks_after: int  # chunk lines the launcher printed after the injection
    per_process_s: dict[str, float] = field(default_factory=dict)  # kind -> injection to gone
    leftovers: list[str] = field(default_factory=list)  # still alive at the end: killed by the drill
    rank_exits: dict[str, int] = field(default_factory=dict)  # rank -> its exit code (its own record)
    rank_reasons: dict[str, str] = field(default_factory=dict)  # rank -> why it exited (its own record)
    load: float = 0.0  # the 1-minute load average at the end (a shared box's contention)
    seen: list[str] = field(default_factory=list)  # the kinds of process found
    lines: list[str] = field(default_factory=list)  # the launcher's output (stdout and stderr)

    def problems(self, slack_s: float = 0.0) -> list[str]:
        """What broke the drill's expectations (empty: as expected); ``slack_s`` is added to the bound."""
        d, out = self.drill, []
        if not self.injected:
            out.append(f"never injected ({d.when} not seen)")
        if d.code == 0 and self.code != 0 or d.code is None and self.code in (0, None) \
                or d.code not in (0, None) and self.code != d.code:
            out.append(f"exit code {self.code}, expected {d.code if d.code is not None else 'non-zero'}")
        if d.line and d.line not in self.last_line:
            out.append(f"last line {self.last_line!r} lacks {d.line!r}")
        if d.printed and not any(d.printed in line for line in self.lines):
            out.append(f"never printed {d.printed!r}")
        if d.code == 2 and set(self.seen) - {"launcher"}:
            out.append(f"refused, yet started {sorted(set(self.seen) - {'launcher'})}")
        ranks = self.ranks_gone_s()
        if d.ranks_bound_s is not None and (ranks is None or ranks > d.ranks_bound_s + slack_s):
            out.append(f"ranks gone after {ranks} s > {d.ranks_bound_s + slack_s:g} s")
        if self.leftovers:
            out.append(f"left alive: {self.leftovers}")
        elif self.gone_s is not None and self.gone_s > d.bound_s + slack_s:
            out.append(f"all gone after {self.gone_s:.2f} s > {d.bound_s + slack_s:g} s")
        return out

    def record(self) -> dict[str, Any]:
        return {"drill": self.drill.name, "code": self.code, "last_line": self.last_line, "gone_s": self.gone_s,
                "per_process_s": self.per_process_s, "chunks_after": self.chunks_after, "rank_exits": self.rank_exits,
                "rank_reasons": self.rank_reasons, "leftovers": self.leftovers, "load": self.load,
                "problems": self.problems()}

    def ranks_gone_s(self) -> float | None:
        """Injection -> the last rank gone."""
        ranks = [t for kind, t in self.per_process_s.items() if kind.startswith("rank")]
        return max(ranks) if ranks and not self.leftovers else None


def _last_line(lines: list[str]) -> str:
    return next((s for s in reversed(lines) if s.startswith("pp1 run:")), lines[-1] if lines else "")


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def run_drill(d: Drill, workdir: Path | None = None, python: str = sys.executable, poll_s: float = 0.02,
              hang_s: float = 40.0) -> DrillResult:
    """Run ``d`` once: start ``pp1 run``, inject, time until every process of the job is gone (at most
    ``hang_s`` past the bound: whatever is left then is killed and reported as left alive)."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="pp1-drill-"))
    times = workdir / "fault_times.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PP1_FAULT_TIMES": str(times)}
    env.pop("PP1_FAULT", None)
    if d.fault:
        env["PP1_FAULT"] = d.fault
    argv = [python, "-m", "pp1", "run", *RUN_ARGS, "--chunks", str(d.chunks), *d.args]
    lines: list[tuple[float, str]] = []  # (time seen, line) of stdout and stderr
    t_start = time.time()
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1, env=env, start_new_session=True)
    job = JobProcesses(launcher.pid)

    def read(stream: Any) -> None:
        for line in stream:
            lines.append((time.time(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (launcher.stdout, launcher.stderr)]
    for r in readers:
        r.start()
    chunk_re = re.compile(r"^chunk\s+(\d+)\s")

    def happened() -> float | None:
        """When the drill's trigger happened (wall clock), or None."""
        if d.when == "start":
            return t_start
        if d.when == "fault":
            faults = [r["t"] for r in _records(times) if r.get("event") == "fault"]
            return min(faults) if faults else None
        n = int(d.when.split(":")[1])
        return next((t for t, s in list(lines) if (m := chunk_re.match(s)) and int(m.group(1)) >= n), None)

    t0: float | None = None
    leftovers: list[str] = []
    try:
        end = time.monotonic() + 120
        while t0 is None and time.monotonic() < end:
            job.scan()
            t = happened()
            if t is not None and d.sig is None:
                t0 = t
            elif t is not None:
                pid = launcher.pid if d.target == "launcher" else job.pid_of(
                    "torchrun" if d.target == "torchrun" else f"rank{RANK_OF[d.target]}")
                if pid is not None:
                    t0 = time.time()
                    os.kill(pid, d.sig)
            if t0 is None and launcher.poll() is not None:
                break  # the launcher ended before the trigger
            time.sleep(poll_s)
        bound_end = time.monotonic() + d.bound_s + hang_s
        while time.monotonic() < bound_end:
            launcher.poll()
            job.scan()
            if not job.alive():
                break
            time.sleep(poll_s)
    finally:
        leftovers = job.kill_alive()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(launcher.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(10)
        for r in readers:
            r.join(5)
    text = [s for _, s in lines]
    gone = [p.gone_at for p in job.procs.values() if p.gone_at is not None]
    per = {p.kind: round(p.gone_at - t0, 3) for p in job.procs.values() if t0 is not None and p.gone_at is not None}
    exits = [r for r in _records(times) if r.get("event") == "exit"]
    return DrillResult(
        drill=d, code=launcher.returncode, last_line=_last_line(text),
        gone_s=None if t0 is None or leftovers or not gone else round(max(gone) - t0, 3), injected=t0 is not None,
        chunks_after=sum(1 for t, s in lines if t0 is not None and t >= t0 and chunk_re.match(s)),
        per_process_s=per, leftovers=leftovers, rank_exits={f"rank{r['rank']}": r["code"] for r in exits},
        rank_reasons={f"rank{r['rank']}": str(r.get("reason"))[:200] for r in exits}, load=os.getloadavg()[0],
        seen=sorted({p.kind for p in job.procs.values()}), lines=text,
    )
