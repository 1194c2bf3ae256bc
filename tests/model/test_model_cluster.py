"""The model test: every rank's real machines together over an in-memory transport (model_cluster),
driven by Hypothesis through startup, serving and shutdown, with messages delivered in any legal
order and faults injected between steps.

Topologies: 1 front + M mesh ranks (M = 1..4) and pure TP (rank 0 = leader + front; M = 1..4
drawn per example). Invariants (ModelViolation): no reachable deadlock; shutdown or failure reaches
every live rank (settle() ends with every rank exited); the front never waits without a deadline;
no stale-epoch result is emitted; call_id strictly increases; overlap depth 1 and every envelope
answered when the front exits 0; recompute exactly on schedule; no fault -> every rank exits 0.

Profiles: PP1_HYPOTHESIS_PROFILE=ci (default, derandomized) or deep (see model_profiles.py).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from model_cluster import Cluster
from model_profiles import model_settings, model_timeout_s

F = TypeVar("F", bound=Callable[..., Any])

TICKS = [0.25, 0.5, 0.5, 1.0, 1.0, 2.0, 6.0, 31.0]


def _tracked(fn: F) -> F:
    """Marks the run broken while a rule runs, so teardown does not pile a second error on the first."""

    @functools.wraps(fn)
    def wrapper(self: ClusterModel, *args: Any, **kwargs: Any) -> Any:
        self.broken = True
        out = fn(self, *args, **kwargs)
        self.broken = False
        return out

    return wrapper  # type: ignore[return-value]


class ClusterModel(RuleBasedStateMachine):
    TOPOLOGY = "pp1"
    MESH_SIZES: tuple[int, ...] = (2,)

    def __init__(self) -> None:
        super().__init__()
        self.c: Cluster | None = None
        self.broken = False
        self.kills = 0

    @initialize(data=st.data(), k=st.sampled_from([0, 1, 2, 3]), warmup=st.integers(0, 2),
                from_serving=st.sampled_from([True, True, False]), chunks=st.integers(0, 3))
    @_tracked
    def start(self, data: st.DataObject, k: int, warmup: int, from_serving: bool, chunks: int) -> None:
        """A fresh cluster; startup faults drawn here. Two runs in three start from serving (startup
        and ``chunks`` chunks done deterministically) so that most steps exercise serving."""
        m = data.draw(st.sampled_from(self.MESH_SIZES), label="mesh_size")
        world = m + (1 if self.TOPOLOGY == "pp1" else 0)
        startup = data.draw(st.sampled_from([("none", 0)] * 30 + [(kind, r) for kind in ("config", "load")
                                                                   for r in range(world)]), label="startup_fault")
        self.c = Cluster(self.TOPOLOGY, m, recompute_every=k, warmup_chunks=warmup,
                         bad_config_rank=startup[1] if startup[0] == "config" else None,
                         load_fail_rank=startup[1] if startup[0] == "load" else None)
        if from_serving:
            self.c.run_until_serving()
            self.c.run_chunks(chunks)

    @property
    def cluster(self) -> Cluster:
        assert self.c is not None
        return self.c

    # -- progress: any enabled step, in any order -------------------------------------------------
    @rule(n=st.integers(1, 20), seed=st.integers(0, 2**16))
    @_tracked
    def steps(self, n: int, seed: int) -> None:
        """``n`` enabled steps, each picked by a cheap PRNG seeded by Hypothesis (one draw, not n)."""
        rng = random.Random(seed)
        for _ in range(n):
            if self.cluster.step(rng.randrange(1 << 16)) is None:
                break

    @rule(dt=st.sampled_from(TICKS))
    @_tracked
    def tick(self, dt: float) -> None:
        self.cluster.tick(dt)

    # -- what users and faults do, between any two steps ------------------------------------------
    @rule(what=st.sampled_from(["hard_cut", "hard_cut", "toggle_stream", "sigterm", "kill", "corrupt:invalid",
                                "corrupt:ids", "corrupt:garbage", "chunk:recoverable", "chunk:tripwire"]), data=st.data())
    @_tracked
    def event(self, what: str, data: st.DataObject) -> None:
        c = self.cluster
        if what == "hard_cut":
            c.hard_cut()
        elif what == "toggle_stream":
            c.streaming = not c.streaming
        elif what == "sigterm":
            c.sigterm()
        elif what == "kill" and self.kills < 2:
            self.kills += 1
            c.kill(data.draw(st.integers(0, len(c.procs) - 1), label="rank"))
        elif what.startswith("corrupt:"):
            c.corrupt_next = what.split(":")[1]
        elif what.startswith("chunk:"):
            c.chunk_fault = what.split(":")[1]

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def no_deadlock(self) -> None:
        if self.c is not None:
            self.c.check_progress()

    @invariant()
    def front_waits_with_deadline(self) -> None:
        if self.c is not None:
            self.c.check_front_deadline()

    def teardown(self) -> None:
        if self.c is not None and not self.broken:
            self.c.settle()
            c = self.c
            hypothesis_event(f"front exit {c.front.exit_code}")
            hypothesis_event(f"chunks emitted: {min(len(c.ledger.emitted), 5)}+")
            for f in {f.split(' ')[0] for f in c.faults}:
                hypothesis_event(f"fault: {f}")
            if c.ledger.retries:
                hypothesis_event("retried")
            if any(v for v in c.ledger.emitted if v[0] > 0):
                hypothesis_event("emitted after a hard cut")


def _case(topology: str, mesh_sizes: tuple[int, ...]) -> Any:
    cls = type(f"Model_{topology}_{'_'.join(map(str, mesh_sizes))}", (ClusterModel,),
               {"TOPOLOGY": topology, "MESH_SIZES": mesh_sizes})
    case = cls.TestCase
    case.settings = model_settings()
    return case


TestPP1Mesh1 = _case("pp1", (1,))
TestPP1Mesh2 = _case("pp1", (2,))
TestPP1Mesh3 = _case("pp1", (3,))
TestPP1Mesh4 = _case("pp1", (4,))
TestPureTP = _case("tp", (1, 2, 3, 4))

pytestmark = pytest.mark.timeout(model_timeout_s())
