"""The front (rank 0 under PP1): after the common startup, warm the PP pair, wait for the leader's
READY, then run the chunk engine (the one comms thread owning the PP channel) until it stops
(SHUTDOWN answered: exit 0) or the mesh fails (exit non-zero after a grace period)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from pp1.adapters.front.engine import ChunkEngine, EngineOutcome, summarise
from pp1.adapters.front.frame_dump import FrameDump
from pp1.adapters.front.prompt_script import PromptScript
from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event, set_state
from pp1.adapters.rank.options import parse_prompt_changes
from pp1.adapters.rank.startup import Loaded, RankExit
from pp1.adapters.transport.pp_channel import PPControlPlane
from pp1.adapters.transport.runtime import DistributedRuntime, PeerLost
from pp1.fsm.chunk import ChunkMachine
from pp1.fsm.intents import EXIT_FAILED, EXIT_OK
from pp1.fsm.lifecycle import Lifecycle
from pp1.protocol.messages import PPEnvelopeV1, PPResultV1, ReadyV1

log = logging.getLogger("pp1.adapters.front")


class PPLink:
    """The front's end of the PP channel as the chunk engine's Link."""

    overlaps = True  # send returns while the mesh computes: decode k overlaps k+1

    def __init__(self, pp: PPControlPlane) -> None:
        self.pp = pp

    def send(
        self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], preflight: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        self.pp.send_envelope(env, tensors, preflight=preflight, timeout_s=timeout_s)

    def recv(self, deadline_at: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        return self.pp.recv_result(deadline_at)


def make_machine(rt: DistributedRuntime, loaded: Loaded, cfg: Any, first_call_id: int) -> ChunkMachine:
    g = loaded.geometry
    return ChunkMachine(
        rt.rank, chunk_frames=g.latent_frames, window=g.max_context_frames, timesteps=loaded.timesteps,
        recompute_every=cfg.recompute_every, context_source=cfg.context_source, seed=cfg.seed,
        heartbeat_s=cfg.heartbeat_s,
        deadline_floor_s=cfg.deadline_floor_s, deadline_factor=cfg.deadline_factor, first_call_id=first_call_id,
        role=rt.role,
    )


def frame_dump(args: Any, link: Any) -> tuple[Any, FrameDump | None]:
    """``--dump-frames DIR``: the link wrapped to see latents, and the dump (None without the option)."""
    directory = getattr(args, "dump_frames", None)
    if not directory:
        return link, None
    dump = FrameDump(directory)
    return dump.wrap(link), dump


def run_dumping(engine: ChunkEngine, dump: FrameDump | None, lc: Lifecycle, session: FrontSession, args: Any,
                cfg: Any) -> int:
    """``run_engine``, then (whatever happened) the dumped frames flushed to disk."""
    try:
        return run_engine(engine, lc, session, args, cfg)
    finally:
        if dump is not None:
            dump.close()


def prompt_script(args: Any, stage0: Any) -> PromptScript:
    """The headless ``--prompt-change CHUNK:TEXT`` driver, its prompts encoded here (the caller's thread)."""
    return PromptScript(parse_prompt_changes(args.prompt_changes)).encode(stage0)


class FrontSession:
    """What the main thread may touch while the comms thread serves: stop requests, the report."""

    def __init__(self) -> None:
        self.engine: ChunkEngine | None = None
        self.ready: ReadyV1 | None = None
        self.ready_at: float | None = None
        self.started_at = time.monotonic()

    def request_stop(self) -> bool:
        if self.engine is None:
            return False
        self.engine.request_stop()
        return True

    def drain_bound_s(self) -> float:
        """How long a drain may take before the main thread crashes the rank."""
        eng = self.engine
        try:
            return 2 * eng.m.deadline_s() + 2 * eng.m.heartbeat_s + 5 if eng else 30.0
        except RuntimeError:  # stats mutated while read from another thread
            return 60.0


def run_engine(
    engine: ChunkEngine, lc: Lifecycle, session: FrontSession, args: Any, cfg: Any
) -> int:
    """Serve until the engine stops; write the report; map the outcome to an exit code."""
    outcome = engine.run()
    write_report(args.report_json, outcome, session, cfg)
    if outcome.ok:
        if lc.state == "serving":
            lc.fire("drain")
        lc.fire("drained")
        set_state(lc.state)
        emit_event("summary", **summarise(outcome.records, session.ready_at))
        return EXIT_OK
    if not lc.is_terminal:
        lc.fail_with(f"mesh failed: {outcome.reason}", "remote")
    set_state(lc.state)
    emit_event("failed", reason=outcome.reason, phase="serving", poisoned=outcome.poisoned)
    emit_event("summary", **summarise(outcome.records, session.ready_at))
    grace = float(getattr(args, "fail_grace_s", 1.0))
    log.error("mesh failed: %s; exiting non-zero in %.1f s", outcome.reason, grace)
    time.sleep(grace)
    raise RankExit(EXIT_FAILED, f"mesh failed: {outcome.reason}", poisoned=True)


def serve(
    rt: DistributedRuntime, lc: Lifecycle, loaded: Loaded, cfg: Any, faults: FaultPlan, args: Any,
    session: FrontSession,
) -> int:
    assert loaded.stage0 is not None
    pp = PPControlPlane(rt, loaded.geometry, send_timeout_s=cfg.deadline_floor_s)
    try:
        pp.warm(cfg.watchdog_s * 4)
        lc.fire("channels_warm")
        set_state(lc.state)
        # encode the prompt(s) while the mesh warms up: once READY arrives, the mesh's watchdogs run
        conditioning = loaded.stage0.encode_prompt(args.prompt)
        script = prompt_script(args, loaded.stage0)
        ready = pp.recv_ready(args.ready_timeout_s)
    except PeerLost as exc:
        lc.fail_with(f"lost the leader during {lc.state}: {exc}", "remote")
        set_state(lc.state)
        raise RankExit(EXIT_FAILED, str(lc.failure), poisoned=True) from exc
    session.ready, session.ready_at = ready, time.monotonic()
    lc.fire("warmup_done")
    set_state(lc.state)
    log.info("READY: mesh of %d, warmup %s ms, fingerprint %s", ready.mesh_size,
             [round(x, 1) for x in ready.warmup_ms], ready.fingerprint)
    emit_event("ready", mesh_size=ready.mesh_size, warmup_ms=list(ready.warmup_ms),
               startup_s=session.ready_at - session.started_at)
    faults.check("ready")
    machine = make_machine(rt, loaded, cfg, first_call_id=1)  # call_id 0 was the warm-up PING
    link, dump = frame_dump(args, PPLink(pp))
    engine = ChunkEngine(
        machine, link, loaded.stage0, loaded.geometry, prompt=args.prompt, conditioning=conditioning,
        faults=faults,
        max_chunks=args.chunks, then=args.then,
        on_frames=dump.on_frames if dump else None,
        on_stop=lambda: lc.fire("drain") if lc.state == "serving" else None,
    )
    script.attach(engine)
    session.engine = engine
    return run_dumping(engine, dump, lc, session, args, cfg)


def write_report(path: str | None, outcome: EngineOutcome, session: FrontSession, cfg: Any) -> None:
    """The JSON the launcher (and the bench) read: per-chunk timings, summary, failure."""
    if not path:
        return
    report = {
        "ok": outcome.ok,
        "state": outcome.state,
        "reason": outcome.reason,
        "poisoned": outcome.poisoned,
        "config": cfg.model_dump(mode="json"),
        "startup_s": (session.ready_at - session.started_at) if session.ready_at else None,
        "warmup_ms": list(session.ready.warmup_ms) if session.ready else [],
        "chunks": [asdict(r) for r in outcome.records],
        "stats": outcome.stats,
        "summary": summarise(outcome.records, session.ready_at),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)
