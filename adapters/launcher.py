"""``pp1 run``: launch the whole job through torchrun, drive N chunks headless, print timings.

Runs ``python -m torch.distributed.run --standalone --nproc-per-node <1+M | M> -m pp1.adapters.main``
in its own session, reads the ranks' ``PP1-EVENT`` lines (progress, ready, one per chunk, summary,
failures), and reads the front's JSON report at the end. Exit 0 when the job shut down in order;
non-zero with the failing rank and its reason otherwise. Ctrl-C / SIGTERM: the job is asked to
drain (SIGTERM to torchrun, which forwards it to every rank), then killed after a bound.

Python API for the bench: ``launch(LaunchOptions(...)) -> RunReport``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .observe import parse_event

DEFAULT_PIPELINE = "pp1.pipelines.reference:factory"
STARTUP_PHASES = ("init", "parity", "loading", "voting", "fingerprint", "barrier", "warming_channels", "warmup")


@dataclass
class LaunchOptions:
    """One job. ``tp`` is the mesh size M; the job has 1 + M ranks under pp1, M under tp."""

    topology: str = "pp1"
    tp: int = 2
    preset: str = "tiny"
    pipeline: str = DEFAULT_PIPELINE
    pipeline_options: dict[str, str] = field(default_factory=dict)  # --pipeline-option KEY=VALUE
    device: str = "cpu"
    dtype: str = "float32"
    chunks: int = 8
    recompute_every: int = 1
    warmup_chunks: int = 1
    seed: int = 0
    heartbeat_s: float = 1.0
    watchdog_s: float = 5.0
    deadline_floor_s: float = 30.0
    deadline_factor: float = 4.0
    compile: bool = False
    prompt: str = "a calm sea at dawn"
    prompt_changes: list[str] = field(default_factory=list)  # "CHUNK:TEXT": after CHUNK shown chunks, TEXT
    context_source: str = "latents"  # KV-recompute context: "latents" | "reencode" (part of the RunConfig)
    timeout_s: float = 900.0  # the whole job, startup included
    report_json: str | None = None
    dump_frames: str | None = None  # the front saves each shown chunk's frames + latents here (debug/test aid)
    extra_args: list[str] = field(default_factory=list)  # more options for pp1.adapters.main
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable

    @property
    def nproc(self) -> int:
        return self.tp + 1 if self.topology == "pp1" else self.tp

    def rank_args(self, report_json: str) -> list[str]:
        args = [
            "--topology", self.topology, "--tp", str(self.tp), "--preset", self.preset, "--pipeline", self.pipeline,
            "--device", self.device, "--dtype", self.dtype, "--chunks", str(self.chunks),
            "--recompute-every", str(self.recompute_every), "--warmup-chunks", str(self.warmup_chunks),
            "--seed", str(self.seed), "--heartbeat-s", str(self.heartbeat_s), "--watchdog-s", str(self.watchdog_s),
            "--deadline-floor-s", str(self.deadline_floor_s), "--deadline-factor", str(self.deadline_factor),
            "--prompt", self.prompt, "--report-json", report_json, "--then", "shutdown",
            "--context-source", self.context_source,
        ]
        for change in self.prompt_changes:
            args += ["--prompt-change", change]
        for key, value in self.pipeline_options.items():
            args += ["--pipeline-option", f"{key}={value}"]
        if self.dump_frames:
            args += ["--dump-frames", self.dump_frames]
        if self.compile:
            args.append("--compile")
        return args + list(self.extra_args)

    def command(self, report_json: str) -> list[str]:
        return [
            self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
            "-m", "pp1.adapters.main", *self.rank_args(report_json),
        ]


class InvalidOption(ValueError):
    """A launch option that cannot work; raised before any process starts."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason


def check_options(opts: LaunchOptions) -> None:
    """Refuse, before anything starts, what every rank would refuse after startup: bad sizes, a config
    that fails RunConfig's rules, a pipeline that does not load, a preset it does not know, too few GPUs."""
    from pp1.pipelines.loader import (
        PipelineLoadError,
        PipelineOptionError,
        load_factory,
        require_compile_support,
    )
    from pydantic import ValidationError

    from .main import config_from_args
    from .prompt_changes import OPTION, parse_prompt_changes

    if opts.tp < 1:
        raise InvalidOption("--tp", f"the mesh needs at least one rank, got {opts.tp}")
    if opts.chunks < 1:
        raise InvalidOption("--chunks", f"drive at least one chunk, got {opts.chunks}")
    if opts.timeout_s <= 0:
        raise InvalidOption("--timeout-s", f"must be positive, got {opts.timeout_s}")
    if opts.dtype.removeprefix("torch.") not in ("float32", "float16", "bfloat16"):
        raise InvalidOption("--dtype", f"expected float32, float16 or bfloat16, got {opts.dtype!r}")
    if opts.dump_frames:
        from .frame_dump import check_dump_dir

        try:
            check_dump_dir(opts.dump_frames)
        except ValueError as exc:
            raise InvalidOption("--dump-frames", str(exc)) from None
    try:
        parse_prompt_changes(opts.prompt_changes, opts.chunks)
    except ValueError as exc:
        raise InvalidOption(OPTION, str(exc)) from None
    try:
        config_from_args(opts, opts.nproc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "-".join(str(x) for x in err["loc"]).replace("_", "-")
        raise InvalidOption(f"--{loc}" if loc else "options", err["msg"].removeprefix("Value error, ")) from None
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


def _first_failure(events: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """The earliest rank that failed, preferring a local cause (the rank that broke) over echoes."""
    failed = [e for e in events if e.get("event") == "failed"]
    exits = [e for e in events if e.get("event") == "exit" and e.get("code") not in (0, None)]
    pool = failed or exits
    if not pool:
        return None, None
    local = [e for e in pool if "(local)" in str(e.get("reason", ""))]
    e = min(local or pool, key=lambda ev: ev.get("t", 0.0))
    return e.get("rank"), f"rank {e.get('rank')} ({e.get('role')}): {e.get('reason')}"


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
    env = {**os.environ, **opts.env}
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        opts.command(report_json), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=env, start_new_session=True,
    )
    events: list[dict[str, Any]] = []
    tail: collections.deque[str] = collections.deque(maxlen=80)

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
                if on_log is not None:
                    on_log(line)

    rd = threading.Thread(target=reader, daemon=True)
    rd.start()
    deadline = t0 + opts.timeout_s
    asked_to_stop = False
    try:
        while proc.poll() is None:
            if stop is not None and stop.is_set() and not asked_to_stop:
                asked_to_stop = True
                _signal_group(proc, signal.SIGTERM)
                deadline = min(deadline, time.monotonic() + 60)
            if time.monotonic() > deadline:
                tail.append(f"launcher: job still running after its bound ({opts.timeout_s:.0f} s): killing it")
                _signal_group(proc, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                break
            time.sleep(0.1)
    finally:
        forced = proc.poll() is None or time.monotonic() > deadline
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)
        if forced:  # torchrun starts each rank in its own session: kill the ones that never said goodbye
            exited = {e.get("pid") for e in events if e.get("event") == "exit"}
            for pid in {e["pid"] for e in events if isinstance(e.get("pid"), int)} - exited:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        rd.join(5)
    code = proc.returncode
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError), open(report_json) as f:
        report = json.load(f)
    rank, failure = _first_failure(events)
    exits = [e for e in events if e.get("event") == "exit"]
    # torchrun exits non-zero when it forwarded our SIGTERM; the ranks' own exits tell the truth
    drained = asked_to_stop and len(exits) == opts.nproc and all(e.get("code") == 0 for e in exits)
    ok = (code == 0 or drained) and bool(report.get("ok")) and failure is None
    if not ok and failure is None:
        failure = report.get("reason") or f"torchrun exited {code}"
    return RunReport(
        ok=ok, exit_code=0 if ok else (code or 1), wall_s=time.monotonic() - t0,
        chunks=report.get("chunks", []), summary=report.get("summary", {}), startup_s=report.get("startup_s"),
        warmup_ms=report.get("warmup_ms", []), failure=None if ok else failure, failing_rank=None if ok else rank,
        events=events, log_tail=list(tail), report=report,
    )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# -- the CLI --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=int, default=8, help="chunks to drive (default 8)")
    p.add_argument("--tp", type=int, default=2, help="mesh size M (default 2)")
    p.add_argument("--topology", choices=["pp1", "tp"], default="pp1",
                   help="pp1: front rank 0 + M mesh ranks; tp: M ranks, rank 0 leads and fronts")
    p.add_argument("--preset", default="tiny",
                   help="model preset of the pipeline (reference: micro, tiny, wan-1.3b-shape, krea-14b-shape)")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="module:factory")
    p.add_argument("--pipeline-option", dest="pipeline_options", action="append", type=pipeline_option_arg,
                   default=[], metavar="KEY=VALUE", help="an option of the pipeline, e.g. checkpoint=PATH (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL + gloo control")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--recompute-every", type=int, default=1, help="K: KV recompute every K chunks (0 = never)")
    p.add_argument("--warmup-chunks", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--watchdog-s", type=float, default=5.0)
    p.add_argument("--deadline-floor-s", type=float, default=30.0)
    p.add_argument("--deadline-factor", type=float, default=4.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--prompt", default="a calm sea at dawn")
    p.add_argument("--prompt-change", action="append", default=[], metavar="CHUNK:TEXT", dest="prompt_change",
                   help='after CHUNK shown chunks change the prompt to TEXT (a hard cut: new epoch, the chunk '
                   'in flight is dropped); repeatable, e.g. --prompt-change 4:"a red fox in the snow"')
    p.add_argument("--context-source", choices=["latents", "reencode"], default="latents",
                   help="KV-recompute context frames: the previous latents (cheap), or with the window's first "
                   "latent frame re-encoded from its decoded frame by the VAE (parity with single-GPU)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="bound on the whole job")
    p.add_argument("--report-json", default=None, help="also keep the front's JSON report here")
    p.add_argument("--dump-frames", default=None, metavar="DIR",
                   help="debugging/test aid: the front saves each shown chunk's frames (uint8 [F,H,W,3]) and latents "
                   "as DIR/epoch{e}_chunk{k}.pt and ..._latents.pt (torch.save, off the comms thread); DIR is created")
    p.add_argument("--verbose", "-v", action="store_true", help="show the ranks' logs")


def pipeline_option_arg(text: str) -> tuple[str, str]:
    from pp1.pipelines.loader import parse_pipeline_option

    try:
        return parse_pipeline_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    return LaunchOptions(
        topology=args.topology, tp=args.tp, preset=args.preset, pipeline=args.pipeline,
        pipeline_options=dict(args.pipeline_options or []), device=args.device, dtype=args.dtype, chunks=args.chunks, recompute_every=args.recompute_every,
        warmup_chunks=args.warmup_chunks, seed=args.seed, heartbeat_s=args.heartbeat_s,
        watchdog_s=args.watchdog_s, deadline_floor_s=args.deadline_floor_s, deadline_factor=args.deadline_factor,
        compile=args.compile, prompt=args.prompt, timeout_s=args.timeout_s, report_json=args.report_json,
        prompt_changes=list(args.prompt_change or []), context_source=args.context_source,
        dump_frames=getattr(args, "dump_frames", None),
    )


def _fmt(v: Any, unit: str = "ms", width: int = 7) -> str:
    return f"{v:{width}.1f} {unit}" if isinstance(v, (int, float)) else f"{'-':>{width}} {unit}"


class _Printer:
    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self.seen: set[tuple[int, str]] = set()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        rank, role = ev.get("rank"), ev.get("role")
        if kind == "phase" and ev.get("phase") in STARTUP_PHASES:
            key = (int(rank or 0), str(ev.get("phase")))
            if key not in self.seen:
                self.seen.add(key)
                self.p(f"[startup] rank {rank} {role}: {ev.get('phase')}")
        elif kind == "compiled":
            self.p(f"[compiled] rank {rank} {role}: generator compiled in {ev.get('compile_s') or 0:.1f} s "
                   f"(load {ev.get('load_s') or 0:.1f} s)")
        elif kind == "ready":
            self.p(f"[ready] mesh of {ev.get('mesh_size')} ready after {ev.get('startup_s', 0):.2f} s "
                   f"(warmup {', '.join(f'{x:.0f}' for x in ev.get('warmup_ms', []))} ms)")
        elif kind == "chunk" and not ev.get("shown", True):
            self.p(f"chunk {ev.get('chunk_index'):3d} epoch {ev.get('cache_epoch')}  (stale) dropped by the epoch "
                   f"fence, never decoded or shown  mesh {_fmt(ev.get('mesh_ms'))}  round trip "
                   f"{_fmt(ev.get('round_trip_ms'))}{'  recompute' if ev.get('recompute') else ''}")
        elif kind == "chunk":
            self.p(f"chunk {ev.get('chunk_index'):3d} epoch {ev.get('cache_epoch')}  period {_fmt(ev.get('period_ms'))}"
                   f"  mesh {_fmt(ev.get('mesh_ms'))}  decode {_fmt(ev.get('decode_ms'))}"
                   f"  pp overhead {_fmt(ev.get('pp_overhead_ms'))}  round trip {_fmt(ev.get('round_trip_ms'))}"
                   f"{'  recompute' if ev.get('recompute') else ''}")
        elif kind == "prompt":
            self.p(f"[prompt] epoch {ev.get('cache_epoch')}: {ev.get('prompt')!r}")
        elif kind == "refused":
            self.p(f"[refused] chunk {ev.get('chunk_index')}: {ev.get('reason')}")
        elif kind == "failed":
            self.p(f"[failed] rank {rank} {role}: {ev.get('reason')}")
        elif kind == "summary":
            fps = ev.get("video_fps")
            ttff = ev.get("time_to_first_frame_s")
            stale = int(ev.get("stale") or 0)
            epochs = int(ev.get("epochs") or 1)
            chunks = f"{ev.get('chunks')} chunks" + (f" in {epochs} epochs" if epochs > 1 else "")
            dropped = f", {stale} stale result{'' if stale == 1 else 's'} dropped" if stale else ""
            video = f", {ev.get('frames')} frames, video {fps:.2f} fps" if isinstance(fps, (int, float)) else ""
            self.p(f"summary: {chunks}{video}{dropped}")
            self.p(f"         period p50 {_fmt(ev.get('period_p50_ms'), width=1)}, p99 "
                   f"{_fmt(ev.get('period_p99_ms'), width=1)}, time to first frame "
                   f"{f'{ttff:.3f} s' if isinstance(ttff, (int, float)) else '-'}")

    def p(self, s: str) -> None:
        print(s, file=self.out, flush=True)


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    try:
        check_options(opts)
    except InvalidOption as exc:
        print(f"pp1 run: invalid option {exc}", file=sys.stderr)
        return 2
    printer = _Printer()
    print(f"pp1 run: {opts.topology} with {opts.tp} mesh rank(s), {opts.nproc} process(es), device {opts.device}, "
          f"preset {opts.preset}, {opts.chunks} chunks, context {opts.context_source}"
          f"{''.join(f', prompt change {c}' for c in opts.prompt_changes)}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            return
        print("pp1 run: stopping (draining the job)...", file=sys.stderr, flush=True)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rep = launch(opts, on_event=printer, on_log=(lambda s: print(s, file=sys.stderr)) if args.verbose else None,
                     stop=stop)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rep.ok:
        print(f"pp1 run: ok ({rep.wall_s:.1f} s)", flush=True)
        return 0
    if not args.verbose:
        for line in rep.log_tail[-25:]:
            print(line, file=sys.stderr)
    print(f"pp1 run: FAILED (exit {rep.exit_code}): {rep.failure}", file=sys.stderr, flush=True)
    return rep.exit_code or 1
