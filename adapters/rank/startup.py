"""The startup every rank runs, in the same order (pp1.md §2): init_process_group and the world CPU
group; parity; the topology's sub-groups (one fixed order); load; vote; fingerprint (mesh);
barrier. Warming the channels and warmup are role-specific (the role mains).

Sub-groups are created right after parity rather than before it: ranks that disagree on the
topology would otherwise call ``new_group`` with different members and hang instead of failing
with a per-key diff. Only the world CPU group (every rank, whatever the config) precedes parity.

Each step's outcome is fired into the rank's lifecycle machine; a failure raises :class:`RankExit`
after the machine recorded its FailureCause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.transport.runtime import DistributedRuntime, PeerLost
from pp1.fsm.intents import EXIT_FAILED
from pp1.fsm.lifecycle import LifecycleMachine
from pp1.pipelines.interface import Generator, PipelineFactory, Stage0
from pp1.protocol.config import RunConfig, parity_report
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


def torch_dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def geometry_for(factory: PipelineFactory, config: RunConfig) -> ChunkGeometry:
    """The preset's geometry with the run's wire dtype."""
    g = factory.geometry(config.preset)
    return g if g.dtype == config.dtype else g.model_copy(update={"dtype": config.dtype})


class Startup:
    """Runs the common startup steps for one rank and drives its lifecycle machine."""

    def __init__(
        self,
        rt: DistributedRuntime,
        config: RunConfig,
        lifecycle: LifecycleMachine,
        faults: FaultPlan,
        pg_timeout_s: float,
        stop_requested: threading.Event | None = None,
    ) -> None:
        self.rt, self.config, self.lc, self.faults = rt, config, lifecycle, faults
        self.pg_timeout_s = pg_timeout_s
        self.stop_requested = stop_requested or threading.Event()

    # -- helpers -----------------------------------------------------------------------------------
    def fail(self, reason: str, kind: str = "local", code: int = EXIT_FAILED) -> RankExit:
        if not self.lc.is_terminal:
            self.lc.fail_with(reason, "local" if kind == "local" else "remote")
        cause = self.lc.failure
        log.error("%s", cause or reason)
        emit_event("failed", reason=str(cause or reason), phase=cause.phase if cause else "?")
        return RankExit(code, str(cause or reason))

    def fire(self, event: str) -> None:
        self.lc.fire(event)

    def _check_signal(self) -> None:
        if self.stop_requested.is_set():
            raise self.fail(f"stop requested during {self.lc.state}", "local")

    # -- the steps ---------------------------------------------------------------------------------
    def run(self, build: Callable[[], LoadedPipeline]) -> LoadedPipeline:
        """init .. barrier. Returns what the load built."""
        rt = self.rt
        emit_event("phase", phase=self.lc.state, mesh_rank=rt.mesh_rank)
        try:
            rt.init_world(self.pg_timeout_s)
            self.fire("start")
            self._parity()
            self._check_signal()
            loaded = self._load(build)
            self._vote(loaded)
            self._check_signal()
            self._fingerprint_and_barrier(loaded)
        except PeerLost as exc:
            raise self.fail(f"a peer was lost during {self.lc.state}: {exc}", "remote") from exc
        assert loaded is not None
        return loaded

    def _parity(self) -> None:
        rt = self.rt
        mine = self.config.model_dump(mode="json")
        configs = rt.all_gather_object(mine, rt.groups.world_cpu, "parity")
        report = parity_report(configs)
        if report:
            for line in report:
                log.error("parity: %s", line)
            kind = "local" if mine != configs[0] else "remote"
            raise self.fail("config parity failed: " + "; ".join(report), kind)
        try:
            rt.init_groups()
        except Exception as exc:  # every rank has the same config: every rank fails the same way
            raise self.fail(f"topology: {exc}", "local") from exc
        self.fire("parity_ok")

    def _load(self, build: Callable[[], LoadedPipeline]) -> LoadedPipeline | None:
        loaded: LoadedPipeline | None = None
        reason = ""
        try:
            self.faults.check("load")
            loaded = build()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.exception("load failed")
        vote = self.lc.on_loaded(loaded is not None, reason)
        self._load_reason = reason
        return loaded if vote else None

    def _vote(self, loaded: LoadedPipeline | None) -> None:
        rt = self.rt
        t = torch.tensor([1 if loaded is not None else 0], dtype=torch.int32)
        rt.all_reduce(t, dist.ReduceOp.MIN, rt.groups.world_cpu, "vote")
        detail = ""
        if int(t.item()) == 0:
            causes = rt.all_gather_object(self._load_reason or None, rt.groups.world_cpu, "vote_causes")
            detail = "; ".join(f"rank {r}: {c}" for r, c in enumerate(causes) if c)
        self.lc.on_vote(int(t.item()), detail)
        if self.lc.failure is not None:
            raise self.fail(self.lc.failure.reason)

    def _fingerprint_and_barrier(self, loaded: LoadedPipeline | None) -> None:
        rt = self.rt
        assert loaded is not None
        fp_ok = True
        detail = ""
        if rt.is_mesh_member:
            fps = rt.all_gather_object(loaded.fingerprint, rt.groups.mesh_cpu, "fingerprint")
            fp_ok = len(set(fps)) == 1
            if fp_ok:
                self.fire("fingerprint_ok")
            else:
                detail = ", ".join(f"mesh rank {i}: {fp}" for i, fp in enumerate(fps))
        verdict = torch.tensor([1 if fp_ok else 0], dtype=torch.int32)
        rt.all_reduce(verdict, dist.ReduceOp.MIN, rt.groups.world_cpu, "barrier")
        if not fp_ok:
            raise self.fail(f"shard fingerprints differ: {detail}", "local")
        if int(verdict.item()) == 0:
            raise self.fail("shard fingerprints differ on the mesh", "remote")
        self.fire("barrier_done")
