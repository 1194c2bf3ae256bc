"""The model test: every rank's real machines and executors over the in-memory transport (model_cluster on
``pp1.testing.memory``), driven by Hypothesis through startup, serving and shutdown: any enabled rank steps
next, in any order, virtual time advances, and faults are injected between steps.

Topologies: 1 front + M mesh ranks (M = 1..4) and pure TP (rank 0 = leader + front; M = 1..4 drawn per
example). Invariants (ModelViolation): no reachable deadlock; shutdown or failure reaches every live rank
(settle() ends with every rank exited); the front never waits without a deadline, and waits exactly as long
as the deadline rule says; a bounded wait (deadline, watchdog) runs out only when a fault could cause it; no
stale-epoch chunk is shown and each epoch's chunks are shown in order; call_id strictly increases; overlap
depth 1, and every envelope answered when the front exits 0; recompute exactly on schedule (serving and
warmup); a header's tensors are received as announced (the transport); the mesh runs the same calls; no
fault -> every rank exits 0; no rank lost -> every worker exits 0 (the front's farewell).

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

TICKS = [0.25, 0.5, 0.5, 1.0, 1.0, 2.0, 6.0, 31.0, 80.0]
STALLS = [0.5, 2.0, 6.0, 10.0, 20.0, 31.0, 80.0, 700.0]
SLOW = [2.0, 8.0, 12.0, 25.0]  # seconds a generator call computes (below the deadline floor: not a fault)
EVENTS = ["slow", "slow", "cut", "cut", "prompt", "stop", "signal_front", "signal", "signal_all", "kill", "stall",
          "corrupt_envelope", "unserialisable", "bad_dtype", "garble", "generator_raise", "generator_tripwire",
          "generator_tripwire_twice"]


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

    @initialize(data=st.data(), k=st.sampled_from([0, 1, 2, 3]), warmup=st.sampled_from([0, 1, 1, 2, 4, 5]),
                source=st.sampled_from(["latents", "latents", "reencode"]),
                headless=st.sampled_from([None] * 6 + [(0, "idle"), (2, "idle"), (3, "shutdown"), (1, "shutdown")]),
                from_serving=st.sampled_from([True, True, False]), chunks=st.integers(0, 3),
                tempo=st.sampled_from([(), (), (), (12.0, 0.0, 0.0, 0.0), (8.0, 25.0, 0.0, 0.0), (2.0, 12.0, 0.0)]),
                window=st.sampled_from([6, 6, 2, 3, 4]))
    @_tracked
    def start(self, data: st.DataObject, k: int, warmup: int, source: str, headless: tuple[int, str] | None,
              from_serving: bool, chunks: int, tempo: tuple[float, ...], window: int) -> None:
        """A fresh job; startup faults drawn here. Two runs in three start from serving (startup and
        ``chunks`` chunks done deterministically) so that most steps exercise serving. ``tempo``: the mesh's
        first serving calls take that long (moves the deadline's p99); ``window``: the attention window (6: the
        stand-in's; 2, below a chunk of 3: a re-encode recompute decodes the chunk in hand first)."""
        m = data.draw(st.sampled_from(self.MESH_SIZES), label="mesh_size")
        world = m + (1 if self.TOPOLOGY == "pp1" else 0)
        startup = data.draw(st.sampled_from([("none", 0)] * 30 + [(kind, r) for kind in ("config", "load")
                                                                   for r in range(world)]
                                            + [("fingerprint", r) for r in range(world - m, world)]),
                             label="startup_fault")
        n, then = headless if headless is not None else (None, "shutdown")
        self.c = Cluster(self.TOPOLOGY, m, recompute_every=k, warmup_chunks=warmup, context_source=source,
                         chunks=n, after_chunks=then, tempo=tempo, window=window,
                         bad_config_rank=startup[1] if startup[0] == "config" else None,
                         load_fail_rank=startup[1] if startup[0] == "load" else None,
                         bad_fingerprint_rank=startup[1] if startup[0] == "fingerprint" else None)
        if from_serving:
            self.c.run_until_serving()
            self.c.run_chunks(chunks)

    @property
    def cluster(self) -> Cluster:
        assert self.c is not None
        return self.c

    # -- progress: any enabled rank, in any order -----------------------------------------------------
    @rule(n=st.integers(1, 24), seed=st.integers(0, 2**16))
    @_tracked
    def steps(self, n: int, seed: int) -> None:
        """``n`` steps of enabled ranks, each picked by a cheap PRNG seeded by Hypothesis (one draw, not n);
        when none is enabled, time jumps to the next timer."""
        rng = random.Random(seed)
        c = self.cluster
        for _ in range(n):
            if c.step(rng.randrange(1 << 16)) is None and (c.job.all_exited() or not c.jump()):
                break

    @rule(dt=st.sampled_from(TICKS))
    @_tracked
    def tick(self, dt: float) -> None:
        self.cluster.tick(dt)

    # -- what users and faults do, between any two steps -----------------------------------------------
    @rule(what=st.sampled_from(EVENTS), data=st.data())
    @_tracked
    def event(self, what: str, data: st.DataObject) -> None:
        c = self.cluster

        def rank() -> int:
            return data.draw(st.integers(0, len(c.procs) - 1), label="rank")

        if what == "cut":
            c.hard_cut()
        elif what == "prompt":
            c.prompt(data.draw(st.sampled_from(["a red fox", "a calm sea at dawn", "city lights"]), label="prompt"))
        elif what == "stop":
            c.stop()
        elif what == "signal_front":
            c.signal(c.front.rank)
        elif what == "signal":
            c.signal(rank())
        elif what == "signal_all":
            for p in c.procs:
                c.signal(p.rank)
        elif what == "kill" and c.kills < 2:
            c.kills += 1
            c.kill(rank())
        elif what == "stall":
            c.stall(rank(), data.draw(st.sampled_from(STALLS), label="seconds"))
        elif what in ("corrupt_envelope", "unserialisable", "bad_dtype"):
            c.corrupt(what)
        elif what == "garble":
            c.garble(rank())
        elif what == "slow":
            c.slow(data.draw(st.sampled_from([p.rank for p in c.mesh]), label="mesh rank"),
                   data.draw(st.sampled_from(SLOW), label="seconds"))
        elif what.startswith("generator_"):
            c.generator_fault(data.draw(st.sampled_from([p.rank for p in c.mesh]), label="mesh rank"),
                              what.removeprefix("generator_"))

    # -- invariants -----------------------------------------------------------------------------------
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
            hypothesis_event(f"front exit {c.front.code}")
            hypothesis_event(f"chunks shown: {min(len(c.ledger.shown), 5)}+")
            for f in {f.split(' ')[0] for f in c.faults}:
                hypothesis_event(f"fault: {f}")
            if c.ledger.retries:
                hypothesis_event("retried")
            if any(e > 0 for e, _ in c.ledger.shown):
                hypothesis_event("shown after a hard cut")
            if c.engine is not None and c.engine.machine.chunk.stats.discarded_stale:
                hypothesis_event("stale result discarded")


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
