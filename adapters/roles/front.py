"""The front (rank 0 under PP1) and pure TP's rank 0 (front + leader in one process): build the front's
machines and engine, run until the machine exits (SHUTDOWN answered: exit 0; the mesh failed: exit
non-zero after a grace period), write the report.

The FrontMachine drives everything from the PP channel's PING to SHUTDOWN (``fsm/front.py``); the
engine performs it (``adapters/front/engine.py``). Under pure TP the leader's executor runs in this
process behind the in-process channel: its warmup completes before the front's loop starts.
"""

from __future__ import annotations

import logging
import threading
import time

from pp1.adapters.front.engine import FrontEngine
from pp1.adapters.front.frame_dump import FrameDump
from pp1.adapters.front.prompt_script import PromptScript
from pp1.adapters.front.report import EngineOutcome, summarise, write_report
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.rank.options import JobOptions, parse_prompt_changes
from pp1.adapters.rank.startup import RankExit
from pp1.adapters.roles.context import RankContext
from pp1.adapters.roles.leader import LeaderExecutor, leader_machine
from pp1.adapters.transport.channels import PPChannel, TPChannel
from pp1.adapters.transport.inprocess import InProcessChannel
from pp1.adapters.transport.interface import FrontEnd
from pp1.fsm.chunk import ChunkMachine
from pp1.fsm.events import EnvelopeReceived
from pp1.fsm.front import FrontMachine, Pace
from pp1.fsm.intents import EXIT_FAILED, EXIT_OK
from pp1.protocol.messages import PPEnvelopeV1
from pp1.protocol.schedule import FRAMES_PER_LATENT

log = logging.getLogger("pp1.adapters.roles.front")


def chunk_machine(ctx: RankContext) -> ChunkMachine:
    g, cfg = ctx.pipeline.geometry, ctx.config
    return ChunkMachine(
        ctx.rt.rank, chunk_frames=g.latent_frames, window=g.max_context_frames, timesteps=ctx.pipeline.timesteps,
        recompute_every=cfg.recompute_every, context_source=cfg.context_source, seed=cfg.seed,
        heartbeat_s=cfg.heartbeat_s, deadline_floor_s=cfg.deadline_floor_s, deadline_factor=cfg.deadline_factor,
        peer_rank=cfg.leader_rank, role=ctx.rt.role,
    )


def pace_for(opts: JobOptions, latent_frames: int) -> Pace | None:
    """A served front (``after_chunks="serve"``) paces its chunks (``latent_frames`` a chunk) at the stream's
    frame rate (``--fps``; ``--no-pace``: as fast as the mesh computes); headless runs are never paced."""
    if opts.after_chunks != "serve" or opts.no_pace:
        return None
    return Pace.of(FRAMES_PER_LATENT * latent_frames, opts.fps)


def front_machine(ctx: RankContext, *, ping: bool, overlap: bool) -> FrontMachine:
    opts = ctx.options
    served = opts.after_chunks == "serve"
    return FrontMachine(
        ctx.rt.rank, chunk=chunk_machine(ctx), geometry=ctx.pipeline.geometry, overlap=overlap, ping=ping,
        warm_timeout_s=4 * ctx.config.watchdog_s, ready_timeout_s=opts.ready_timeout_s,
        max_chunks=None if served else opts.chunks, after_chunks=opts.after_chunks,
        streaming=not served, pace=pace_for(opts, ctx.pipeline.geometry.latent_frames), lifecycle=ctx.lifecycle,
        role=ctx.rt.role,
    )


def front_pp_channel(ctx: RankContext, cls: type[PPChannel] = PPChannel) -> PPChannel:
    """The front's end of the PP channel (its send bound: the deadline floor)."""
    return cls(ctx.rt, ctx.pipeline.geometry, send_timeout_s=ctx.config.deadline_floor_s)


def serve_front(ctx: RankContext) -> int:
    """PP1's front: the PP channel to the leader."""
    channel = front_pp_channel(ctx)
    return _serve(ctx, front_machine(ctx, ping=True, overlap=channel.overlaps), channel)


def serve_tp_rank0(ctx: RankContext) -> int:
    """Pure TP's rank 0: the leader's executor in process (its warmup first), then the front's loop."""
    p, cfg = ctx.pipeline, ctx.config
    assert p.generator is not None
    channel = InProcessChannel(p.geometry)
    relay = leader_machine(ctx, front_in_process=True)
    tp = TPChannel(ctx.rt, p.geometry, send_timeout_s=cfg.watchdog_s)
    leader = LeaderExecutor(relay, p.generator, tp, channel, ctx.rt.device, ctx.faults, recv_timeout_s=None,
                            warm_timeout_s=4 * cfg.watchdog_s, clock=ctx.clock)

    def deliver(env: PPEnvelopeV1) -> str | None:
        leader.feed(EnvelopeReceived(env, ctx.clock()))
        ex = leader.drain()
        return ex.reason if ex is not None else None

    channel.deliver = deliver
    leader.begin(relay.start(ctx.clock()))
    ex = leader.drain()
    if ex is not None:
        raise RankExit(ex.code, f"warmup failed: {ex.reason}", poisoned=True)
    ready = channel.ready
    assert ready is not None
    emit_event("ready", mesh_size=ready.mesh_size, warmup_ms=list(ready.warmup_ms),
               startup_s=ctx.clock() - ctx.started_at)
    ctx.faults.check("ready")
    return _serve(ctx, front_machine(ctx, ping=False, overlap=channel.overlaps), channel, ready_at=ctx.clock(),
                  warmup_ms=list(ready.warmup_ms))


def _serve(ctx: RankContext, machine: FrontMachine, channel: FrontEnd, ready_at: float | None = None,
           warmup_ms: list[float] | None = None) -> int:
    p, opts = ctx.pipeline, ctx.options
    assert p.stage0 is not None
    # encode the prompt(s) before the loop starts: once READY arrives, the mesh's watchdogs run
    conditioning = p.stage0.encode_prompt(opts.prompt)
    script = PromptScript(parse_prompt_changes(opts.prompt_changes)).encode(p.stage0)
    engine = FrontEngine(machine, channel, p.stage0, p.geometry, conditioning=conditioning, prompt=opts.prompt,
                         faults=ctx.faults, clock=ctx.clock)
    dump = FrameDump(opts.dump_frames) if opts.dump_frames else None
    if dump is not None:
        engine.add_sink(dump.on_frames)
    for sink in ctx.frame_sinks:
        engine.add_sink(sink)
    script.attach(engine)
    engine.started_at = ctx.started_at
    ctx.engine = engine
    ctx.attach(engine)
    watcher = DrainWatcher(ctx, engine)
    try:
        outcome = engine.run_to_end()
    finally:
        watcher.stop()
        if dump is not None:
            dump.close()
    for tell in ctx.outcome_sinks:
        tell(outcome)
    ready_at = engine.ready_at if engine.ready_at is not None else ready_at
    if machine.ready is not None:
        warmup_ms = list(machine.ready.warmup_ms)
    write_report(opts.report_json, outcome, config=ctx.config.model_dump(mode="json"), started_at=ctx.started_at,
                 ready_at=ready_at, warmup_ms=warmup_ms or [])
    return _exit_code(ctx, outcome, ready_at)


class DrainWatcher:
    """A drain asked of any rank (SIGTERM to a mesh rank: published on the job's store) drains the whole
    job: the front reads the board every ``POLL_S`` and asks its engine to stop (SHUTDOWN goes through the
    mesh, every rank exits 0)."""

    POLL_S = 0.25

    def __init__(self, ctx: RankContext, engine: FrontEngine) -> None:
        self.ctx, self.engine = ctx, engine
        self._stop = threading.Event()
        if ctx.progress is not None:
            threading.Thread(target=self._watch, name="pp1-drain-watch", daemon=True).start()

    def _watch(self) -> None:
        board = self.ctx.progress
        assert board is not None
        while not self._stop.wait(self.POLL_S):
            rank = board.drain_requested()
            if rank is not None:
                log.warning("rank %d was asked to drain: draining the job", rank)
                self.engine.request_stop()
                return

    def stop(self) -> None:
        self._stop.set()


def _exit_code(ctx: RankContext, outcome: EngineOutcome, ready_at: float | None) -> int:
    emit_event("summary", **summarise(outcome.records, ready_at))
    if outcome.ok:
        return EXIT_OK
    emit_event("failed", reason=outcome.reason, phase="serving", poisoned=outcome.poisoned)
    grace = ctx.options.fail_grace_s
    log.error("mesh failed: %s; exiting non-zero in %.1f s", outcome.reason, grace)
    time.sleep(grace)
    raise RankExit(EXIT_FAILED, f"mesh failed: {outcome.reason}", poisoned=True)
