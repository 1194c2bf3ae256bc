"""The typed context every role's code takes (instead of positional arguments and an argparse namespace)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.options import JobOptions
from pp1.adapters.rank.startup import LoadedPipeline
from pp1.adapters.transport.runtime import DistributedRuntime
from pp1.fsm.lifecycle import LifecycleMachine
from pp1.protocol.config import RunConfig

if TYPE_CHECKING:  # pragma: no cover
    from pp1.adapters.front.engine import FrameSink, FrontEngine
    from pp1.adapters.front.report import EngineOutcome
    from pp1.adapters.rank.executor import Executor
    from pp1.adapters.rank.progress import ProgressBoard


@dataclass
class RankContext:
    """One rank's process: who it is (``rt``), the run (``config``, ``options``), its lifecycle machine,
    its fault plan, what it loaded, and the executor serving now (signals and the server reach it)."""

    rt: DistributedRuntime
    config: RunConfig
    options: JobOptions
    lifecycle: LifecycleMachine
    faults: FaultPlan
    loaded: LoadedPipeline | None = None
    clock: Callable[[], float] = time.monotonic
    started_at: float = field(default_factory=time.monotonic)
    executor: Executor | None = None  # the loop that owns the rank's channels, once serving starts
    engine: FrontEngine | None = None  # the front's engine (front and pure-TP rank 0)
    frame_sinks: list[FrameSink] = field(default_factory=list)  # who sees the shown chunks (the server)
    outcome_sinks: list[Callable[[EngineOutcome], None]] = field(default_factory=list)  # told how the stream ended
    exit_sinks: list[Callable[[str], None]] = field(default_factory=list)  # told (why) just before a failing exit
    progress: ProgressBoard | None = None  # every rank's progress, through the job's store

    _drain_at: float | None = None

    def request_drain(self, now: float) -> None:
        """SIGTERM in a phase that drains: the serving loop is asked to end in order (now, or as soon as
        it exists), and the request is published so the front drains the whole job."""
        from pp1.fsm.events import DrainRequested

        if self.progress is not None:
            self.progress.request_drain()
        if self.executor is not None:
            self.executor.post(DrainRequested(now))
        else:
            self._drain_at = now

    def attach(self, executor: Executor) -> None:
        """The executor that now owns the rank's loop (a drain asked for before it existed is replayed)."""
        from pp1.fsm.events import DrainRequested

        self.executor = executor
        if self._drain_at is not None:
            executor.post(DrainRequested(self._drain_at))

    @property
    def pipeline(self) -> LoadedPipeline:
        assert self.loaded is not None, "the load step has not run"
        return self.loaded
