"""The startup every rank runs, in the same order (pp1.md §2): init_process_group and the world CPU
group; parity; the topology's sub-groups (one fixed order); load; vote; fingerprint (mesh);
barrier. The rank's lifecycle machine drives it as intents (``LifecycleMachine.start``); this performs
them. Warming the channels and warmup are the role machines' (``fsm/leader.py``, ``worker.py``, ``front.py``).

Sub-groups are created right after parity rather than before it: ranks that disagree on the
topology would otherwise call ``new_group`` with different members and hang instead of failing
with a per-key diff. Only the world CPU group (every rank, whatever the config) precedes parity.

Each step's outcome is fed into the rank's lifecycle machine; a failure raises :class:`RankExit`
after the machine recorded its FailureCause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pp1.adapters.rank.executor import Executor
from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.transport.interface import StartupCollectives
from pp1.adapters.transport.runtime import DistributedCollectives, DistributedRuntime
from pp1.fsm.base import Event, Intent
from pp1.fsm.events import (
    BarrierPassed,
    ConfigsGathered,
    FingerprintsGathered,
    GroupsReady,
    LoadDone,
    VoteCounted,
    WorldReady,
)
from pp1.fsm.intents import Barrier, GatherConfigs, GatherFingerprints, InitGroups, InitWorld, Load, Vote
from pp1.fsm.lifecycle import LifecycleMachine
from pp1.pipelines.interface import Generator, PipelineFactory, Stage0
from pp1.protocol.config import RunConfig
from pp1.protocol.geometry import ChunkGeometry

log = logging.getLogger("pp1.adapters.rank.startup")


class RankExit(Exception):
    """End this rank with ``code``. ``poisoned``: a channel broke; exit without touching any group."""

    def __init__(self, code: int, reason: str, poisoned: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.poisoned = poisoned


@dataclass
class LoadedPipeline:
    """What the load step produced on this rank."""

    factory: PipelineFactory
    geometry: ChunkGeometry
    timesteps: tuple[int, ...]
    stage0: Stage0 | None = None
    generator: Generator | None = None
    fingerprint: str = ""
    weights_checksum: str | None = None  # the shard's weights as loaded (None: the pipeline cannot say)


def torch_dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def geometry_for(factory: PipelineFactory, config: RunConfig) -> ChunkGeometry:
    """The preset's geometry with the run's wire dtype."""
    g = factory.geometry(config.preset)
    return g if g.dtype == config.dtype else g.model_copy(update={"dtype": config.dtype})


class StartupExecutor(Executor):
    """Performs the startup intents of a rank's lifecycle machine over the startup collectives (the
    machine decides: parity, the vote, the fingerprints, the barrier's verdict)."""

    def __init__(self, collectives: StartupCollectives, lifecycle: LifecycleMachine, faults: FaultPlan,
                 build: Callable[[], LoadedPipeline], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(lifecycle, clock)
        self.collectives, self.faults, self.build = collectives, faults, build
        self.loaded: LoadedPipeline | None = None

    def perform(self, it: Intent) -> Event | None:
        c = self.collectives
        if isinstance(it, InitWorld):
            c.init_world()
            return WorldReady()
        if isinstance(it, GatherConfigs):
            return ConfigsGathered(c.gather_configs(it.config))
        if isinstance(it, InitGroups):
            c.init_groups()
            return GroupsReady()
        if isinstance(it, Load):
            return self._load()
        if isinstance(it, Vote):
            return VoteCounted(*c.vote(it.vote, it.cause))
        if isinstance(it, GatherFingerprints):
            return FingerprintsGathered(c.gather_fingerprints(it.fingerprint))
        if isinstance(it, Barrier):
            return BarrierPassed(c.barrier(it.verdict))
        raise TypeError(f"startup: no way to perform {it!r}")

    def _load(self) -> LoadDone:
        try:
            self.faults.check("load")
            self.loaded = self.build()
        except Exception as exc:
            log.exception("load failed")
            return LoadDone(ok=False, reason=f"{type(exc).__name__}: {exc}")
        return LoadDone(ok=True, fingerprint=self.loaded.fingerprint)


def run_startup(rt: DistributedRuntime, config: RunConfig, lifecycle: LifecycleMachine, faults: FaultPlan,
                pg_timeout_s: float, build: Callable[[], LoadedPipeline]) -> LoadedPipeline:
    """init .. barrier, in the same order on every rank; returns what the load built, or raises RankExit
    after the lifecycle recorded its cause."""
    executor = StartupExecutor(DistributedCollectives(rt, pg_timeout_s), lifecycle, faults, build)
    executor.begin(lifecycle.start(config.model_dump(mode="json")))
    ex = executor.drain()
    if ex is not None:
        cause = lifecycle.failure
        emit_event("failed", reason=str(cause or ex.reason), phase=cause.phase if cause else "?")
        raise RankExit(ex.code, ex.reason)
    assert executor.loaded is not None
    return executor.loaded
