"""A whole job in one process, without torch.distributed: pure TP's rank 0 with a mesh of one (the front's
engine, the in-process channel, the leader's executor and a generator), wired exactly as the rank does
it (``adapters/roles/front.py``). For tests of the front's loop, the engine, prompt changes and the
server: real machines and executors, a real pipeline, no processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pp1.adapters.front.engine import FrontEngine
from pp1.adapters.rank.faults import FaultPlan, parse_faults
from pp1.adapters.roles.leader import LeaderExecutor
from pp1.adapters.transport.inprocess import InProcessChannel
from pp1.adapters.transport.interface import FrontEnd
from pp1.fsm.chunk import ChunkMachine
from pp1.fsm.events import EnvelopeReceived
from pp1.fsm.front import FrontMachine
from pp1.fsm.leader import LeaderRelayMachine
from pp1.pipelines.comm import SoloCommunicator
from pp1.pipelines.interface import Stage0
from pp1.pipelines.loader import load_factory
from pp1.protocol.config import RunConfig
from pp1.protocol.messages import PPEnvelopeV1, TPHeaderV1

STANDIN = "pp1.testing.standin:factory"


class SoloMesh:
    """The TP channel of a mesh of one: nothing to send, nothing to receive, nothing to warm."""

    def send_header(self, header: TPHeaderV1, tensors: Sequence[torch.Tensor] = (), with_tensors: bool = True,
                    preflight: bool = True) -> None:
        return None

    def recv_header(self, until: float | None) -> TPHeaderV1:  # pragma: no cover - a leader never receives
        raise AssertionError("a mesh of one has no leader to receive from")

    def recv_tensors(self, specs: Sequence[Any], timeout_s: float | None) -> list[torch.Tensor]:  # pragma: no cover
        raise AssertionError("a mesh of one has no leader to receive from")

    def warm_mesh(self, timeout_s: float) -> None:
        return None


@dataclass
class InProcessJob:
    config: RunConfig
    engine: FrontEngine
    machine: FrontMachine
    leader: LeaderExecutor
    relay: LeaderRelayMachine
    channel: InProcessChannel
    stage0: Stage0
    faults: FaultPlan
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self):  # type: ignore[no-untyped-def]
        return self.engine.run_to_end()


def pure_tp_job(
    *,
    pipeline: str = STANDIN,
    preset: str = "tiny",
    chunks: int | None = 4,
    after_chunks: str = "shutdown",
    faults: str = "",
    prompt: str = "a calm sea at dawn",
    channel: Callable[[InProcessChannel], FrontEnd] | None = None,
    stage0: Callable[[Stage0], Stage0] | None = None,
    overlap: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
    **config: Any,
) -> InProcessJob:
    """Rank 0 of a pure-TP job of one rank, warmed up (the leader's warmup ran). ``config``: RunConfig
    fields (heartbeat_s, deadline_floor_s, recompute_every, context_source, warmup_chunks, ...);
    ``channel`` / ``stage0``: wrap the front's way to the leader or its stage 0 (spies, scripts);
    ``overlap``: pretend the channel overlaps (as the PP channel does) or not."""
    defaults: dict[str, Any] = dict(heartbeat_s=0.2, watchdog_s=1.0, warmup_chunks=1, deadline_floor_s=5.0)
    cfg = RunConfig(topology="tp", world_size=1, mesh_global_ranks=(0,), preset=preset, pipeline=pipeline,
                    **{**defaults, **config})
    factory = load_factory(cfg.pipeline)
    cpu, f32 = torch.device("cpu"), torch.float32
    geometry = factory.geometry(preset)
    timesteps = tuple(factory.timesteps(preset))
    generator = factory.build_generator(preset, 0, 1, SoloCommunicator(), cpu, f32)
    st0 = factory.build_stage0(preset, cpu, f32)
    plan = FaultPlan(0, parse_faults(faults))
    inproc = InProcessChannel(geometry)
    relay = LeaderRelayMachine(0, geometry, 1, timesteps=timesteps, warmup_chunks=cfg.warmup_chunks,
                               recompute_every=cfg.recompute_every, seed=cfg.seed, fingerprint=generator.fingerprint(),
                               now=clock(), front_in_process=True, role="tp_rank0")
    leader = LeaderExecutor(relay, generator, SoloMesh(), inproc, cpu, plan, recv_timeout_s=None, warm_timeout_s=5.0,
                            clock=clock)

    def deliver(env: PPEnvelopeV1) -> str | None:
        leader.feed(EnvelopeReceived(env, clock()))
        ex = leader.drain()
        return ex.reason if ex is not None else None

    inproc.deliver = deliver
    leader.begin(relay.start(clock()))
    ex = leader.drain()
    assert ex is None and inproc.ready is not None, f"warmup failed: {ex}"
    chunk = ChunkMachine(0, chunk_frames=geometry.latent_frames, window=geometry.max_context_frames,
                         timesteps=timesteps, recompute_every=cfg.recompute_every, context_source=cfg.context_source,
                         seed=cfg.seed, heartbeat_s=cfg.heartbeat_s, deadline_floor_s=cfg.deadline_floor_s,
                         deadline_factor=cfg.deadline_factor, role="tp_rank0")
    way: FrontEnd = channel(inproc) if channel is not None else inproc
    machine = FrontMachine(0, chunk=chunk, geometry=geometry, overlap=way.overlaps if overlap is None else overlap,
                           ping=False, max_chunks=chunks, after_chunks=after_chunks, role="tp_rank0")  # type: ignore[arg-type]
    used_stage0 = stage0(st0) if stage0 is not None else st0
    engine = FrontEngine(machine, way, used_stage0, geometry, conditioning=st0.encode_prompt(prompt), prompt=prompt,
                         faults=plan, clock=clock)
    return InProcessJob(cfg, engine, machine, leader, relay, inproc, used_stage0, plan)
