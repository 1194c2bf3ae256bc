"""The mesh leader: the executor of its :class:`LeaderRelayMachine` over the PP channel (to the front)
and the TP channel (to the workers). Under pure TP the same executor runs inside rank 0, its PP end
being the in-process channel to the local front (``serve_tp_rank0`` in ``roles/front.py``).

The machine drives the loop (channel warm-up, warmup, the watchdog-bounded wait for each envelope,
validate, relay, run, reply); this performs its intents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.startup import RankExit
from pp1.adapters.roles.context import RankContext
from pp1.adapters.roles.mesh import MeshExecutor
from pp1.adapters.transport.channels import PPChannel, TPChannel
from pp1.adapters.transport.interface import LeaderEnd, MeshEnd
from pp1.fsm.base import Event, Intent
from pp1.fsm.events import EnvelopeReceived, PairWarm, ResultSent
from pp1.fsm.intents import EXIT_OK, AwaitEnvelope, Exit, RecvTensors, SendReady, SendResult, SendTP, WarmPair
from pp1.fsm.leader import LeaderRelayMachine
from pp1.pipelines.checksum import checksum
from pp1.pipelines.interface import Generator
from pp1.protocol.messages import Action, PPResultV1, ReadyV1
from pp1.protocol.schedule import WEIGHTS_CHECK_EVERY

log = logging.getLogger("pp1.adapters.roles.leader")


class LeaderExecutor(MeshExecutor):
    """Performs a LeaderRelayMachine's intents. ``recv_timeout_s``: bound on receiving an envelope's
    tensors once its header arrived (the front sends them right after)."""

    def __init__(self, machine: LeaderRelayMachine, generator: Generator, mesh: MeshEnd, front: LeaderEnd,
                 device: torch.device, faults: FaultPlan, recv_timeout_s: float | None, warm_timeout_s: float,
                 clock: Callable[[], float]) -> None:
        super().__init__(machine, generator, mesh, device, faults, warm_timeout_s=warm_timeout_s, clock=clock)
        self.front = front
        self.recv_timeout_s = recv_timeout_s
        self.ready: ReadyV1 | None = None

    def perform(self, it: Intent) -> Event | None:
        handled, event = self.perform_mesh(it)
        if handled:
            return event
        if isinstance(it, AwaitEnvelope):
            env = self.front.recv_envelope(it.until)
            return self.envelope_received(env)
        if isinstance(it, RecvTensors):
            got = self.front.recv_tensors(it.specs, self.recv_timeout_s)
            self.tensors = [] if it.discard else got
            self.tensors_arrived()
            return None
        if isinstance(it, SendTP):
            h = it.header
            if it.digest_inputs:  # every worker checks the call's tensors against the leader's
                h = h.model_copy(update={"inputs_digest": checksum(self.tensors)})
            self.mesh.send_header(h, self.tensors if h.tensors else [], with_tensors=it.with_tensors,
                                  preflight=it.preflight)
            if h.action is Action.INFER:
                self.faults.check(f"relayed:{h.chunk_index}")
            return None
        if isinstance(it, SendResult):
            out = [self.latents] if it.result.tensors and self.latents is not None else []
            self.front.send_result(it.result, out)
            now = self.clock()
            self._log_answered(it.result, now)
            return ResultSent(now)
        if isinstance(it, SendReady):
            self.ready = it.ready
            self.front.send_ready(it.ready)
            return None
        if isinstance(it, WarmPair):
            self.front.warm_pair(self.warm_timeout_s)
            return PairWarm(self.clock())
        raise TypeError(f"leader: no way to perform {it!r}")

    def _log_answered(self, result: PPResultV1, now: float) -> None:
        """A call's INFO line, once its result went out (writing it before would delay the front's chunk)."""
        if result.action is Action.NOOP or not log.isEnabledFor(logging.INFO):
            return
        took = "" if self.received_at is None else f" in {(now - self.received_at) * 1000:.1f} ms"
        log.info("envelope %s call_id=%d chunk_index=%d cache_epoch=%d answered ok=%s%s", result.action.value,
                 result.call_id, result.chunk_index, result.cache_epoch, result.ok, took)

    def peer_of(self, intent: Intent) -> int | None:
        """The front for the PP channel's intents; a TP broadcast or a collective names no one."""
        if isinstance(intent, AwaitEnvelope | RecvTensors | SendResult | SendReady | WarmPair):
            return self.machine.front_rank  # type: ignore[attr-defined]
        return None

    def envelope_received(self, env) -> EnvelopeReceived:  # type: ignore[no-untyped-def]
        now = self.clock()
        self.received_at = now
        log.debug("envelope %s call_id=%d chunk_index=%d cache_epoch=%d received", env.action.value, env.call_id,
                  env.chunk_index, env.cache_epoch)
        if env.action is Action.INFER:
            self.check_point(f"chunk:{env.chunk_index}")
        return EnvelopeReceived(env, now)


def leader_machine(ctx: RankContext, *, front_in_process: bool) -> LeaderRelayMachine:
    cfg, p = ctx.config, ctx.pipeline
    return LeaderRelayMachine(
        ctx.rt.rank, p.geometry, ctx.rt.mesh_size, timesteps=p.timesteps, warmup_chunks=cfg.warmup_chunks,
        recompute_every=cfg.recompute_every, seed=cfg.seed, fingerprint=p.fingerprint,
        watchdog_s=None if front_in_process else cfg.watchdog_s, now=ctx.clock(), front_in_process=front_in_process,
        front_rank=cfg.front_rank, weights_baseline=p.weights_checksum, weights_check_every=WEIGHTS_CHECK_EVERY,
        warm_timeout_s=4 * cfg.watchdog_s, lifecycle=ctx.lifecycle, role=ctx.rt.role, mesh_rank=ctx.rt.mesh_rank,
    )


def leader_pp_channel(ctx: RankContext, cls: type[PPChannel] = PPChannel) -> PPChannel:
    """The leader's end of the PP channel (its send bound: the front's deadline floor + the watchdog)."""
    cfg = ctx.config
    return cls(ctx.rt, ctx.pipeline.geometry, send_timeout_s=cfg.deadline_floor_s + cfg.watchdog_s)


def serve_leader(ctx: RankContext, pp: PPChannel | None = None) -> int:
    """PP1's leader: the PP channel to the front (``pp``: default :func:`leader_pp_channel`), the TP channel
    to the workers."""
    p, cfg = ctx.pipeline, ctx.config
    assert p.generator is not None
    pp = pp or leader_pp_channel(ctx)
    tp = TPChannel(ctx.rt, p.geometry, send_timeout_s=cfg.watchdog_s)
    relay = leader_machine(ctx, front_in_process=False)
    executor = LeaderExecutor(relay, p.generator, tp, pp, ctx.rt.device, ctx.faults, recv_timeout_s=cfg.watchdog_s,
                              warm_timeout_s=4 * cfg.watchdog_s, clock=ctx.clock)
    ctx.attach(executor)
    return mesh_exit(executor.run(relay.start(ctx.clock())))


def mesh_exit(ex: Exit) -> int:
    """A mesh rank's exit: 0 after SHUTDOWN; otherwise crash-only (no group is touched again)."""
    if ex.code == EXIT_OK:
        return EXIT_OK
    raise RankExit(ex.code, ex.reason, poisoned=True)
