"""The protocol hop, measured: the torchrun entry of ``pp1 bench --hop`` (``python -m pp1.adapters.roles.hop``).

A job of two ranks, front and leader (PP1 with TP=1). After a minimal startup (the process groups; no model
is loaded: the leader's generator is :class:`NoOpGenerator`, which answers every call with one preallocated
latents tensor of the geometry's shape), the front's machine does its startup with the leader's (PING, pair
warm-up, READY) and ``warmup`` chunk round trips through the protocol (below), then the ranks alternate,
``n`` times, in the same processes and on the same groups:

- **raw round trips**: exactly the bytes of the last warm-up chunk's envelope and result (frame header,
  metadata, tensors: the same messages in the same order) with plain torch.distributed into buffers
  allocated once (``pp1.adapters.transport.raw``): posted as the wire posts them (the judged floor), the
  same through the runtime's wrapping, and one part at a time;
- **a protocol round trip** of the next chunk through the real path: the chunk machine plans the envelope,
  the PP channel preflights, encodes and sends it with its tensors (the conditioning, the noise and, on a
  recompute, the context frames: preallocated, stage 0 is not measured); the leader's executor and relay
  machine receive it, validate it, run the no-op generator and send the result; the front receives and
  validates the result and the chunk machine judges it (the tripwires).

Both are timed on the front (the protocol's from the plan to the verdict). Alternating them keeps a shared
host's changing load on both alike. Then SHUTDOWN: the leader's executor exits as in service.

The front writes both series (seconds, the warm-up round trips dropped) and the bytes of each direction to
``--report-json``; ``pp1.adapters.launch.hop`` turns them into the hop table. ``--hop-profile DIR``: each
rank's protocol phase under cProfile (``DIR/hop-rank<r>.prof`` and a text summary).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch

from pp1.adapters.front.engine import announce
from pp1.adapters.rank import options
from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event, setup_logging
from pp1.adapters.rank.startup import LoadedPipeline, geometry_for, torch_dtype_of
from pp1.adapters.roles.context import RankContext
from pp1.adapters.roles.front import front_machine, front_pp_channel
from pp1.adapters.roles.leader import leader_pp_channel, serve_leader
from pp1.adapters.transport.channels import PPChannel
from pp1.adapters.transport.raw import RawMessage, raw_round_trip, sync
from pp1.adapters.transport.runtime import DistributedRuntime
from pp1.fsm.chunk import ChunkMachine, Verdict, envelope_from_plan
from pp1.fsm.events import PairWarm, ReadyReceived, ResultReceived, Sent, Woke
from pp1.fsm.intents import AwaitReady, AwaitResult, Idle, NextStep, SendEnvelope, WarmPair
from pp1.fsm.lifecycle import make_lifecycle
from pp1.pipelines.interface import ChunkCall, ChunkOutput
from pp1.pipelines.loader import load_factory
from pp1.protocol.codec import encode
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.roles.hop")

T = TypeVar("T")

RUNTIME_WAIT_S = 60.0  # the runtime series' bound on each wait, when the channel has none


class NoOpGenerator:
    """The generator replaced by nothing: every call answers the same preallocated latents, with the
    generator calls it asked for (the tripwire holds) and the KV position a real one would report."""

    def __init__(self, geometry: ChunkGeometry, device: torch.device, dtype: torch.dtype) -> None:
        self.latents = torch.zeros(geometry.latents_shape(), dtype=dtype, device=device)
        self.frames = geometry.latent_frames
        self.position = 0

    def run(self, call: ChunkCall) -> ChunkOutput:
        self.position = (0 if call.init_cache else self.position) + self.frames
        return ChunkOutput(self.latents, call.expected_generator_calls, self.position)

    def reset(self) -> None:
        self.position = 0

    def fingerprint(self) -> str:
        return "noop"


# -- recording the last chunk (the raw phase sends exactly its bytes) --------------------------------------


class _Recorded(PPChannel):
    """The PP channel, remembering the last INFER envelope and result that went through it (with their
    tensors), and making raw round trips of exactly their bytes as they were after the ``warmup``-th chunk
    (both sides hold that chunk, so they agree on the sizes): the front before each of the next ``raw``
    chunks it plans (:meth:`raw_round_trip`), the leader before it waits for each of them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.envelope: tuple[PPEnvelopeV1, list[torch.Tensor]] | None = None
        self.result: tuple[PPResultV1, list[torch.Tensor]] | None = None
        self.chunks = 0  # INFER round trips so far
        self.warmup, self.raw = 0, 0  # the hop's (set by the role)
        self._raw: tuple[RawMessage, RawMessage] | None = None  # (what this side sends, its receive buffers)
        self._env: PPEnvelopeV1 | None = None

    def send_envelope(self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], timeout_s: float | None = None,
                      preflight: bool = True) -> None:
        super().send_envelope(env, tensors, timeout_s, preflight)
        if env.action is Action.INFER:
            self.envelope = (env, list(tensors))

    def recv_result(self, until: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        res, tensors = super().recv_result(until)
        if res.action is Action.INFER:
            self.result = (res, tensors)
            self.chunks += 1
        return res, tensors

    def recv_envelope(self, until: float | None) -> PPEnvelopeV1:
        if self.warmup <= self.chunks < self.warmup + self.raw:
            self.raw_round_trips()
        self._env = super().recv_envelope(until)
        return self._env

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        tensors = super().recv_tensors(specs, timeout_s)
        if self._env is not None and self._env.action is Action.INFER:
            self.envelope = (self._env, tensors)
        return tensors

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor] = ()) -> None:
        super().send_result(result, tensors)
        if result.action is Action.INFER:
            self.result = (result, list(tensors))
            self.chunks += 1

    def raw_messages(self) -> tuple[RawMessage, RawMessage]:
        """The last chunk's envelope and result as the raw bytes they travelled as."""
        assert self.envelope is not None and self.result is not None, "no chunk went through the channel"
        dev = self.rt.device
        return RawMessage.of(encode(*self.envelope), dev), RawMessage.of(encode(*self.result), dev)

    def raw_round_trips(self) -> tuple[float, float, float]:
        """Three round trips of the bytes of the chunk the raw series started after (frozen at the first): with
        torch.distributed's ops posted as the wire posts them, the same through the runtime (its checks and
        bookkeeping, no protocol), then torch.distributed's one part at a time."""
        if self._raw is None:
            envelope, result = self.raw_messages()
            self._raw = (envelope, result.empty_like()) if self.is_front else (result, envelope.empty_like())
        bound = self.send_timeout_s or RUNTIME_WAIT_S
        return (raw_round_trip(self.rt, *self._raw, self.is_front),
                raw_round_trip(self.rt, *self._raw, self.is_front, via_runtime=bound),
                raw_round_trip(self.rt, *self._raw, self.is_front, one_at_a_time=True))


# -- the two roles ---------------------------------------------------------------------------------------


def _profiled(profile_dir: str | None, rank: int, fn: Callable[[], T]) -> T:
    if not profile_dir:
        return fn()
    prof = cProfile.Profile()
    out = prof.runcall(fn)
    os.makedirs(profile_dir, exist_ok=True)
    path = os.path.join(profile_dir, f"hop-rank{rank}")
    prof.dump_stats(f"{path}.prof")
    with open(f"{path}.txt", "w") as f:
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
    return out


class HopFront:
    """The front's side of a protocol round trip: its machines (the front machine for startup, then the chunk
    machine it owns), the PP channel, and the chunk's tensors (preallocated: stage 0 is not measured)."""

    def __init__(self, ctx: RankContext, channel: PPChannel) -> None:
        self.channel, self.clock, self.device = channel, ctx.clock, ctx.rt.device
        self.machine = front_machine(ctx, ping=True, overlap=channel.overlaps)
        self.chunk: ChunkMachine = self.machine.chunk
        g = ctx.pipeline.geometry
        dtype = torch_dtype_of(g.dtype)

        def made(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(shape).to(dtype).to(self.device)

        self.conditioning, self.noise = made(g.conditioning_shape()), made(g.noise_shape())
        self.context = {f: made(g.context_shape(f)) for f in range(1, g.max_context_frames + 1)}

    def start(self) -> None:
        """The front machine's own startup (PING, pair warm-up, READY, a first heartbeat), performed until it
        idles: from then on the channel is the hop's."""
        fm, channel, clock = self.machine, self.channel, self.clock
        pending = deque(fm.start(clock()))
        while pending:
            it = pending.popleft()
            if isinstance(it, Idle):
                return
            if isinstance(it, SendEnvelope):
                channel.send_envelope(it.envelope, (), timeout_s=it.timeout_s)
                event: Any = Sent(clock())
            elif isinstance(it, AwaitResult):
                event = ResultReceived(channel.recv_result(it.until)[0], clock())
            elif isinstance(it, WarmPair):
                channel.warm_pair(fm.warm_timeout_s)
                event = PairWarm(clock())
            elif isinstance(it, AwaitReady):
                event = ReadyReceived(channel.recv_ready(it.until), clock())
            elif isinstance(it, NextStep):
                event = Woke(clock())
            else:
                raise RuntimeError(f"hop: the front's startup asked for {it!r}")
            pending.extendleft(reversed(fm.handle(event)))
        raise RuntimeError(f"hop: the front's startup ended in state {fm.state}")

    def round_trip(self) -> float:
        """One chunk through the real path (module docstring); its seconds, from the plan to the verdict."""
        chunk, channel, clock = self.chunk, self.channel, self.clock
        t0 = time.perf_counter()
        plan = chunk.plan_next(clock())
        tensors = [self.conditioning, self.noise] + ([self.context[plan.context_frames]] if plan.do_kv_recompute
                                                     else [])
        env = announce(envelope_from_plan(plan), tensors)
        channel.send_envelope(env, tensors, timeout_s=chunk.deadline_s())
        chunk.on_sent(clock())
        result, _ = channel.recv_result(chunk.deadline_at())
        decision = chunk.on_result(result, clock())
        if decision.verdict is not Verdict.EMIT:
            raise RuntimeError(f"hop: chunk {plan.chunk_index} was not accepted: {decision.verdict.value} "
                               f"{decision.error or result.error_message}")
        sync(self.device)
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        """SHUTDOWN through the mesh, answered in order (the leader's executor exits 0)."""
        chunk, channel, clock = self.chunk, self.channel, self.clock
        chunk.request_stop()
        channel.send_envelope(envelope_from_plan(chunk.plan_shutdown()), (), timeout_s=chunk.deadline_s())
        chunk.on_sent(clock())
        result, _ = channel.recv_result(chunk.deadline_at())
        if chunk.on_result(result, clock()).verdict is not Verdict.STOPPED:
            raise RuntimeError(f"hop: SHUTDOWN was not answered in order: {result}")


def _round_trips(front: HopFront, channel: _Recorded, hop: options.HopOptions) -> dict[str, list[float]]:
    """``hop.warmup`` chunk round trips, then ``hop.iterations`` times the raw round trips and a chunk's, then
    SHUTDOWN. Returns the three series (warm-up dropped), in seconds."""
    for _ in range(hop.warmup):
        front.round_trip()
    out: dict[str, list[float]] = {"protocol_s": [], "raw_s": [], "runtime_s": [], "raw_each_s": []}
    for _ in range(hop.iterations):
        raw, runtime, each = channel.raw_round_trips()
        out["raw_s"].append(raw)
        out["runtime_s"].append(runtime)
        out["raw_each_s"].append(each)
        out["protocol_s"].append(front.round_trip())
    front.shutdown()
    return out


def _recorded(ctx: RankContext, hop: options.HopOptions, make: Callable[..., PPChannel]) -> _Recorded:
    channel = make(ctx, _Recorded)
    assert isinstance(channel, _Recorded)
    channel.warmup, channel.raw = hop.warmup, hop.iterations
    return channel


def run_front(ctx: RankContext, hop: options.HopOptions) -> dict[str, Any]:
    channel = _recorded(ctx, hop, front_pp_channel)
    front = HopFront(ctx, channel)
    front.start()
    series = _profiled(hop.profile_dir, ctx.rt.rank, lambda: _round_trips(front, channel, hop))
    envelope, result = channel.raw_messages()
    env, _ = channel.envelope or (None, None)
    assert env is not None
    return {
        "iterations": hop.iterations,
        "warmup": hop.warmup,
        **series,
        "envelope": {"control_bytes": envelope.nbytes[0], "tensor_bytes": envelope.nbytes[1],
                     "tensors": [t.model_dump(mode="json") for t in env.tensors]},
        "result": {"control_bytes": result.nbytes[0], "tensor_bytes": result.nbytes[1]},
        "messages_per_direction": {"envelope": len(envelope.control) + len(envelope.tensors),
                                   "result": len(result.control) + len(result.tensors)},
    }


def run_leader(ctx: RankContext, hop: options.HopOptions) -> None:
    channel = _recorded(ctx, hop, leader_pp_channel)
    code = _profiled(hop.profile_dir, ctx.rt.rank, lambda: serve_leader(ctx, channel))
    if code != 0:
        raise RuntimeError(f"hop: the leader exited {code}")


# -- the entry -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__)
    options.add_arguments(p, options.RANK)
    options.add_hop_arguments(p)
    return p


def minimal_context(rt: DistributedRuntime, opts: options.JobOptions) -> RankContext:
    """A rank's context after the minimal startup: the geometry and the schedule of the preset, no stage 0,
    the no-op generator on the leader."""
    cfg = rt.config
    factory = load_factory(cfg.pipeline, cfg.pipeline_options)
    geometry = geometry_for(factory, cfg)
    loaded = LoadedPipeline(factory=factory, geometry=geometry, timesteps=tuple(factory.timesteps(cfg.preset)))
    if rt.is_mesh_member:
        loaded.generator = NoOpGenerator(geometry, rt.device, torch_dtype_of(cfg.dtype))
        loaded.fingerprint = loaded.generator.fingerprint()
    lifecycle = make_lifecycle(rt.role, rt.rank, mesh_rank=rt.mesh_rank)  # stays in init: the hop has no phases
    return RankContext(rt=rt, config=cfg, options=replace(opts, after_chunks="serve"), lifecycle=lifecycle,
                       faults=FaultPlan(rt.rank), loaded=loaded)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    opts = options.from_namespace(ns)
    hop = options.hop_from_namespace(ns)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, "?", opts.log_level)
    cfg = options.run_config(opts, int(os.environ.get("WORLD_SIZE", "2")))
    if cfg.topology != "pp1" or cfg.world_size != 2:
        log.error("the hop runs on a front and a leader: --topology pp1 --tp 1 (got %s, %d ranks)", cfg.topology,
                  cfg.world_size)
        return 2
    rt = DistributedRuntime.from_env(cfg, device=opts.device)
    setup_logging(rank, rt.role, opts.log_level)
    emit_event("phase", phase="hop")
    code, reason = 1, "?"
    try:
        rt.init(opts.pg_timeout_s)
        ctx = minimal_context(rt, opts)
        if rt.role == "front":
            report = {"ok": True, "hop": run_front(ctx, hop)}
            if opts.report_json:
                with open(opts.report_json, "w") as f:
                    json.dump(report, f)
        else:
            run_leader(ctx, hop)
        code, reason = 0, "hop done"
    except Exception as exc:  # a failed hop: the launcher reports the rank and why
        log.exception("hop failed")
        reason = f"{type(exc).__name__}: {exc}"
    cause = None if code == 0 else {"rank": rank, "phase": "hop", "reason": reason[:500], "kind": "local",
                                    "blame": None}
    emit_event("exit", code=code, reason=reason[:500], cause=cause)
    if code == 0:
        rt.teardown(opts.teardown_s)
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
