"""A mesh worker (mesh ranks 1..M-1): the executor of its :class:`WorkerLoopMachine` over the TP channel.

The machine drives the loop (the leader's PING, the watchdog-bounded wait for each header, the shard,
SHUTDOWN); this performs its intents: receive the next header, receive (or make) the call's tensors,
run the shard, warm the mesh device group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.roles.context import RankContext
from pp1.adapters.roles.leader import mesh_exit
from pp1.adapters.roles.mesh import MeshExecutor
from pp1.adapters.transport.channels import TPChannel
from pp1.adapters.transport.interface import MeshEnd
from pp1.fsm.base import Event, Intent
from pp1.fsm.events import HeaderReceived
from pp1.fsm.intents import AwaitHeader, RecvTensors
from pp1.fsm.worker import WorkerLoopMachine
from pp1.pipelines.interface import Generator
from pp1.protocol.messages import Action
from pp1.protocol.schedule import WEIGHTS_CHECK_EVERY

log = logging.getLogger("pp1.adapters.roles.worker")


class WorkerExecutor(MeshExecutor):
    """Performs a WorkerLoopMachine's intents."""

    def __init__(self, machine: WorkerLoopMachine, generator: Generator, mesh: MeshEnd, device: torch.device,
                 faults: FaultPlan, recv_timeout_s: float, clock: Callable[[], float]) -> None:
        super().__init__(machine, generator, mesh, device, faults, warm_timeout_s=4 * recv_timeout_s, clock=clock)
        self.recv_timeout_s = recv_timeout_s

    def perform(self, it: Intent) -> Event | None:
        handled, event = self.perform_mesh(it)
        if handled:
            return event
        if isinstance(it, AwaitHeader):
            header = self.mesh.recv_header(it.until)
            if header.action is Action.INFER:
                log.info("header infer call_id=%d chunk_index=%d cache_epoch=%d", header.call_id,
                         header.chunk_index, header.cache_epoch)
                self.check_point(f"chunk:{header.chunk_index}")
            return HeaderReceived(header, self.clock())
        if isinstance(it, RecvTensors):
            self.tensors = self.mesh.recv_tensors(it.specs, self.recv_timeout_s)
            self.tensors_arrived()
            return None
        raise TypeError(f"worker: no way to perform {it!r}")

    def peer_of(self, intent: Intent) -> int | None:
        return self.machine.leader_rank  # type: ignore[attr-defined,no-any-return]


def serve_worker(ctx: RankContext) -> int:
    """A mesh worker: the TP channel from the leader."""
    p, cfg = ctx.pipeline, ctx.config
    assert p.generator is not None
    tp = TPChannel(ctx.rt, p.geometry, send_timeout_s=cfg.watchdog_s)
    loop = WorkerLoopMachine(ctx.rt.rank, watchdog_s=cfg.watchdog_s, now=ctx.clock(), geometry=p.geometry,
                             heartbeat_s=cfg.heartbeat_s, lifecycle=ctx.lifecycle, leader_rank=cfg.leader_rank,
                             weights_baseline=p.weights_checksum, weights_check_every=WEIGHTS_CHECK_EVERY,
                             role=ctx.rt.role,
                             mesh_rank=ctx.rt.mesh_rank)
    executor = WorkerExecutor(loop, p.generator, tp, ctx.rt.device, ctx.faults, recv_timeout_s=cfg.watchdog_s,
                              clock=ctx.clock)
    ctx.attach(executor)
    return mesh_exit(executor.run(loop.start(ctx.clock())))
