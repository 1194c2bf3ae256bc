"""The torchrun entry of every rank: ``python -m pp1.adapters.main [options]``.

Parses the run config, runs the common startup, dispatches by role (front, leader, worker, or
pure-TP rank 0), and maps the outcome to an exit code (0 orderly shutdown, 1 failed, 3 orphan).
The role runs in a thread; the main thread handles SIGTERM / SIGINT and bounds every exit:
a signal in serving drains (front) or waits for SHUTDOWN (mesh; the watchdog bounds it); a
signal before serving fails the rank at once. Non-zero exits are crash-only (``os._exit``,
no group is touched again); an orderly exit destroys the process groups under a time bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from pp1.fsm.intents import EXIT_FAILED, EXIT_OK
from pp1.fsm.lifecycle import Lifecycle, make_lifecycle
from pp1.pipelines.loader import build_generator, load_factory, parse_pipeline_option
from pp1.protocol.config import RunConfig

from . import faults as faults_mod
from .faults import FaultPlan
from .front_main import FrontSession
from .observe import emit_event, set_state, setup_logging
from .peak_memory import emit_peak_memory
from .prompt_changes import parse_prompt_changes
from .runtime import DistributedRuntime
from .shard import MeshCommunicator
from .startup import Loaded, RankExit, Startup, geometry_for, torch_dtype_of
from .tp_channel import TPControlPlane

log = logging.getLogger("pp1.adapters.main")

DEFAULT_PIPELINE = "pp1.pipelines.reference:factory"
EXIT_USAGE = 2


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Options that make the RunConfig (parity-checked) and the run (not checked)."""
    p.add_argument("--topology", choices=["pp1", "tp"], default="pp1")
    p.add_argument("--tp", type=int, default=None, help="mesh size M (default: from WORLD_SIZE)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="module:factory")
    p.add_argument("--pipeline-option", dest="pipeline_options", action="append", type=parse_pipeline_option,
                   default=[], metavar="KEY=VALUE", help="an option of the pipeline (repeatable)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute-every", type=int, default=1)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--watchdog-s", type=float, default=5.0)
    p.add_argument("--deadline-floor-s", type=float, default=30.0)
    p.add_argument("--deadline-factor", type=float, default=4.0)
    p.add_argument("--warmup-chunks", type=int, default=1)
    p.add_argument("--context-source", choices=["latents", "reencode"], default="latents",
                   help="KV-recompute context: the previous latents, or with the first re-encoded by the VAE")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=int, default=8, help="chunks the front drives (then --then)")
    p.add_argument("--then", choices=["shutdown", "idle"], default="shutdown",
                   help="after the chunks: shut the job down, or stay idle (heartbeats) until SIGTERM")
    p.add_argument("--prompt", default="a calm sea at dawn")
    p.add_argument("--prompt-change", action="append", default=[], metavar="CHUNK:TEXT",
                   help="front: after CHUNK shown chunks change the prompt to TEXT (hard cut); repeatable")
    p.add_argument("--report-json", default=None, help="the front writes per-chunk timings here")
    p.add_argument("--dump-frames", default=None, metavar="DIR",
                   help="front only, a debugging/test aid: save each shown chunk's frames (uint8 [F,H,W,3]) and "
                   "latents to DIR/epoch{e}_chunk{k}[_latents].pt (torch.save, on a background thread)")
    p.add_argument("--pg-timeout-s", type=float, default=600.0, help="process-group timeout (startup waits)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0, help="front: wait for READY at most this")
    p.add_argument("--fail-grace-s", type=float, default=1.0, help="front: delay before a non-zero exit")
    p.add_argument("--teardown-s", type=float, default=3.0, help="bound on destroy_process_group")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pp1.adapters.main", description=__doc__)
    add_config_arguments(p)
    add_run_arguments(p)
    return p


def config_from_args(args: Any, world_size: int) -> RunConfig:
    m = args.tp if args.tp is not None else (world_size - 1 if args.topology == "pp1" else world_size)
    if args.topology == "pp1":
        world, mesh = 1 + m, tuple(range(1, 1 + m))
    else:
        world, mesh = m, tuple(range(m))
    return RunConfig(
        topology=args.topology, world_size=world, mesh_global_ranks=mesh, preset=args.preset,
        pipeline=args.pipeline, pipeline_options=dict(args.pipeline_options or {}), dtype=args.dtype, device_backend="nccl" if args.device == "cuda" else "gloo",
        control_backend="gloo", compile=args.compile, seed=args.seed, recompute_every=args.recompute_every,
        heartbeat_s=args.heartbeat_s, watchdog_s=args.watchdog_s, deadline_floor_s=args.deadline_floor_s,
        deadline_factor=args.deadline_factor, warmup_chunks=args.warmup_chunks, context_source=args.context_source,
    )


def lifecycle_role(rt: DistributedRuntime) -> str:
    if rt.role == "leader" and rt.front_rank is None:
        return "tp_rank0"
    return rt.role


def build_loader(rt: DistributedRuntime, cfg: RunConfig):  # type: ignore[no-untyped-def]
    """The load step of this rank: stage 0 on the front, a generator shard on mesh ranks, both on
    pure-TP rank 0."""

    def build() -> Loaded:
        factory = load_factory(cfg.pipeline, cfg.pipeline_options)
        dtype = torch_dtype_of(cfg.dtype)
        loaded = Loaded(factory=factory, geometry=geometry_for(factory, cfg),
                        timesteps=tuple(factory.timesteps(cfg.preset)))
        if rt.hosts_front:
            loaded.stage0 = factory.build_stage0(cfg.preset, rt.device, dtype)
        if rt.is_mesh_member:
            assert rt.mesh_rank is not None
            # --compile: the generator compiles here, in the load step (a failure fails the load vote)
            t0 = time.perf_counter()
            loaded.generator = build_generator(factory, cfg.preset, rt.mesh_rank, rt.mesh_size, MeshCommunicator(rt),
                                               rt.device, dtype, compile=cfg.compile, path=cfg.pipeline)
            if cfg.compile:
                compile_s = getattr(loaded.generator, "compile_s", None)
                load_s = time.perf_counter() - t0
                log.info("generator compiled: %s s (load %.1f s)", compile_s, load_s)
                emit_event("compiled", mesh_rank=rt.mesh_rank, compile_s=compile_s, load_s=round(load_s, 2))
            loaded.fingerprint = loaded.generator.fingerprint()
        return loaded

    return build


def run_role(rt: DistributedRuntime, cfg: RunConfig, args: Any, lc: Lifecycle, faults: FaultPlan,
             session: FrontSession, drain: threading.Event) -> int:
    startup = Startup(rt, cfg, lc, faults, args.pg_timeout_s)
    loaded = startup.run(build_loader(rt, cfg))
    role = lifecycle_role(rt)
    if role == "front":
        from .front_main import serve as front_serve

        return front_serve(rt, lc, loaded, cfg, faults, args, session)
    tp = TPControlPlane(rt, loaded.geometry, send_timeout_s=cfg.watchdog_s)
    if role == "tp_rank0":
        from .tp_main import serve as tp_serve

        return tp_serve(rt, lc, loaded, cfg, faults, args, session, tp)
    if role == "leader":
        from .leader_main import serve as leader_serve

        return leader_serve(rt, lc, loaded, cfg, faults, tp, drain)
    from .worker_main import serve as worker_serve

    return worker_serve(rt, lc, loaded, cfg, faults, tp, drain)


class Exiter:
    """Ends the process exactly once: record, flush, bounded teardown on an orderly exit, os._exit."""

    def __init__(self, rt: DistributedRuntime | None, teardown_s: float) -> None:
        self.rt, self.teardown_s = rt, teardown_s
        self._lock = threading.Lock()

    def __call__(self, code: int, reason: str, crash: bool) -> None:
        with self._lock:
            role = self.rt.role if self.rt else "?"
            rank = self.rt.rank if self.rt else -1
            (log.info if code == EXIT_OK else log.error)("exit %d: %s", code, reason)
            faults_mod.record("exit", rank=rank, role=role, code=code, reason=reason[:300])
            emit_peak_memory(self.rt.device if self.rt else None)
            emit_event("exit", code=code, reason=reason[:500])
            if code == EXIT_OK and not crash and self.rt is not None:
                self.rt.teardown(self.teardown_s)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, "?", args.log_level)
    try:
        cfg = config_from_args(args, int(os.environ.get("WORLD_SIZE", "1")))
        parse_prompt_changes(args.prompt_change)
        rt = DistributedRuntime.from_env(cfg, device=args.device)
    except Exception as exc:  # bad options: nothing distributed started yet
        log.error("bad run options: %s", exc)
        return EXIT_USAGE
    setup_logging(rank, lifecycle_role(rt), args.log_level)
    exiter = Exiter(rt, args.teardown_s)
    try:
        faults = FaultPlan.from_env(rank)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    lc = make_lifecycle(lifecycle_role(rt), rank, mesh_rank=rt.mesh_rank)
    _track_state(lc)
    session = FrontSession()
    drain = threading.Event()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def role_thread() -> None:
        try:
            outcome["code"] = run_role(rt, cfg, args, lc, faults, session, drain)
            outcome["reason"] = "shutdown"
        except RankExit as exc:
            outcome.update(code=exc.code, reason=exc.reason, crash=exc.code != EXIT_OK or exc.poisoned)
        except BaseException as exc:  # a bug or an unexpected error: fail the rank
            log.exception("unexpected error in state %s", lc.state)
            if not lc.is_terminal:
                lc.fail_with(f"{type(exc).__name__}: {exc}", "local")
            outcome.update(code=EXIT_FAILED, reason=f"{type(exc).__name__}: {exc}", crash=True)
        finally:
            done.set()

    drain_deadline: list[float] = []

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if lc.state in ("serving", "draining"):
            if drain.is_set() or drain_deadline:
                log.warning("%s again while draining: ignored (the drain is bounded)", name)
                return
            log.warning("%s: draining", name)
            drain.set()
            if rt.hosts_front and session.request_stop():
                drain_deadline.append(time.monotonic() + session.drain_bound_s())
            elif not rt.hosts_front:  # wait for the front's SHUTDOWN, but not past the front's own drain bound
                bound = 2 * cfg.deadline_floor_s + 2 * cfg.heartbeat_s + cfg.watchdog_s + 5
                drain_deadline.append(time.monotonic() + bound)
            return
        if lc.is_terminal:
            return
        log.error("%s during %s: failing this rank", name, lc.state)
        exiter(EXIT_FAILED, f"{name} during {lc.state}", crash=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=role_thread, name=f"pp1-{rt.role}", daemon=True)
    thread.start()
    while not done.wait(0.1):
        if drain_deadline and time.monotonic() > drain_deadline[0]:
            exiter(EXIT_FAILED, "drain did not finish within its bound", crash=True)
    code = int(outcome.get("code", EXIT_FAILED))
    exiter(code, str(outcome.get("reason", "")), crash=bool(outcome.get("crash", code != EXIT_OK)))
    return code  # not reached


def _track_state(lc: Lifecycle) -> None:
    """Show the lifecycle state on every log line and as a progress event."""
    original = lc._log_state

    def log_state(event: Any) -> None:
        original(event)
        set_state(lc.state)
        emit_event("phase", phase=lc.state)

    lc._log_state = log_state  # type: ignore[method-assign]


if __name__ == "__main__":
    raise SystemExit(main())
