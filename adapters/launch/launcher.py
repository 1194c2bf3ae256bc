"""``pp1 run``: launch the whole job through torchrun, drive N chunks headless, print timings.

Runs ``python -m torch.distributed.run --standalone --nproc-per-node <1+M | M> -m pp1.adapters.roles.main``
in its own session, reads the ranks' ``PP1-EVENT`` lines (progress, ready, one per chunk, summary,
failures), and reads the front's JSON report at the end. Exit 0 when the job shut down in order;
non-zero with the failing rank and its reason otherwise. Ctrl-C / SIGTERM: the job is asked to
drain (SIGTERM to torchrun, which forwards it to every rank), then killed after a bound.

Python API for the bench: ``launch(LaunchOptions(...)) -> RunReport``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pp1.adapters.rank import options
from pp1.adapters.rank.faults import ENV_FAULT, parse_faults
from pp1.adapters.rank.observe import parse_event
from pp1.adapters.rank.options import InvalidOption
from pp1.fsm.base import FailureCause
from pp1.fsm.blame import root_cause

STARTUP_PHASES = ("init", "parity", "loading", "voting", "fingerprint", "barrier", "warming_channels", "warmup")
RANK_ENTRY = "pp1.adapters.roles.main"  # the torchrun entry of every rank
MAX_CPU_PROCESSES = 64  # a sane bound for a job of CPU ranks on one host


@dataclass
class LaunchOptions(options.JobOptions):
    """One job: the option table's :class:`JobOptions` plus how to start it. ``tp`` is the mesh size M;
    the job has 1 + M ranks under pp1, M under tp."""

    tp: int | None = 2
    extra_args: list[str] = field(default_factory=list)  # more options for every rank
    entry: str = RANK_ENTRY  # the module every rank runs (``pp1 bench --hop``: the hop's)
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def rank_args(self, report_json: str) -> list[str]:
        return [*options.rank_argv(replace(self, report_json=report_json, after_chunks="shutdown")), *self.extra_args]

    def command(self, report_json: str) -> list[str]:
        return [
            self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
            "-m", self.entry, *self.rank_args(report_json),
        ]


def check_options(opts: LaunchOptions) -> None:
    """Refuse, before anything starts, what every rank would refuse after startup: the option table's
    checks (sizes, durations, the RunConfig's rules), a pipeline that does not load or refuses an option,
    a preset it does not know, too few GPUs."""
    from pp1.pipelines.loader import (
        PipelineLoadError,
        PipelineOptionError,
        load_factory,
        require_compile_support,
    )

    options.check(opts, options.RUN)
    check_faults({**os.environ, **opts.env}.get(ENV_FAULT), opts.nproc)
    try:
        factory = load_factory(opts.pipeline, opts.pipeline_options)
    except PipelineLoadError as exc:
        raise InvalidOption("--pipeline", str(exc)) from None
    except PipelineOptionError as exc:
        raise InvalidOption(f"--pipeline-option {exc.key}", exc.reason) from None
    try:
        factory.geometry(opts.preset)
    except Exception as exc:  # the pipeline's own words: unknown preset, bad shape, ...
        raise InvalidOption("--preset", f"{type(exc).__name__}: {exc}") from None
    if opts.compile:
        try:
            require_compile_support(factory, opts.pipeline)
        except PipelineLoadError as exc:
            raise InvalidOption("--compile", exc.reason) from None
    if opts.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        if have < opts.nproc:
            raise InvalidOption("--device", f"{opts.topology} with --tp {opts.tp} needs {opts.nproc} GPUs "
                                f"(one per rank); {have} visible")

    check_mesh = getattr(factory, "check_mesh_size", None)  # the pipeline knows what it can shard
    if callable(check_mesh):
        try:
            check_mesh(opts.preset, opts.mesh_size())
        except ValueError as exc:
            raise InvalidOption("--tp", str(exc)) from None
    if opts.device == "cpu" and opts.nproc > MAX_CPU_PROCESSES:
        raise InvalidOption("--tp", f"{opts.nproc} processes on the CPU: at most {MAX_CPU_PROCESSES} (each rank is "
                            "a process with its own copy of the runtime)")

def check_faults(spec: str | None, nproc: int) -> None:
    """A fault drill that cannot fire as written (``PP1_FAULT``: an unknown point or action, a rank the job
    does not have) is refused before any process starts: a mistyped fault must not pass a drill silently."""
    try:
        planned = parse_faults(spec)
    except ValueError as exc:
        raise InvalidOption(ENV_FAULT, str(exc).removeprefix(f"{ENV_FAULT}: ")) from None
    for fault in planned:
        if not 0 <= fault.rank < nproc:
            raise InvalidOption(ENV_FAULT, f"{fault}: the job has ranks 0..{nproc - 1}")


@dataclass
class RunReport:
    """What a launched job did. ``chunks``/``summary`` come from the front's JSON report."""

    ok: bool
    exit_code: int
    wall_s: float
    chunks: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    startup_s: float | None = None
    warmup_ms: list[float] = field(default_factory=list)
    failure: str | None = None
    failing_rank: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)\)?\s*(?:local_rank:\s*\d+\s*)?\(pid:\s*(\d+)\)")


def torchrun_exitcodes(lines: list[str]) -> dict[int, int]:
    """pid -> exit code, from torchrun's own report of its failed workers (-N: killed by signal N)."""
    out: dict[int, int] = {}
    for line in lines:
        for code, pid in _EXITCODE.findall(line):
            out[int(pid)] = int(code)
    return out


def _how(code: int | None) -> str:
    if code is None:
        return "no exit code seen"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def root_failure(events: list[dict[str, Any]], log_lines: list[str] | None = None) -> tuple[int | None, str | None]:
    """The rank at fault and why (``fsm.blame.root_cause`` over every rank's exit of the last attempt):
    a rank that died without a word first, then a local cause, then the peer a remote cause blames."""
    attempt = max((int(e.get("attempt") or 0) for e in events), default=0)
    ev = [e for e in events if int(e.get("attempt") or 0) == attempt and isinstance(e.get("rank"), int)]
    roles = {e["rank"]: str(e.get("role")) for e in ev if e["rank"] >= 0}
    pids = {e["rank"]: e["pid"] for e in ev if e["rank"] >= 0 and isinstance(e.get("pid"), int)}
    exits = {e["rank"]: e for e in ev if e.get("event") == "exit"}
    reports: dict[int, FailureCause] = {}
    bare: dict[int, FailureCause] = {}  # a non-zero exit without a recorded cause (a crash before a machine saw it)
    for r, e in exits.items():
        c = e.get("cause")
        if e.get("code") not in (0, None):
            if c:
                reports[r] = FailureCause(**c)
            else:
                bare[r] = FailureCause(rank=r, phase="?", reason=str(e.get("reason")), kind="local")
    if not reports:
        reports = bare
    for e in ev:  # a rank that failed and reported it, but whose exit line was lost
        if e.get("event") == "failed" and e["rank"] not in reports:
            reports[e["rank"]] = FailureCause(rank=e["rank"], phase=str(e.get("phase", "?")),
                                              reason=str(e.get("reason")), kind="local")
    codes = torchrun_exitcodes(log_lines or [])
    silent = {r: f"died without a word ({_how(codes.get(pid))})" for r, pid in pids.items() if r not in exits}
    if not reports and not silent:
        return None, None
    root = root_cause(reports, silent, roles)
    assert root is not None
    return root.rank, f"rank {root.rank} ({roles.get(root.rank, '?')}): {root.reason}"


@dataclass
class Supervised:
    """What a supervised torchrun did: its exit code, every PP1-EVENT, the last log lines."""

    code: int | None
    events: list[dict[str, Any]]
    tail: list[str]
    asked_to_stop: bool
    wall_s: float
    exit_lines: list[str] = field(default_factory=list)  # torchrun's own report of the workers' exit codes
    timed_out: bool = False  # the launcher ended it at its bound (--timeout-s)


def supervise(
    command: list[str],
    env: dict[str, str],
    *,
    timeout_s: float | None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    stop_bound_s: float = 60.0,
) -> Supervised:
    """Run ``command`` (torchrun) in its own session to its end, reading the ranks' PP1-EVENT lines.
    ``stop`` set: SIGTERM to torchrun (it forwards it to every rank: an orderly drain), then a bound.
    ``timeout_s`` passed: SIGTERM, then SIGKILL. Every path ends with no rank left behind: torchrun starts
    each rank in its own session, so the ranks that never said goodbye are killed by pid."""
    env = {**env}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            start_new_session=True, preexec_fn=_term_with_parent())
    events: list[dict[str, Any]] = []
    tail: collections.deque[str] = collections.deque(maxlen=80)
    exit_lines: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            ev = parse_event(line)
            if ev is not None:
                events.append(ev)
                if on_event is not None:
                    on_event(ev)
            else:
                tail.append(line)
                if "exitcode" in line:
                    exit_lines.append(line)
                if on_log is not None:
                    on_log(line)

    rd = threading.Thread(target=reader, daemon=True)
    rd.start()
    deadline = math.inf if timeout_s is None else t0 + timeout_s
    asked_to_stop = timed_out = False
    try:
        while proc.poll() is None:
            if stop is not None and stop.is_set() and not asked_to_stop:
                asked_to_stop = True
                _signal_group(proc, signal.SIGTERM)
                deadline = min(deadline, time.monotonic() + stop_bound_s)
            if time.monotonic() > deadline:
                timed_out = True
                tail.append(f"launcher: job still running after its bound ({timeout_s} s): killing it")
                _signal_group(proc, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)
        rd.join(5)
        _kill_leftovers(events)
    return Supervised(proc.returncode, events, list(tail), asked_to_stop, time.monotonic() - t0, exit_lines, timed_out)


def _term_with_parent() -> Callable[[], None] | None:
    """torchrun's pre-exec step: SIGTERM when its parent (this launcher) dies, even by SIGKILL, so the job
    drains instead of running on unseen (its ranks watch torchrun in turn). Linux only (prctl); None elsewhere.
    The launcher's thread that starts torchrun waits for it (``supervise``), so the signal means the launcher."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def pre_exec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return pre_exec


def _kill_leftovers(events: list[dict[str, Any]]) -> None:
    """Every rank that reported a pid and no exit is killed (it outlived torchrun, or torchrun was killed)."""
    exited = {e.get("pid") for e in events if e.get("event") == "exit"}
    for pid in {e["pid"] for e in events if isinstance(e.get("pid"), int)} - exited:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def launch(
    opts: LaunchOptions,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> RunReport:
    """Run the job to its end. ``on_event`` sees every PP1-EVENT; ``on_log`` every other line;
    setting ``stop`` asks the job to drain (SIGTERM to torchrun). Raises InvalidOption, having
    started nothing, for options that cannot work."""
    check_options(opts)
    tmpdir = tempfile.mkdtemp(prefix="pp1-run-")
    report_json = opts.report_json or os.path.join(tmpdir, "report.json")
    sup = supervise(opts.command(report_json), {**os.environ, **opts.env}, timeout_s=opts.timeout_s,
                    on_event=on_event, on_log=on_log, stop=stop)
    events, code = sup.events, sup.code
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError), open(report_json) as f:
        report = json.load(f)
    rank, failure = root_failure(events, sup.exit_lines)
    exits = [e for e in events if e.get("event") == "exit"]
    # torchrun exits non-zero when it forwarded a SIGTERM (ours, or anyone's: a drain of the job); the ranks'
    # own exits tell the truth
    drained = len(exits) == opts.nproc and all(e.get("code") == 0 for e in exits)
    ok = (code == 0 or drained) and bool(report.get("ok")) and failure is None
    if not ok and code is not None and code < 0 and not (sup.asked_to_stop or sup.timed_out):
        # torchrun itself was killed (not by us): the root cause; its ranks followed it (their parent died)
        rank, failure = None, f"torchrun {_how(code)}: every rank ended with it (no orphan)"
    if not ok and sup.asked_to_stop and not sup.timed_out:  # a stop inside the startup collectives fails the job
        failure = "stopped by a signal to pp1 run" + (f"; {failure}" if failure else "")
    if not ok and sup.timed_out:
        failure = f"the job ran past --timeout-s {opts.timeout_s:g}" + (f"; {failure}" if failure else "")
    if not ok and failure is None:
        failure = report.get("reason") or f"torchrun exited {code}"
    exit_code = 0 if ok else (128 - code if code is not None and code < 0 else code or 1)  # -N: killed by N
    return RunReport(
        ok=ok, exit_code=exit_code, wall_s=sup.wall_s,
        chunks=report.get("chunks", []), summary=report.get("summary", {}), startup_s=report.get("startup_s"),
        warmup_ms=report.get("warmup_ms", []), failure=None if ok else failure, failing_rank=None if ok else rank,
        events=events, log_tail=sup.tail, report=report,
    )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
