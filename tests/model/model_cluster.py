"""An in-memory cluster of every rank's real protocol machines, for the model test.

One object per rank (``Proc``) holds that rank's lifecycle machine and, once it serves, its role
machines: the front's ``ChunkMachine``, the leader's ``LeaderRelayMachine``, a worker's ``WorkerLoopMachine``
(pure TP: rank 0 holds the lifecycle ``tp_rank0``, the relay and the chunk machine). The transport
is per-channel FIFO queues, like the real PP pair and TP channels. Collectives (parity, vote,
fingerprint, barrier, warm channels) complete when every participant has joined, and fail on the
waiting ranks when a participant is gone (gloo: "connection closed by peer"). The generator's
all-reduces are one step (``mesh compute``) that needs every mesh rank to run the same call.

Time is virtual (``now``); nothing ever sleeps. ``enabled()`` lists every atomic step that could
happen next (a delivery, a timer that fired, a rank's next move); the model test picks any of them,
in any order, and injects faults between steps. Every step checks its invariants as it goes
(``ModelViolation``); ``settle()`` drives the cluster to its end and checks the end state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pp1.fsm.chunk import ChunkMachine, ChunkPlan, Decision, Verdict, envelope_from_plan, recompute_due
from pp1.fsm.intents import Exit, Intent, RecvTensors, RunShard, SendReady, SendResult, SendTP
from pp1.fsm.leader import LeaderRelayMachine, expected_calls
from pp1.fsm.lifecycle import LifecycleMachine, make_lifecycle, role_of
from pp1.fsm.worker import WorkerLoopMachine
from pp1.protocol.config import RunConfig, parity_report
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import (
    T_CONDITIONING,
    T_CONTEXT,
    T_NOISE,
    Action,
    PPEnvelopeV1,
    PPResultV1,
    ReadyV1,
    TPHeaderV1,
)
from pp1.protocol.tensors import TensorSpec

GEOMETRY = ChunkGeometry(latent_channels=2, latent_frames=2, latent_height=2, latent_width=2, text_len=2,
                         text_dim=4, max_context_frames=4)
TIMESTEPS = (1000, 750, 500, 250)
H = 1.0  # heartbeat
W = 5.0  # watchdog (> 3 H)
FLOOR = 30.0  # result deadline floor

# collective -> who takes part ("world" or "mesh"), in lifecycle order
COLLECTIVES = {"parity": "world", "vote": "world", "fingerprint": "mesh", "barrier": "world", "warm": "world"}


class ModelViolation(AssertionError):
    """An invariant of the protocol does not hold."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise ModelViolation(what)


@dataclass(frozen=True)
class Garbage:
    """An undecodable frame on the PP channel (a corrupt envelope the codec cannot parse)."""

    call_id: int


@dataclass
class Proc:
    rank: int
    role: str  # front | leader | worker | tp_rank0
    life: LifecycleMachine
    config: dict[str, Any]
    alive: bool = True
    exit_code: int | None = None
    collective: str | None = None  # the collective this rank is blocked in
    vote: int = 1
    relay: LeaderRelayMachine | None = None
    worker: WorkerLoopMachine | None = None
    chunk: ChunkMachine | None = None
    shard: TPHeaderV1 | None = None  # the call its shard runs, waiting for the mesh's collectives


Step = tuple[str, Callable[[], None]]


@dataclass
class Ledger:
    """What the model expects, kept apart from the machines so it can check them."""

    epoch: int = 0  # hard cuts + retries so far
    index: int = 0  # chunk_index of the epoch's next chunk
    last_call_id: int = -1
    sent: list[tuple[int, str]] = field(default_factory=list)  # (call_id, action) the front sent
    answered: int = 0
    emitted: list[tuple[int, int]] = field(default_factory=list)  # (epoch, chunk_index)
    recomputes: int = 0
    retries: int = 0
    failures_in_a_row: int = 0  # failed results (ok=False) since the last emitted chunk
    farewell: bool = False


class Cluster:
    """``topology``: "pp1" (front rank 0 + mesh ranks 1..M) or "tp" (mesh ranks 0..M-1, rank 0 is
    leader + front). Startup faults are chosen at construction: ``bad_config_rank`` (differs at
    parity), ``load_fail_rank`` (its load fails)."""

    def __init__(self, topology: str, mesh_size: int, *, recompute_every: int = 1, warmup_chunks: int = 1,
                 bad_config_rank: int | None = None, load_fail_rank: int | None = None) -> None:
        self.topology = topology
        self.now = 0.0
        if topology == "pp1":
            front_rank: int | None = 0
            mesh = tuple(range(1, 1 + mesh_size))
        else:
            front_rank, mesh = None, tuple(range(mesh_size))
        world = len(mesh) + (1 if front_rank is not None else 0)
        self.cfg = RunConfig(topology=topology, world_size=world, mesh_global_ranks=mesh,  # type: ignore[arg-type]
                             recompute_every=recompute_every, warmup_chunks=warmup_chunks,
                             heartbeat_s=H, watchdog_s=W, deadline_floor_s=FLOOR)
        base = self.cfg.model_dump(mode="json")
        self.base_config = base
        self.procs: list[Proc] = []
        for r in range(world):
            cfg = dict(base)
            if r == bad_config_rank:
                cfg["dtype"] = "bfloat16"
            self.procs.append(Proc(r, role_of(r, mesh, front_rank), make_lifecycle(role_of(r, mesh, front_rank), r),
                                   cfg))
        self.front = self.procs[0]  # the front, or tp_rank0
        self.leader = self.procs[mesh[0]]
        self.mesh = [self.procs[r] for r in mesh]
        self.workers = self.mesh[1:]
        self.participants = {name: [p.rank for p in (self.procs if who == "world" else self.mesh)]
                             for name, who in COLLECTIVES.items()}
        self.load_fail_rank = load_fail_rank
        self.q: dict[str, deque[Any]] = {"pp_down": deque(), "pp_up": deque()}
        for w in self.workers:
            self.q[f"tp{w.rank}"] = deque()
        self.streaming = True
        self.faults: list[str] = []
        if bad_config_rank is not None:
            self.faults.append(f"config mismatch on rank {bad_config_rank}")
        if load_fail_rank is not None:
            self.faults.append(f"load fails on rank {load_fail_rank}")
        self.corrupt_next: str | None = None  # "invalid" | "ids" | "garbage": the next envelope the front sends
        self.chunk_fault: str | None = None  # "recoverable" | "tripwire": the next INFER the mesh runs
        self.ledger = Ledger()
        self.trace: list[str] = []

    # == faults (the model test's rules) ============================================================
    def kill(self, rank: int) -> None:
        p = self.procs[rank]
        if p.alive:
            self.faults.append(f"kill rank {rank} in {p.life.state}")
            self._exit(p, -9)

    def sigterm(self) -> None:
        """SIGTERM / Ctrl-C on the front (tp: rank 0), in whatever state it is."""
        p = self.front
        if not p.alive:
            return
        self.trace.append(f"sigterm front in {p.life.state}")
        if p.life.state == "serving":
            p.life.fire("drain")
        if p.life.state == "draining":
            assert p.chunk is not None
            if not p.chunk.is_terminal:
                p.chunk.request_stop()
            return
        self.faults.append(f"sigterm during startup ({p.life.state})")
        self._fail(p, f"SIGTERM during {p.life.state}", "local")

    def hard_cut(self) -> None:
        c = self.front.chunk
        if self.front.alive and c is not None and c.can_fire("cut"):
            c.hard_cut("prompt reset (model)")
            self.ledger.epoch += 1
            self.ledger.index = 0

    def tick(self, dt: float) -> None:
        """Time passes. Jumping past a deadline or a watchdog before the ranks could act is a stall
        (a fault: a rank that did not get the CPU in time)."""
        self.now += dt
        if any(t <= self.now for t in self.failure_timers()):
            self.faults.append(f"stall: t={self.now} passed a deadline or a watchdog")

    # == the steps ==================================================================================
    def enabled(self) -> list[Step]:
        out: list[Step] = []
        for p in self.procs:
            if p.alive:
                self._steps_of(p, out)
        lead = self.leader
        if lead.alive and lead.shard is not None and all(w.alive and w.shard is not None for w in self.workers):
            out.append(("mesh compute", self._mesh_compute))
        return out

    def failure_timers(self) -> list[float]:
        """Deadlines and watchdogs: when they pass, a rank fails."""
        out: list[float] = []
        c = self.front.chunk
        if self.front.alive and c is not None and c.deadline_at() is not None:
            out.append(c.deadline_at())  # type: ignore[arg-type]
        for p in self.mesh:
            for m in (p.relay, p.worker):
                if p.alive and m is not None and math.isfinite(m.watchdog_deadline()):
                    out.append(m.watchdog_deadline())
        return out

    def timers(self) -> list[float]:
        """When something will happen by itself (deadlines, watchdogs, heartbeats)."""
        out: list[float] = []
        f = self.front
        if f.alive and f.chunk is not None:
            at = f.chunk.deadline_at()
            if at is not None:
                out.append(at)
            if f.chunk.state == "idle":
                out.append((f.chunk.last_activity or self.now) + H)
        for p in self.mesh:
            if p.alive and p.relay is not None and math.isfinite(p.relay.watchdog_deadline()):
                out.append(p.relay.watchdog_deadline())
            if p.alive and p.worker is not None and math.isfinite(p.worker.watchdog_deadline()):
                out.append(p.worker.watchdog_deadline())
        return out

    def all_terminal(self) -> bool:
        return not any(p.alive for p in self.procs)

    def step(self, choice: int) -> str | None:
        steps = self.enabled()
        if not steps:
            return None
        name, fn = steps[choice % len(steps)]
        self.trace.append(name)
        fn()
        return name

    def do(self, name: str) -> None:
        """Take the enabled step called ``name`` (for scripted scenarios); error when it is not enabled."""
        for label, fn in self.enabled():
            if label == name:
                self.trace.append(label)
                fn()
                return
        raise ModelViolation(f"step {name!r} is not enabled: {[n for n, _ in self.enabled()]}")

    def check_progress(self) -> None:
        """No reachable deadlock: some rank can move, a timer will fire, or every rank is done."""
        if self.all_terminal() or self.enabled():
            return
        check(bool(self.timers()), f"deadlock: nothing can move and no timer is armed: {self.describe()}")

    def check_front_deadline(self) -> None:
        """The front never waits for a result without a deadline."""
        c = self.front.chunk
        if self.front.alive and c is not None and c.waiting:
            at = c.deadline_at()
            check(at is not None and math.isfinite(at), f"front waits without a deadline in {c.state}")

    def run_until_serving(self, max_steps: int = 4000) -> None:
        """Take the first enabled step (jumping to the next timer when none) until the front serves,
        or has exited."""
        for _ in range(max_steps):
            if self.all_terminal() or not self.front.alive or self.front.life.state in ("serving", "draining"):
                return
            self.check_progress()
            if not self.step(0):
                self.now = max(self.now, min(self.timers()))
        raise ModelViolation(f"startup did not end after {max_steps} steps: {self.describe()}")

    def run_chunks(self, n: int, max_steps: int = 4000) -> None:
        """Stream until ``n`` more chunks were emitted (first enabled step), or the front stops serving."""
        want = len(self.ledger.emitted) + n
        for _ in range(max_steps):
            if len(self.ledger.emitted) >= want or not self.front.alive or self.front.life.state != "serving":
                return
            if not self.step(0):
                return

    def settle(self, max_steps: int = 4000) -> None:
        """Drive the cluster to its end: to serving (or failure), then SIGTERM on the front, then
        until every rank has exited (first enabled step; the next timer when none). Checks the end."""
        self.streaming = False
        self.run_until_serving(max_steps)
        self.sigterm()
        for _ in range(max_steps):
            if self.all_terminal():
                break
            self.check_progress()
            if not self.step(0):
                self.now = max(self.now, min(self.timers()))
        else:
            raise ModelViolation(f"shutdown did not end after {max_steps} steps: {self.describe()}")
        self.check_end()

    def check_end(self) -> None:
        check(self.all_terminal(), f"live ranks left: {self.describe()}")
        led = self.ledger
        if self.front.exit_code == 0:
            check(led.answered == len(led.sent), f"front exited 0 with {len(led.sent) - led.answered} unanswered")
        if not self.faults:
            codes = [p.exit_code for p in self.procs]
            check(all(c == 0 for c in codes), f"no fault injected, yet exit codes {codes}: {self.describe()}")

    def describe(self) -> str:
        parts = []
        for p in self.procs:
            sub = p.chunk or p.relay or p.worker
            parts.append(f"r{p.rank}:{p.role}:{p.life.state}" + (f"/{sub.state}" if sub else "")
                         + ("" if p.alive else f"(exit {p.exit_code})") + (f"[in {p.collective}]" if p.collective else ""))
        queues = {k: len(v) for k, v in self.q.items() if v}
        return f"t={self.now} {' '.join(parts)} queues={queues} faults={self.faults} trace[-12:]={self.trace[-12:]}"

    # == per-rank steps =============================================================================
    def _steps_of(self, p: Proc, out: list[Step]) -> None:
        st = p.life.state
        if st == "init":
            out.append((f"r{p.rank} start", lambda: self._start(p)))
            return
        if p.collective is not None:
            name = p.collective
            parts = [self.procs[r] for r in self.participants[name]]
            if all(q.alive and q.collective == name for q in parts):
                if p is parts[0]:
                    out.append((f"complete {name}", lambda: self._complete(name)))
            elif any(not q.alive for q in parts):
                out.append((f"r{p.rank} {name} peer gone", lambda: self._fail(p, f"peer gone in {name}", "remote")))
            return
        if st == "loading":
            out.append((f"r{p.rank} load", lambda: self._load(p)))
            return
        if p.role in ("front", "tp_rank0"):
            self._front_steps(p, out)
        if p.role in ("leader", "tp_rank0") and p.relay is not None:
            self._leader_steps(p, out)
        if p.role == "worker" and p.worker is not None:
            self._worker_steps(p, out)
        if p.shard is not None:
            peers = [q for q in self.mesh if q is not p]
            if any(not q.alive for q in peers):
                out.append((f"r{p.rank} collective error", lambda: self._shard_error(p)))

    # -- startup ------------------------------------------------------------------------------------
    def _start(self, p: Proc) -> None:
        p.life.fire("start")
        p.collective = "parity"

    def _load(self, p: Proc) -> None:
        ok = p.rank != self.load_fail_rank
        p.vote = p.life.on_loaded(ok, "" if ok else "model load failed (injected)")
        p.collective = "vote"

    def _complete(self, name: str) -> None:
        parts = [self.procs[r] for r in self.participants[name]]
        for p in parts:
            p.collective = None
        if name == "parity":
            report = parity_report([p.config for p in parts])
            for p in parts:
                if report:
                    mine = p.config != self.base_config
                    self._fail(p, "parity: " + "; ".join(report), "local" if mine else "remote")
                else:
                    p.life.fire("parity_ok")
        elif name == "vote":
            vote = min(p.vote for p in parts)
            detail = ", ".join(f"rank {p.rank}" for p in parts if p.vote == 0)
            for p in parts:
                p.life.on_vote(vote, detail)
                if p.life.is_terminal:
                    self._exit(p, 1)
                else:
                    p.collective = "fingerprint" if p.life.state == "fingerprint" else "barrier"
        elif name == "fingerprint":
            for p in parts:
                p.life.fire("fingerprint_ok")
                p.collective = "barrier"
        elif name == "barrier":
            for p in parts:
                p.life.fire("barrier_done")
                p.collective = "warm"
        elif name == "warm":
            for p in parts:
                p.life.fire("channels_warm")
            for p in parts:  # warmup: the leader drives it; workers loop; the front waits for READY
                if p.role == "worker":
                    p.worker = WorkerLoopMachine(p.rank, watchdog_s=W, now=self.now, heartbeat_s=H, geometry=GEOMETRY)
            for p in parts:
                if p.role in ("leader", "tp_rank0"):
                    p.relay = LeaderRelayMachine(
                        p.rank, GEOMETRY, len(self.mesh), timesteps=TIMESTEPS, warmup_chunks=self.cfg.warmup_chunks,
                        recompute_every=self.cfg.recompute_every, fingerprint="fp",
                        watchdog_s=W if p.role == "leader" else None, now=self.now)
                    self._leader_do(p, p.relay.start_warmup())

    # -- the front ----------------------------------------------------------------------------------
    def _front_steps(self, p: Proc, out: list[Step]) -> None:
        up = self.q["pp_up"]
        if p.life.state == "warmup" and p.role == "front":
            if up:
                out.append(("front recv READY", lambda: self._front_ready(p)))
            elif not self.leader.alive:
                out.append(("front leader gone", lambda: self._fail(p, "leader gone before READY", "remote")))
            return
        c = p.chunk
        if c is None or c.is_terminal:
            return
        if c.state == "idle":
            if self.streaming and p.life.state == "serving":
                out.append(("front submit", lambda: self._front_send(p, "infer")))
            if c.noop_due(self.now):
                out.append(("front noop", lambda: self._front_send(p, "noop")))
        elif c.state == "closing":
            out.append(("front shutdown", lambda: self._front_send(p, "shutdown")))
        if c.waiting:
            if up:
                out.append(("front recv", lambda: self._front_recv(p)))
            elif not self.leader.alive:
                out.append(("front leader gone", lambda: self._front_decide(p, c.poison("leader gone"))))
            due = c.deadline_at()
            if due is not None and self.now >= due:
                out.append(("front deadline", lambda: self._front_deadline(p)))

    def _new_chunk_machine(self, p: Proc) -> None:
        p.chunk = ChunkMachine(
            p.rank, chunk_frames=GEOMETRY.latent_frames, window=GEOMETRY.max_context_frames, timesteps=TIMESTEPS,
            recompute_every=self.cfg.recompute_every, heartbeat_s=H, deadline_floor_s=FLOOR,
            deadline_factor=self.cfg.deadline_factor)

    def _front_ready(self, p: Proc) -> None:
        msg = self.q["pp_up"].popleft()
        check(isinstance(msg, ReadyV1), f"front expected READY first, got {msg!r}")
        p.life.fire("warmup_done")
        self._new_chunk_machine(p)

    def _front_send(self, p: Proc, what: str) -> None:
        c = p.chunk
        assert c is not None
        led = self.ledger
        if what == "infer":
            plan = c.plan_next(self.now)
            self._check_schedule(plan)
            specs = chunk_specs(plan)
        else:
            plan = c.plan_noop(self.now) if what == "noop" else c.plan_shutdown()
            specs = ()
        env = envelope_from_plan(plan, specs)
        check(plan.call_id > led.last_call_id, f"call_id {plan.call_id} after {led.last_call_id}")
        check(len(led.sent) == led.answered, f"overlap depth 1: {len(led.sent) - led.answered} unanswered")
        led.last_call_id = plan.call_id
        msg: PPEnvelopeV1 | Garbage = env
        if self.corrupt_next == "invalid":  # breaks a rule the leader checks: answered ok=False, never relayed
            bad = {"expected_generator_calls": env.expected_generator_calls + 1} if plan.action is Action.INFER \
                else {"num_denoising_steps": 1}
            msg = env.model_copy(update=bad)
            self.faults.append(f"invalid envelope call_id={plan.call_id}")
        elif self.corrupt_next == "ids":  # valid-looking but altered ids: relayed; the front's tripwire fires
            msg = env.model_copy(update={"chunk_index": env.chunk_index + 1, "init_cache": False,
                                         "reset_cache": False})
            self.faults.append(f"altered ids call_id={plan.call_id}")
        elif self.corrupt_next == "garbage":
            msg = Garbage(plan.call_id)
            self.faults.append(f"garbage frame call_id={plan.call_id}")
        self.corrupt_next = None
        if not self._send(p, self.leader, "pp_down", msg):
            self._front_decide(p, c.poison("send failed: leader gone"))
            return
        c.on_sent(self.now)
        led.sent.append((plan.call_id, plan.action.value))

    def _check_schedule(self, plan: ChunkPlan) -> None:
        led = self.ledger
        k = self.cfg.recompute_every
        check(plan.cache_epoch == led.epoch, f"plan epoch {plan.cache_epoch} != model epoch {led.epoch}")
        check(plan.chunk_index == led.index, f"plan chunk_index {plan.chunk_index} != model {led.index}")
        due = k > 0 and led.index > 0 and led.index % k == 0
        check(plan.do_kv_recompute == due, f"recompute {plan.do_kv_recompute} at chunk {led.index} with K={k}")
        check(plan.do_kv_recompute == recompute_due(plan.chunk_index, k), "schedule helper disagrees")
        if due:
            want = min(led.index * GEOMETRY.latent_frames, GEOMETRY.max_context_frames)
            check(plan.context_frames == want, f"context frames {plan.context_frames} != {want}")
        check(plan.init_cache == (led.index == 0), "init_cache only on the first chunk of an epoch")

    def _front_recv(self, p: Proc) -> None:
        msg = self.q["pp_up"].popleft()
        check(isinstance(msg, PPResultV1), f"front expected a result, got {msg!r}")
        c = p.chunk
        assert c is not None
        self.ledger.answered += 1
        self._front_decide(p, c.on_result(msg, self.now))

    def _front_deadline(self, p: Proc) -> None:
        assert p.chunk is not None
        self.faults.append(f"result deadline missed at t={self.now}")
        self._front_decide(p, p.chunk.on_deadline_missed(self.now))

    def _front_decide(self, p: Proc, d: Decision) -> None:
        led = self.ledger
        if d.verdict is Verdict.EMIT:
            check(d.cache_epoch == led.epoch, f"stale emit: epoch {d.cache_epoch}, model epoch {led.epoch}")
            check(d.chunk_index == led.index, f"emit chunk {d.chunk_index}, model expects {led.index}")
            led.emitted.append((d.cache_epoch, d.chunk_index))
            led.index += 1
            led.failures_in_a_row = 0
        elif d.verdict is Verdict.DISCARD_STALE:
            check(d.cache_epoch < led.epoch, "discarded a current-epoch result")
        elif d.verdict is Verdict.RETRY:
            led.failures_in_a_row += 1
            check(led.failures_in_a_row == 1, "retried after a second failure in a row (retry once, then fail)")
            led.epoch += 1
            led.index = 0
            led.retries += 1
        elif d.verdict is Verdict.STOPPED:
            p.life.fire("drained")
            self._exit(p, 0)
        elif d.verdict is Verdict.FAIL:
            assert d.cause is not None
            check(bool(self.faults), f"front failed without a fault: {d.cause}")
            self._fail(p, str(d.cause), d.cause.kind)

    # -- the leader (and tp rank 0's in-process relay) ----------------------------------------------
    def _leader_steps(self, p: Proc, out: list[Step]) -> None:
        relay = p.relay
        assert relay is not None
        if relay.state != "idle":
            return
        if self.q["pp_down"]:
            out.append(("leader recv", lambda: self._leader_recv(p)))
        elif not self.front.alive:
            out.append(("leader front gone", lambda: self._leader_do(p, relay.on_fatal("front gone"))))
        if self.now >= relay.watchdog_deadline():
            out.append(("leader watchdog", lambda: self._leader_do(p, relay.on_tick(self.now))))

    def _leader_recv(self, p: Proc) -> None:
        assert p.relay is not None
        msg = self.q["pp_down"].popleft()
        if isinstance(msg, Garbage):
            self._leader_do(p, p.relay.on_fatal(f"undecodable frame (call_id {msg.call_id})"))
        else:
            self._leader_do(p, p.relay.on_envelope(msg, self.now))

    def _leader_do(self, p: Proc, intents: list[Intent]) -> None:
        """Perform the relay's intents in order (an adapter's job)."""
        relay = p.relay
        assert relay is not None
        for it in intents:
            if not p.alive:
                return
            if isinstance(it, RecvTensors):
                continue
            if isinstance(it, SendTP):
                for w in self.workers:
                    if not self._send(p, w, f"tp{w.rank}", it.header):
                        self._leader_do(p, relay.on_fatal(f"send to rank {w.rank} failed: peer gone"))
                        return
            elif isinstance(it, RunShard):
                p.shard = it.header
            elif isinstance(it, SendResult):
                if not self._send(p, self.front, "pp_up", it.result):
                    self._leader_do(p, relay.on_fatal("send to the front failed: peer gone"))
                    return
                if not relay.is_terminal:
                    self._leader_do(p, relay.on_result_sent(self.now))
            elif isinstance(it, SendReady):
                if p.role == "leader" and not self._send(p, self.front, "pp_up", it.ready):
                    self._leader_do(p, relay.on_fatal("send READY failed: front gone"))
                    return
                p.life.fire("warmup_done")
                if p.role == "tp_rank0":
                    self._new_chunk_machine(p)
            elif isinstance(it, Exit):
                if p.role == "tp_rank0" and it.code == 0:
                    continue  # the front half of rank 0 finishes the SHUTDOWN round
                if it.code == 0:
                    p.life.fire("shutdown_received")
                    self._exit(p, 0)
                else:
                    kind = relay.failure.kind if relay.failure else "local"
                    self._fail(p, it.reason, kind, code=it.code)
            else:  # pragma: no cover
                raise ModelViolation(f"unknown intent {it!r}")

    def _mesh_compute(self) -> None:
        """Every mesh rank runs the same call; the all-reduces complete; each reports back."""
        lead = self.leader
        assert lead.shard is not None and lead.relay is not None
        h = lead.shard
        for w in self.workers:
            assert w.shard is not None and w.worker is not None
            check((w.shard.action, w.shard.call_id) == (h.action, h.call_id),
                  f"mesh out of step: leader runs {h.action.value} {h.call_id}, rank {w.rank} runs "
                  f"{w.shard.action.value} {w.shard.call_id}")
        fault = self.chunk_fault if h.action is Action.INFER else None
        self.chunk_fault = None if fault else self.chunk_fault
        for p in self.mesh:
            p.shard = None
        for w in self.workers:
            assert w.worker is not None
            w.worker.on_shard_done(self.now)
        calls = expected_calls(h)
        if fault == "recoverable":
            self.faults.append(f"generator failed (recoverable) call_id={h.call_id}")
            self._leader_do(lead, lead.relay.on_shard_failed("injected", recoverable=True))
        else:
            if fault == "tripwire":
                self.faults.append(f"generator call count off call_id={h.call_id}")
                calls += 1
            if h.do_kv_recompute and h.action is Action.INFER:
                self.ledger.recomputes += 1
            self._leader_do(lead, lead.relay.on_shard_done(calls, 0, {"total": 1.0}, self.now))

    def _shard_error(self, p: Proc) -> None:
        """A mesh peer is gone while this rank's shard runs: its collective fails."""
        p.shard = None
        if p.relay is not None:
            self._leader_do(p, p.relay.on_shard_failed("all_reduce failed: mesh peer gone"))
        else:
            assert p.worker is not None
            self._worker_do(p, p.worker.on_shard_failed("all_reduce failed: mesh peer gone"))

    # -- a worker -----------------------------------------------------------------------------------
    def _worker_steps(self, p: Proc, out: list[Step]) -> None:
        wl = p.worker
        assert wl is not None
        if wl.state != "waiting":
            return
        inbox = self.q[f"tp{p.rank}"]
        if inbox:
            out.append((f"r{p.rank} recv", lambda: self._worker_recv(p)))
        elif not self.leader.alive:
            out.append((f"r{p.rank} leader gone", lambda: self._fail(p, "leader gone", "remote")))
        if self.now >= wl.watchdog_deadline():
            out.append((f"r{p.rank} watchdog", lambda: self._worker_do(p, wl.on_tick(self.now))))

    def _worker_recv(self, p: Proc) -> None:
        assert p.worker is not None
        h: TPHeaderV1 = self.q[f"tp{p.rank}"].popleft()
        if p.life.state == "warmup" and h.action is not Action.WARMUP:
            p.life.fire("warmup_done")
        self._worker_do(p, p.worker.on_header(h, self.now))

    def _worker_do(self, p: Proc, intents: list[Intent]) -> None:
        for it in intents:
            if isinstance(it, RunShard):
                p.shard = it.header
            elif isinstance(it, Exit):
                if it.code == 0:
                    p.life.fire("shutdown_received")
                    self._exit(p, 0)
                else:
                    wl = p.worker
                    kind = wl.failure.kind if wl is not None and wl.failure else "local"
                    self._fail(p, it.reason, kind, code=it.code)

    # -- transport and exits ------------------------------------------------------------------------
    def _send(self, src: Proc, dst: Proc, channel: str, msg: Any) -> bool:
        """Queue ``msg``; False when the peer is gone (a gloo send to a dead peer fails fast).
        Under pure TP the PP "channel" is in-process and cannot break."""
        if dst is not src and not dst.alive:
            return False
        self.q[channel].append(msg)
        return True

    def _fail(self, p: Proc, reason: str, kind: Any, code: int = 1) -> None:
        if not p.life.is_terminal:
            p.life.fail_with(reason, kind)
        c = p.chunk
        if c is not None and not c.is_terminal:
            c.fail_with(f"rank failed: {reason}", kind)
        if c is not None and p.role == "front" and self.leader.alive:
            plan = c.farewell_plan()  # best-effort SHUTDOWN when the channel is not poisoned
            if plan is not None:
                self.ledger.farewell = True
                check(plan.call_id > self.ledger.last_call_id, "farewell call_id not increasing")
                self.ledger.last_call_id = plan.call_id
                self._send(p, self.leader, "pp_down", envelope_from_plan(plan))
        self._exit(p, code)

    def _exit(self, p: Proc, code: int) -> None:
        p.alive = False
        p.collective = None
        p.exit_code = code
        self.trace.append(f"r{p.rank} exit {code}")


def chunk_specs(plan: ChunkPlan, g: ChunkGeometry = GEOMETRY) -> tuple[TensorSpec, ...]:
    """The tensors the engine announces for an INFER plan (what it builds from the plan)."""
    specs = [TensorSpec(name=T_CONDITIONING, dtype=g.dtype, shape=g.conditioning_shape()),
             TensorSpec(name=T_NOISE, dtype=g.dtype, shape=g.noise_shape())]
    if plan.do_kv_recompute:
        specs.append(TensorSpec(name=T_CONTEXT, dtype=g.dtype, shape=g.context_shape(plan.context_frames)))
    return tuple(specs)
