"""The torchrun entry of every rank: ``python -m pp1.adapters.roles.main [options]``.

Parses the options (the one table, ``adapters/rank/options.py``), runs the common startup, dispatches by
role (front, leader, worker, or pure-TP rank 0: the role comes from ``RunConfig.role_of``), and maps
the outcome to an exit code (0 orderly shutdown, 1 failed, 3 orphan). The role runs in a thread; the
main thread handles SIGTERM / SIGINT and bounds every exit: the lifecycle machine says what a signal
means (``LifecycleMachine.signal_verdict``: drain in serving, fail before), a drain is posted to the serving
executor, and its bound is the lifecycle's rule (``drain_bound_s``). Non-zero exits are crash-only
(``os._exit``, no group is touched again); an orderly exit destroys the process groups under a bound.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pp1.adapters.rank import options
from pp1.adapters.rank.faults import FaultPlan, perturb_weights, record
from pp1.adapters.rank.liveness import LivenessMonitor
from pp1.adapters.rank.observe import emit_event, set_state, setup_logging
from pp1.adapters.rank.options import JobOptions
from pp1.adapters.rank.peak_memory import emit_peak_memory
from pp1.adapters.rank.progress import ProgressBoard
from pp1.adapters.rank.startup import LoadedPipeline, RankExit, geometry_for, run_startup, torch_dtype_of
from pp1.adapters.roles.context import RankContext
from pp1.adapters.transport.communicator import MeshCommunicator
from pp1.adapters.transport.runtime import DistributedRuntime
from pp1.fsm.base import FailureCause, ProtocolMachine
from pp1.fsm.blame import unreported_cause
from pp1.fsm.intents import EXIT_FAILED, EXIT_OK
from pp1.fsm.lifecycle import drain_bound_s, make_lifecycle
from pp1.pipelines.checksum import checksum
from pp1.pipelines.loader import build_generator, load_factory
from pp1.protocol.config import RunConfig

log = logging.getLogger("pp1.adapters.roles.main")

EXIT_USAGE = 2


def build_parser(commands: tuple[str, ...] = (options.RANK,), prog: str | None = None) -> argparse.ArgumentParser:
    """The rank entry's options: the table's ``rank`` ones (plus ``serve_rank`` for pp1 serve's ranks)."""
    p = argparse.ArgumentParser(prog=prog or f"python -m {__name__}", description=__doc__)
    for command in commands:
        options.add_arguments(p, command)
    return p


def build_loader(rt: DistributedRuntime, cfg: RunConfig) -> Callable[[], LoadedPipeline]:
    """The load step of this rank: stage 0 on the front, a generator shard on mesh ranks, both on
    pure-TP rank 0."""

    def build() -> LoadedPipeline:
        factory = load_factory(cfg.pipeline, cfg.pipeline_options)
        dtype = torch_dtype_of(cfg.dtype)
        loaded = LoadedPipeline(factory=factory, geometry=geometry_for(factory, cfg),
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
            held = getattr(loaded.generator, "held_weights", None)
            loaded.weights_checksum = checksum(held()) if callable(held) else None
        return loaded

    return build


def run_role(ctx: RankContext) -> int:
    """The common startup, then this rank's role until it exits."""
    ctx.loaded = run_startup(ctx.rt, ctx.config, ctx.lifecycle, ctx.faults, ctx.options.pg_timeout_s,
                             build_loader(ctx.rt, ctx.config))
    from pp1.adapters.roles.front import serve_front, serve_tp_rank0
    from pp1.adapters.roles.leader import serve_leader
    from pp1.adapters.roles.worker import serve_worker

    serve = {"front": serve_front, "tp_rank0": serve_tp_rank0, "leader": serve_leader, "worker": serve_worker}
    return serve[ctx.rt.role](ctx)


class Exiter:
    """Ends the process exactly once: record, flush, bounded teardown on an orderly exit, os._exit. The exit
    event carries the rank's failure cause (structured: the launcher finds the root cause from them); a
    failing rank's last state goes to the job's store (at most ``BOARD_FLUSH_S``)."""

    BOARD_FLUSH_S = 0.5

    def __init__(self, rt: DistributedRuntime | None, teardown_s: float,
                 cause: Callable[[], FailureCause | None] = lambda: None,
                 phase: Callable[[], str] = lambda: "?") -> None:
        self.rt, self.teardown_s, self.cause, self.phase = rt, teardown_s, cause, phase
        self.faults: FaultPlan | None = None
        self.board: ProgressBoard | None = None
        self.before_failing: Callable[[str], None] | None = None  # last words of a failing exit (the viewers)
        self._lock = threading.Lock()

    def __call__(self, code: int, reason: str, crash: bool, failed_peer: int | None = None) -> None:
        """``failed_peer``: the rank ends because that rank of the job had already failed."""
        with self._lock:
            try:
                role = self.rt.role if self.rt else "?"
                rank = self.rt.rank if self.rt else -1
                (log.info if code == EXIT_OK else log.error)("exit %d: %s", code, reason)
                record("exit", rank=rank, role=role, code=code, reason=reason[:300])
                emit_peak_memory(self.rt.device if self.rt else None)
                if self.faults is not None and self.faults.unfired():
                    log.warning("faults that never fired: %s", self.faults.unfired())
                    emit_event("fault_unfired", faults=self.faults.unfired())
                c = self.cause()
                if c is None and code != EXIT_OK:  # no machine saw it (a bug, an error outside a step, a signal)
                    c = unreported_cause(rank, self.phase(), reason, failed_peer)
                cause = None if c is None else {"rank": c.rank, "phase": c.phase, "reason": c.reason[:500],
                                                "kind": c.kind, "blame": c.blame, "lingered": c.lingered}
                emit_event("exit", code=code, reason=reason[:500], cause=cause)
                if code != EXIT_OK and self.board is not None:  # the others read it when torchrun signals them
                    self.board.publish(state="failed", cause=cause)
                    self.board.flush(self.BOARD_FLUSH_S)
                if code != EXIT_OK and self.before_failing is not None:
                    self.before_failing(reason)
                if code == EXIT_OK and not crash and self.rt is not None:
                    self.rt.teardown(self.teardown_s)
            except BaseException:  # the exit path itself must never keep the process alive
                log.exception("error on the exit path (exit %d still follows)", code)
            finally:
                with contextlib.suppress(BaseException):
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)


def _observe(faults: FaultPlan, board: ProgressBoard, role: str,
             ctx_of: Callable[[], RankContext | None] = lambda: None) -> Callable[[ProtocolMachine, str, str], None]:
    """The lifecycle's observer: the state on every log line, a progress event per phase (stdout and the
    job's store), and the fault point of each phase entered (``at=warmup``: on entering warmup)."""

    def on_change(machine: ProtocolMachine, _event: str, state: str) -> None:
        set_state(state)
        emit_event("phase", phase=state)
        cause = machine.failure
        board.publish(role=role, state=state, cause=None if cause is None else {
            "rank": cause.rank, "phase": cause.phase, "reason": cause.reason, "kind": cause.kind,
            "blame": cause.blame})
        fault = faults.check(state)
        ctx = ctx_of()
        if ctx is not None and ctx.loaded is not None:  # the weight drill (the READY check sees it)
            perturb_weights(fault, ctx.loaded.generator)

    return on_change


def _watch_parent(exiter: Exiter, poll_s: float = 0.25) -> None:
    """No orphans: torchrun starts each rank in its own session, so a rank whose parent died (torchrun
    SIGKILLed) would run on with parent 1. A daemon thread notices within ``poll_s`` and ends the rank."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                exiter(EXIT_FAILED, f"the parent process {parent} (torchrun) died: no orphan left behind",
                       crash=True)
                return

    threading.Thread(target=watch, name="pp1-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None, ctx_hook: Callable[[RankContext], None] | None = None,
         parser: argparse.ArgumentParser | None = None) -> int:
    """Run this rank. ``ctx_hook`` sees the rank's context before startup (the server attaches here);
    ``parser``: the entry's options (default: the rank's)."""
    opts: JobOptions = options.from_namespace((parser or build_parser()).parse_args(argv))
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, "?", opts.log_level)
    try:
        cfg = options.run_config(opts, int(os.environ.get("WORLD_SIZE", "1")))
        options.parse_prompt_changes(opts.prompt_changes)
        rt = DistributedRuntime.from_env(cfg, device=opts.device)
        faults = FaultPlan.from_env(rank)
    except Exception as exc:  # bad options: nothing distributed started yet
        log.error("bad run options: %s", exc)
        return EXIT_USAGE
    setup_logging(rank, rt.role, opts.log_level)
    lc = make_lifecycle(rt.role, rank, mesh_rank=rt.mesh_rank)
    board = ProgressBoard(rank, rt.world_size)
    monitor = LivenessMonitor(rank, rt.world_size, rt.device_waits, board,
                              on_exit=lambda code, reason: exiter(code, reason, crash=True), role=rt.role)
    exiter = Exiter(rt, opts.teardown_s, cause=lambda: lc.failure or monitor.failure, phase=lambda: lc.state)
    exiter.faults, exiter.board = faults, board
    _watch_parent(exiter)
    board.publish(role=rt.role, state=lc.state, pid=os.getpid())
    monitor.start()  # device ops whose peer died or stalled end within seconds
    holder: list[RankContext] = []
    lc.watch(_observe(faults, board, rt.role, lambda: holder[0] if holder else None))
    ctx = RankContext(rt=rt, config=cfg, options=opts, lifecycle=lc, faults=faults, progress=board)
    exiter.before_failing = lambda reason: [tell(reason) for tell in ctx.exit_sinks]
    holder.append(ctx)
    if ctx_hook is not None:
        try:
            ctx_hook(ctx)
        except Exception as exc:  # e.g. the server's port is taken: nothing distributed started yet
            log.error("cannot start: %s", exc)
            emit_event("failed", reason=f"cannot start: {exc}", phase=lc.state)
            exiter(EXIT_USAGE, f"cannot start: {exc}", crash=True)
    emit_event("phase", phase=lc.state, mesh_rank=rt.mesh_rank)
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def role_thread() -> None:
        try:
            outcome["code"] = run_role(ctx)
            outcome["reason"] = "shutdown"
        except RankExit as exc:
            outcome.update(code=exc.code, reason=exc.reason, crash=exc.code != EXIT_OK or exc.poisoned)
        except BaseException as exc:  # a bug or an unexpected error: fail the rank
            log.exception("unexpected error in state %s", lc.state)
            outcome.update(code=EXIT_FAILED, reason=f"{type(exc).__name__}: {exc}", crash=True)
        finally:
            done.set()

    drain_deadline: list[float] = []

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        failed = board.failed_rank()
        verdict = lc.signal_verdict(job_failed=failed is not None)
        if verdict == "drain" and not drain_deadline:
            log.warning("%s: draining", name)
            ctx.request_drain(time.monotonic())
            deadline_s = None
            if ctx.engine is not None:
                try:
                    deadline_s = ctx.engine.machine.chunk.deadline_s()
                except RuntimeError:  # its stats changed while read from this thread
                    deadline_s = 30.0
            drain_deadline.append(time.monotonic() + drain_bound_s(cfg, rt.hosts_front, deadline_s))
        elif verdict == "fail":
            log.error("%s during %s: failing this rank%s", name, lc.state,
                      "" if failed is None else f" (rank {failed} of the job failed: no drain can finish)")
            exiter(EXIT_FAILED, f"{name} during {lc.state}", crash=True, failed_peer=failed)
        else:
            log.warning("%s again while %s: ignored (the drain is bounded)", name, lc.state)

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


if __name__ == "__main__":
    raise SystemExit(main())
