"""What the mesh roles' executors share: running this rank's generator shard for a call, the tensors of
a call (received or, for WARMUP, made from the header's seed), and the mesh device probe."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from pp1.adapters.rank.executor import Executor
from pp1.adapters.rank.faults import FaultPlan, perturb_weights
from pp1.adapters.roles.shard import run_shard, warmup_tensors
from pp1.adapters.transport.interface import MeshEnd, WouldBlock
from pp1.adapters.transport.runtime import PeerLost
from pp1.fsm.base import Event, Intent, ProtocolMachine
from pp1.fsm.events import InputsChecked, MeshWarm, ShardDone, ShardFailed, WeightsChecked
from pp1.fsm.intents import CheckInputs, CheckWeights, MakeWarmupTensors, RunShard, WarmMesh
from pp1.pipelines.checksum import checksum
from pp1.pipelines.interface import Generator
from pp1.protocol.messages import Action

log = logging.getLogger("pp1.adapters.roles.mesh")


class MeshExecutor(Executor):
    """Performs the intents every mesh rank has: MakeWarmupTensors, RunShard, WarmMesh."""

    def __init__(self, machine: ProtocolMachine, generator: Generator, mesh: MeshEnd, device: torch.device,
                 faults: FaultPlan, warm_timeout_s: float, clock: Callable[[], float]) -> None:
        super().__init__(machine, clock)
        self.generator = generator
        self.mesh = mesh
        self.device = device
        self.faults = faults
        self.warm_timeout_s = warm_timeout_s
        self.tensors: list[torch.Tensor] = []  # the call's tensors (received or made)
        self.latents: torch.Tensor | None = None  # the last shard's output
        self.received_at: float | None = None  # when the call's header arrived (leader: its envelope)
        self._drill: Any = None  # a drift drill waiting for the call's tensors

    def perform_mesh(self, it: Intent) -> tuple[bool, Event | None]:
        """(handled, event) for the intents every mesh rank performs."""
        if isinstance(it, MakeWarmupTensors):
            self.tensors = warmup_tensors(it.header, self.device)
            return True, None
        if isinstance(it, CheckInputs):
            return True, InputsChecked(checksum(self.tensors))
        if isinstance(it, CheckWeights):
            return True, WeightsChecked(checksum(self.generator.held_weights()))  # type: ignore[attr-defined]
        if isinstance(it, RunShard):
            return True, self._run(it)
        if isinstance(it, WarmMesh):
            self.mesh.warm_mesh(self.warm_timeout_s)
            return True, MeshWarm(self.clock())
        return False, None

    def check_point(self, point: str) -> None:
        """A fault point of ``PP1_FAULT``: process faults fire now; a drift drill waits for the call's tensors."""
        fault = self.faults.check(point)
        if fault is not None and not perturb_weights(fault, self.generator):
            self._drill = fault

    def tensors_arrived(self) -> None:
        """The call's tensors are in: a pending drift drill perturbs this rank's copy of the noise."""
        fault, self._drill = self._drill, None
        if fault is not None and fault.do == "perturb_inputs" and len(self.tensors) > 1:
            self.tensors[1] = self.tensors[1] + float(fault.arg or 0.25)

    def _run(self, it: RunShard) -> Event:
        h = it.header
        if h.action is Action.INFER:
            self.check_point(f"shard:{h.chunk_index}")
        try:
            out, ms = run_shard(self.generator, h, self.tensors)
        except WouldBlock:  # an in-memory mesh: the collective cannot complete yet (nothing consumed)
            raise
        except Exception as exc:
            peer_lost = isinstance(exc, PeerLost)  # a collective failed: a mesh peer is gone
            (log.error if peer_lost else log.exception)("shard failed call_id=%d chunk_index=%d cache_epoch=%d: %s",
                                                       h.call_id, h.chunk_index, h.cache_epoch, exc)
            self.latents = None
            return ShardFailed(f"{type(exc).__name__}: {exc}", peer_lost=peer_lost)
        now = self.clock()
        self.latents = out.latents
        timings = {**out.timings_ms, "shard_ms": ms}
        timings.setdefault("total", ms)
        if self.received_at is not None:
            timings["leader_ms"] = (now - self.received_at) * 1000
        log.debug("shard done %s call_id=%d chunk_index=%d cache_epoch=%d calls=%d %.1f ms", h.action.value,
                  h.call_id, h.chunk_index, h.cache_epoch, out.generator_calls, ms)
        return ShardDone(now=now, observed_calls=out.generator_calls, current_start_frame=out.current_start_frame,
                         timings_ms=timings)
