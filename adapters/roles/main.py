"""The torchrun entry of every rank: ``python -m pp1.adapters.roles.main [options]``.

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

from pp1.adapters.rank import options
from pp1.adapters.rank.faults import FaultPlan, record
from pp1.adapters.rank.observe import emit_event, set_state, setup_logging
from pp1.adapters.rank.peak_memory import emit_peak_memory
from pp1.adapters.rank.startup import Loaded, RankExit, Startup, geometry_for, torch_dtype_of
from pp1.adapters.roles.front import FrontSession
from pp1.adapters.transport.communicator import MeshCommunicator
from pp1.adapters.transport.runtime import DistributedRuntime
from pp1.adapters.transport.tp_channel import TPControlPlane
from pp1.fsm.intents import EXIT_FAILED, EXIT_OK
from pp1.fsm.lifecycle import Lifecycle, make_lifecycle
from pp1.pipelines.loader import load_factory
from pp1.protocol.config import RunConfig

log = logging.getLogger("pp1.adapters.roles.main")

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__)
    options.add_arguments(p, options.RANK)
    return p


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
            loaded.generator = factory.build_generator(cfg.preset, rt.mesh_rank, rt.mesh_size, MeshCommunicator(rt),
                                                       rt.device, dtype)
            loaded.fingerprint = loaded.generator.fingerprint()
        return loaded

    return build


def run_role(rt: DistributedRuntime, cfg: RunConfig, args: Any, lc: Lifecycle, faults: FaultPlan,
             session: FrontSession, drain: threading.Event) -> int:
    startup = Startup(rt, cfg, lc, faults, args.pg_timeout_s)
    loaded = startup.run(build_loader(rt, cfg))
    role = lifecycle_role(rt)
    if role == "front":
        from pp1.adapters.roles.front import serve as front_serve

        return front_serve(rt, lc, loaded, cfg, faults, args, session)
    tp = TPControlPlane(rt, loaded.geometry, send_timeout_s=cfg.watchdog_s)
    if role == "tp_rank0":
        from pp1.adapters.roles.tp_rank0 import serve as tp_serve

        return tp_serve(rt, lc, loaded, cfg, faults, args, session, tp)
    if role == "leader":
        from pp1.adapters.roles.leader import serve as leader_serve

        return leader_serve(rt, lc, loaded, cfg, faults, tp, drain)
    from pp1.adapters.roles.worker import serve as worker_serve

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
            record("exit", rank=rank, role=role, code=code, reason=reason[:300])
            emit_peak_memory(self.rt.device if self.rt else None)
            emit_event("exit", code=code, reason=reason[:500])
            if code == EXIT_OK and not crash and self.rt is not None:
                self.rt.teardown(self.teardown_s)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = options.from_namespace(build_parser().parse_args(argv))
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, "?", args.log_level)
    try:
        cfg = options.run_config(args, int(os.environ.get("WORLD_SIZE", "1")))
        options.parse_prompt_changes(args.prompt_changes)
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
