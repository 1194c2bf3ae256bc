"""The model's view of a whole job: every rank's REAL machines and executors over the in-memory transport
(``pp1.testing.memory.MemoryJob``), plus what the model expects of them (the ledger) and checks.

The model does not interpret the machines: it steps ranks' executors (any enabled rank, in any order),
moves the virtual clock, injects faults between steps, and watches what crosses the transport (envelopes,
results, waits, exits), what the front shows and the chunk machine's transitions. Checks that fail raise
:class:`ModelViolation` (inside the step that broke the rule, or at the end).

Time (the fairness rule): computing and delivering take no virtual time. The clock moves only when no rank
can move, and then at most to the next timer (a bound, a heartbeat, a stall's end, a drain's bound). So a
bounded wait runs out only when something went wrong: a missed deadline (or watchdog) is a violation unless
a fault that can cause it was injected (a rank killed, stalled, failed by a signal or its generator, a
frame lost). Slowness is a fault: a stalled rank does not move for a while (its peers' time passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pp1.adapters.rank.faults import Fault
from pp1.fsm.intents import AwaitReady, AwaitResult, Idle
from pp1.fsm.lifecycle import MESH_DRAIN_S
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, TPHeaderV1
from pp1.testing.memory import GEOMETRY, TIMESTEPS, MemoryJob
from pp1.testing.standin import StandinStage0

H = 1.0  # heartbeat
W = 5.0  # watchdog (> 3 H)
FLOOR = 30.0  # result deadline floor
FACTOR = 4.0  # deadline factor
# The spec's rules, written here on purpose (not imported): the model checks the machines against them.
P99_SAMPLES = 200  # the rolling p99 of the result deadline covers the last 200 INFER round trips (pp1.md §5)
T = GEOMETRY.latent_frames
EPS = 1e-3
EXIT_BOUND_S = 700.0  # every rank is gone this long after the front exited (generous: no unbounded wait)

STAGE0 = StandinStage0(GEOMETRY, torch.device("cpu"), torch.float32)  # to encode prompt changes off the engine


class ModelViolation(AssertionError):
    """An invariant of the protocol does not hold."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise ModelViolation(what)


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile (0 for none)."""
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def due(chunk_index: int, every: int) -> bool:
    return every > 0 and chunk_index > 0 and chunk_index % every == 0


@dataclass
class Ledger:
    """What the model expects, kept apart from the machines so it can check them."""

    epoch: int = 0  # hard cuts + retries applied so far
    index: int = 0  # chunk_index of the epoch's next chunk
    last_call_id: int = -1
    sent: int = 0  # envelopes the front sent
    received: int = 0  # results the front received
    sent_at: dict[int, float] = field(default_factory=dict)
    last_sent: PPEnvelopeV1 | None = None
    samples: list[float] = field(default_factory=list)  # INFER round trips (the deadline's p99)
    accepted: list[tuple[int, int]] = field(default_factory=list)  # (epoch, chunk_index)
    shown: list[tuple[int, int]] = field(default_factory=list)
    recomputes: int = 0
    retries: int = 0
    failures_in_a_row: int = 0
    conditioning: dict[int, torch.Tensor] = field(default_factory=dict)  # epoch -> its conditioning
    cut_after_call: int | None = None  # a cut was posted: every INFER planned after this call_id is of a new epoch
    cut_from_epoch: int = 0
    farewell: bool = False
    stale: int = 0  # results of an older epoch received (discarded)
    last_activity: float | None = None  # the front's last send or result


class Cluster:
    """``topology``: "pp1" (front rank 0 + mesh ranks 1..M) or "tp" (mesh ranks 0..M-1, rank 0 is leader and
    front). Startup faults are chosen at construction: ``bad_config_rank`` (differs at parity),
    ``load_fail_rank`` (its load fails), ``bad_fingerprint_rank`` (a mesh rank's shard differs).
    ``chunks``/``then``: a headless front (None: serve until stopped). ``tempo``: compute seconds of the leader's
    first serving calls (each below the deadline floor: not a fault), so that the deadline's p99 moves.
    ``window``: the attention window (latent frames; 3 a chunk): below a chunk, a re-encode recompute needs the
    chunk not decoded yet (decode first)."""

    def __init__(self, topology: str, mesh_size: int, *, recompute_every: int = 1, warmup_chunks: int = 1,
                 context_source: str = "latents", chunks: int | None = None, after_chunks: str = "shutdown",
                 bad_config_rank: int | None = None, load_fail_rank: int | None = None,
                 bad_fingerprint_rank: int | None = None, tempo: tuple[float, ...] = (), window: int = 6) -> None:
        world = mesh_size + (1 if topology == "pp1" else 0)
        if world == 1:  # nothing to compare with: no fault
            bad_config_rank = None
        if mesh_size == 1:
            bad_fingerprint_rank = None
        self.topology = topology
        self.K = recompute_every
        self.window = window
        self.source = context_source
        self.job = MemoryJob(topology, mesh_size, bad_config_rank=bad_config_rank, load_fail_rank=load_fail_rank,
                             bad_fingerprint_rank=bad_fingerprint_rank,
                             options=dict(chunks=chunks, after_chunks=after_chunks), window=window,
                             recompute_every=recompute_every, warmup_chunks=warmup_chunks,
                             context_source=context_source, heartbeat_s=H, watchdog_s=W, deadline_floor_s=FLOOR,
                             deadline_factor=FACTOR)
        self.procs = self.job.ranks
        self.front = self.job.front
        self.leader = self.job.leader
        self.mesh = self.job.mesh
        self.faults: list[str] = []  # every fault injected (the "no fault -> all exit 0" rule)
        self.timing: list[str] = []  # faults that may make a bounded wait run out
        self.trace: list[str] = []
        self.startup_fault: str | None = None  # what every rank's failure must say when it is the only fault
        self.blamed: dict[int, str] = {}  # rank -> the kind its failure must have (a config or load fault)
        for r in range(len(self.procs)):
            if bad_config_rank is not None:  # parity compares with rank 0's config: local where it differs
                self.blamed[r] = "local" if (r == bad_config_rank) != (bad_config_rank == 0) else "remote"
            elif load_fail_rank is not None:
                self.blamed[r] = "local" if r == load_fail_rank else "remote"
        for what, rank, says in (("config mismatch", bad_config_rank, "parity"), ("load fails", load_fail_rank, "load"),
                                 ("fingerprint differs", bad_fingerprint_rank, "fingerprints differ")):
            if rank is not None:
                self._fault(f"{what} on rank {rank}", timing=True)
                self.startup_fault = says
        self.ledger = Ledger()
        self.kills = 0
        self.corrupt_chunks: set[int] = set()  # chunk indices the front's FaultPlan corrupts
        self.refusals: list[str] = []  # faults that make the front refuse its own envelope
        self.invalid_calls: set[int] = set()  # call_ids of envelopes sent broken on purpose (never relayed)
        self.front_exit_at: float | None = None
        self.tempo = list(tempo)
        self.slow_calls = any(x > MESH_DRAIN_S for x in tempo)  # some generator call outlasts a mesh rank's drain
        self.max_chunks, self.after_chunks = chunks, after_chunks
        self.stop_posted = False  # a stop or a drain was asked of the front
        self.tampered = False
        self.job.transport.observers.append(self._observe)
        self.job.add_sink(self._on_shown)

    # == faults and requests (the model test's rules) ==============================================
    def _fault(self, what: str, timing: bool) -> None:
        self.faults.append(what)
        if timing:
            self.timing.append(what)
        self.trace.append(f"FAULT {what}")

    @property
    def engine(self) -> Any:
        return self.front.engine

    def serving(self) -> bool:
        """The front's loop serves (its chunk machine plans chunks)."""
        e = self.engine
        return self.front.alive and e is not None and e.machine.state == "serving"

    def kill(self, rank: int) -> None:
        p = self.procs[rank]
        if p.alive:
            self._fault(f"kill rank {rank} in {p.lifecycle.state}", timing=True)
            self.job.kill(rank)

    def stall(self, rank: int, seconds: float) -> None:
        p = self.procs[rank]
        if p.alive:
            self._fault(f"stall rank {rank} for {seconds:g} s in {p.lifecycle.state}", timing=True)
            self.job.stall(rank, seconds)

    def signal(self, rank: int) -> str:
        """SIGTERM on one rank (mirrors ``main.on_signal``)."""
        p = self.procs[rank]
        if not p.alive:
            return "dead"
        state = p.lifecycle.state
        draining_already = p.drain_deadline is not None
        deadline_s = self.engine.machine.chunk.deadline_s() if p is self.front and self.engine is not None else FLOOR
        verdict = p.signal()
        self.trace.append(f"signal r{rank} in {state}: {verdict}")
        # main.py's policy: drain from the channels' warm-up on (kept until serving), ignore while draining or
        # ended, fail inside the startup collectives
        job_failed = any(q is not p and (q.lifecycle.state == "failed" or q.code not in (None, 0)) for q in self.procs)
        want = ("ignored" if state in ("shutdown", "failed") else "fail" if job_failed  # no drain can finish
                else "drain" if state in ("warming_channels", "warmup", "serving")
                else "ignored" if state == "draining" else "fail")
        if want == "drain" and draining_already:
            want = "ignored"
        self.check(verdict == want, f"a signal to rank {rank} in {state} was {verdict}, the policy says {want}")
        if verdict == "drain":  # its bound: the front, twice its deadline; a mesh rank, MESH_DRAIN_S and a heartbeat
            bound = 2 * deadline_s + 2 * H + 5 if p.rt.hosts_front else MESH_DRAIN_S + H
            assert p.drain_deadline is not None
            self.check(abs(p.drain_deadline - self.job.now - bound) < 1e-6, f"drain bound "
                       f"{p.drain_deadline - self.job.now:g} s, the policy says {bound:g} s")
        if verdict == "fail":
            self._fault(f"signal to rank {rank} during {state} (fails it)", timing=True)
        elif verdict == "drain":  # a mesh rank's drain reaches the front through the job's store (its watcher)
            self.stop_posted = True
            if self.slow_calls:  # its bound (MESH_DRAIN_S + H) is shorter than a call in hand: a timing fault
                self._fault(f"signal to mesh rank {rank} with calls slower than its drain bound", timing=True)
        return verdict

    def stop(self) -> None:
        """The server's shutdown (``engine.request_stop``): not a fault."""
        if self.engine is not None and self.front.alive:
            self.trace.append("stop requested")
            self.stop_posted = True
            self.engine.request_stop()

    def _note_cut(self) -> None:
        c = self.engine.machine.chunk
        if self.serving() and c.can_fire("cut"):
            out = c.outstanding
            if self.ledger.cut_after_call is None:
                self.ledger.cut_after_call = out.call_id if out is not None else self.ledger.last_call_id
                self.ledger.cut_from_epoch = self.ledger.epoch

    def hard_cut(self) -> None:
        if self.engine is not None and self.front.alive:
            self._note_cut()
            self.trace.append("cut posted")
            self.engine.request_cut("prompt reset (model)")

    def prompt(self, text: str) -> None:
        if self.engine is not None and self.front.alive:
            self._note_cut()
            self.trace.append(f"prompt {text!r} posted")
            self.engine.request_prompt(text, conditioning=STAGE0.encode_prompt(text))

    def corrupt(self, kind: str) -> None:
        """A ``PP1_FAULT`` message fault of the front on its next chunk (``corrupt_envelope``,
        ``unserialisable``, ``bad_dtype``)."""
        c = self.engine.machine.chunk if self.engine is not None else None
        k = c.position if c is not None else 0
        self.corrupt_chunks.add(k)
        if kind != "corrupt_envelope":
            self.refusals.append(kind)
        self._fault(f"{kind} on chunk {k}", timing=False)
        self.front.ctx.faults.faults.append(Fault(rank=self.front.rank, at=f"chunk:{k}", do=kind))

    def garble(self, rank: int) -> None:
        """The next frame to ``rank`` does not decode (its channel is poisoned: it fails)."""
        if self.procs[rank].alive:
            self._fault(f"garbled frame to rank {rank}", timing=True)
            self.job.garble_next_frame(rank)

    def generator_fault(self, rank: int, kind: str) -> None:
        """The next call of ``rank``'s generator raises ("raise") or miscounts its calls ("tripwire", or
        "tripwire_twice": the next two calls)."""
        p = self.procs[rank]
        g = p.generator
        if p.alive and g is not None:  # a tripwire in warmup fails the rank: timing then
            self._fault(f"generator {kind} on rank {rank}",
                        timing=kind == "raise" or p.lifecycle.state != "serving")
            g.fault = kind

    def slow(self, rank: int, seconds: float) -> None:
        """The next call of ``rank``'s generator computes for ``seconds`` (less than the deadline floor: not a
        fault; round trips that long move the deadline's p99)."""
        p = self.procs[rank]
        if p.alive and p.generator is not None:
            self.trace.append(f"slow r{rank} {seconds:g} s")
            p.generator.slow_s = seconds

    def tamper_next_envelope(self, **update: Any) -> None:
        """The front's next envelope is altered in transit (fields ``update``), undetectably to the codec."""
        t = self.job.transport
        assert t.pp is not None
        self._fault(f"envelope altered in transit {update}", timing=False)
        self.tampered = True
        t.pp.tamper_next[t.leader] = lambda msg: msg.model_copy(update=update)

    # == time =======================================================================================
    def tick(self, dt: float) -> None:
        """Time passes, by the fairness rule (module docstring): only when no rank can move, and at most to the
        next timer."""
        if self.job.enabled():
            return
        timers = self.job.timers()
        target = self.job.now + dt
        if timers:
            target = min(target, min(timers))
        self.job.advance_to(target)

    def jump(self) -> bool:
        """Nothing can move: to the next timer. False when there is none."""
        timers = [x for x in self.job.timers() if x > self.job.now] or self.job.timers()
        if not timers:
            return False
        self.job.advance_to(min(timers))
        return True

    # == steps ======================================================================================
    def enabled(self) -> list[int]:
        return self.job.enabled()

    def step(self, choice: int) -> int | None:
        """Step one enabled rank (``choice`` modulo their number); None when none is enabled."""
        ranks = self.enabled()
        if not ranks:
            return None
        r = ranks[choice % len(ranks)]
        self.step_rank(r)
        return r

    def step_rank(self, r: int) -> bool:
        p = self.procs[r]
        head = p.head()
        moved = self.job.step(r)
        if self.tempo and self.serving() and self.leader.generator is not None:
            self.leader.generator.tempo.extend(self.tempo)
            self.tempo = []
        if moved:
            self.trace.append(f"{self.job.now:g} r{r} {type(head).__name__ if head else '-'}")
        self.check_front_deadline()
        return moved

    def pump(self, ranks: list[int] | None = None, until: Any = None, max_steps: int = 5000) -> None:
        """Step the given ranks (default: all) round-robin, jumping time when none can move, until ``until()``
        holds (a ModelViolation when it never can), or, without ``until``, nothing can happen."""
        for i in range(max_steps):
            if until is not None and until():
                return
            live = [r for r in self.enabled() if ranks is None or r in ranks]
            if live:
                self.step_rank(live[i % len(live)])
                continue
            if self.job.all_exited() or not self.jump():
                if until is None or until():
                    return
                raise ModelViolation(f"pump: nothing more can happen and the condition does not hold: "
                                     f"{self.describe()}")
        raise ModelViolation(f"pump did not end after {max_steps} steps: {self.describe()}")

    def run_until_serving(self, max_steps: int = 5000) -> None:
        """The first enabled step (the next timer when none) until the front serves or has exited."""
        self.pump(until=lambda: not self.front.alive or self.serving() or self.job.all_exited(), max_steps=max_steps)

    def run_chunks(self, n: int, max_steps: int = 5000) -> None:
        """Stream until ``n`` more chunks were shown, or the front stops serving."""
        want = len(self.ledger.shown) + n
        self.pump(until=lambda: len(self.ledger.shown) >= want or not self.serving() or self.engine.machine.done
                  or self.job.all_exited(), max_steps=max_steps)

    def settle(self, max_steps: int = 20000) -> None:
        """Drive the job to its end: to serving (or failure), then SIGTERM on the front, then until every rank
        has exited (first enabled step; the next timer when none). Checks the end."""
        self.run_until_serving(max_steps)
        if self.front.alive and self.front.lifecycle.state == "serving" and not self.stop_posted:
            self.signal(self.front.rank)  # (a stop already asked must end the run by itself: never lost)
        for _ in range(max_steps):
            if self.job.all_exited():
                break
            self.check_progress()
            self.job.poll_drain(now=True)  # the front's drain watcher reads the store (its poll comes in POLL_S)
            ranks = self.enabled()
            if ranks:
                self.step_rank(ranks[0])
            else:
                self.jump()
        else:
            raise ModelViolation(f"shutdown did not end after {max_steps} steps: {self.describe()}")
        self.check_end()

    # == invariants =================================================================================
    def check(self, cond: bool, what: str) -> None:
        """A violation names the job's state (formatted only then)."""
        if not cond:
            raise ModelViolation(f"{what}: {self.describe()}")

    def check_progress(self) -> None:
        """No reachable deadlock: some rank can move, a timer will fire, or every rank is done."""
        if self.job.all_exited() or self.enabled():
            return
        self.check(bool(self.job.timers()), "deadlock: nothing can move and no timer is armed")

    def check_front_deadline(self) -> None:
        """The front never waits without a deadline."""
        p = self.front
        head = p.head() if p.alive else None
        if isinstance(head, (AwaitResult, AwaitReady, Idle)):
            self.check(head.until is not None and math.isfinite(head.until),
                       f"the front waits ({type(head).__name__}) without a deadline")
        e = self.engine
        if p.alive and e is not None and e.machine.chunk.state in ("draining", "closing", "stopping") \
                and not p.lifecycle.is_terminal:
            self.check(p.lifecycle.state == "draining", f"the front drains, its lifecycle is {p.lifecycle.state}")
        led = self.ledger
        if isinstance(head, Idle) and led.last_activity is not None:
            self.check(head.until == led.last_activity + H, f"the front idles until {head.until:g}, H after its last "
                       f"send or result is {led.last_activity + H:g}")

    def check_end(self) -> None:
        self.check(self.job.all_exited(), "live ranks left")
        led = self.ledger
        codes = [p.code for p in self.procs]
        if self.front.code == 0:
            self.check(led.received == led.sent, f"front exited 0 with {led.sent - led.received} envelope(s) "
                  f"unanswered")
        if not self.faults:
            self.check(all(c == 0 for c in codes), f"no fault injected, yet exit codes {codes}")
        if not self.timing:  # (the leader exits 1 after a farewell: the front is gone when it answers)
            workers = [p.code for p in self.mesh[1:]]
            self.check(all(c == 0 for c in workers), f"no rank was lost, yet worker exit codes {workers} (the front's "
                  f"farewell SHUTDOWN should end them)")
        if self.startup_fault is not None and len(self.faults) == 1:
            for p in self.procs:
                f = p.lifecycle.failure
                self.check(p.code != 0 and f is not None and self.startup_fault in f.reason,
                           f"rank {p.rank} exited {p.code} ({f}), the startup fault says {self.startup_fault!r}")
                if p.rank in self.blamed:
                    assert f is not None
                    self.check(f.kind == self.blamed[p.rank], f"rank {p.rank} failed {f.kind}, should be "
                               f"{self.blamed[p.rank]}: {f}")
        for p in self.procs:  # an exit its machines chose (not a kill, a signal, a drain's bound) matches the lifecycle
            if p.reason == "killed" or p.reason.startswith("SIGTERM") or p.reason.startswith("drain did not"):
                continue
            want = "shutdown" if p.code == 0 else "failed"
            self.check(p.lifecycle.state == want, f"rank {p.rank} exited {p.code}, its lifecycle is in "
                       f"{p.lifecycle.state}")
        if self.engine is not None:
            st = self.engine.machine.chunk.stats
            self.check(st.emitted == len(led.accepted), f"the chunk machine accepted {st.emitted} chunks, the model "
                       f"{len(led.accepted)}")
            self.check(st.retries == led.retries, f"{st.retries} retries, the model saw {led.retries}")
            self.check(st.discarded_stale == led.stale, f"{st.discarded_stale} stale results discarded, the model "
                       f"saw {led.stale}")
        seen = [p.generator.seen for p in self.mesh if p.generator is not None]
        longest = max(seen, key=len, default=[])
        for s in seen:
            self.check(s == longest[:len(s)], f"mesh ranks ran different calls: {s} vs {longest}")

    # == what the model watches =====================================================================
    def _observe(self, what: str, /, **f: Any) -> None:
        if what == "front_engine":
            f["engine"].machine.chunk.watch(self._on_chunk)
        elif what == "envelope":
            self._on_envelope(f["env"], f["tensors"])
        elif what == "await_result":
            self._on_await(f["until"])
        elif what == "result":
            self._on_result(f["result"])
        elif what == "expired":
            self.check(bool(self.timing), f"rank {f['rank']}: {f['what']} ran out at t={self.job.now:g} (bound "
                  f"{f['until']:g}) without a fault that could cause it")
        elif what == "tp_header":
            self._on_tp_header(f["header"])
        elif what == "exit":
            self.trace.append(f"r{f['rank']} exit {f['code']}: {f['reason'][:80]}")
            if f["rank"] == self.front.rank:
                self.front_exit_at = self.job.now
            if f["reason"] == "drain did not finish within its bound":
                self.check(bool(self.timing), f"rank {f['rank']}'s drain outlived its bound without a fault")
            if self.front_exit_at is not None:
                self.check(self.job.now <= self.front_exit_at + EXIT_BOUND_S,
                      f"rank {f['rank']} exited {self.job.now - self.front_exit_at:g} s after the front")

    def _on_envelope(self, env: PPEnvelopeV1, tensors: list[torch.Tensor]) -> None:
        led = self.ledger
        self.check(env.call_id > led.last_call_id, f"call_id {env.call_id} sent after {led.last_call_id}")
        self.check(led.sent == led.received, f"overlap depth 1: {env.action.value} call_id={env.call_id} sent with "
              f"{led.sent - led.received} envelope(s) unanswered")
        now = self.job.now
        if env.action is Action.NOOP and led.last_activity is not None and not self.timing:
            self.check(now == led.last_activity + H, f"heartbeat at t={now:g}, {now - led.last_activity:g} s after the "
                       f"front's last send or result (H={H:g})")
        # a headless run counts chunks shown, plus the one received and not decoded yet if still current
        kept = len(led.shown) + sum(1 for a in led.accepted if a[0] == led.epoch and a not in led.shown)
        if env.action is Action.SHUTDOWN and (self.engine is None or self.engine.machine.state != "failed"):
            headless_end = self.after_chunks == "shutdown" and self.max_chunks is not None and kept >= self.max_chunks
            self.check(self.stop_posted or headless_end, "SHUTDOWN sent, yet no stop was asked and the headless run "
                       "(after_chunks=shutdown) has not accepted its chunks")
        if env.action is Action.INFER and self.max_chunks is not None:
            self.check(kept < self.max_chunks, f"INFER sent after the headless run's {self.max_chunks} chunks")
        if env.action is Action.INFER and env.chunk_index > 0:
            prev = (env.cache_epoch, env.chunk_index - 1)
            j = env.chunk_index
            s0 = j * T - (min(j * T, self.window) if due(j, self.K) else 0)
            first = self.source == "reencode" and due(j, self.K) and s0 > 0 and s0 >= (j - 1) * T
            if self.engine is not None and self.engine.machine.overlap and first:
                self.check(prev in led.shown, f"re-encode: chunk {j} recomputes from frame {s0}, in chunk {prev} "
                           "not decoded: decode it first")
            elif self.engine is not None and self.engine.machine.overlap:
                self.check(prev not in led.shown, f"overlap: chunk {prev} was shown before chunk {env.chunk_index} "
                           "went out (send k+1, then decode k)")
            elif self.engine is not None:
                self.check(prev in led.shown, f"serial link: chunk {env.chunk_index} went out before chunk {prev} "
                           "was shown")
        led.last_call_id = env.call_id
        led.sent += 1
        led.sent_at[env.call_id] = now
        led.last_sent = env
        if env.action is not Action.PING:  # the chunk machine's heartbeat clock starts after the PING
            led.last_activity = now
        if self.engine is not None and self.engine.machine.state == "serving":
            want = max(FACTOR * p99(led.samples[-P99_SAMPLES:]), FLOOR)
            got = self.engine.machine.chunk.deadline_s()
            self.check(abs(got - want) < 1e-6, f"the front's deadline is {got:g} s, the rule says {want:g} s (p99 of "
                       f"the last {P99_SAMPLES} round trips)")
        if self.engine is not None and self.engine.machine.state == "failed":
            led.farewell = True
            self.check(env.action is Action.SHUTDOWN, f"after a failure the front sent {env.action.value}")
        if env.action is not Action.INFER:
            return
        k = self.K
        self.check(env.cache_epoch == led.epoch, f"INFER epoch {env.cache_epoch} != model epoch {led.epoch}")
        self.check(env.chunk_index == led.index, f"INFER chunk_index {env.chunk_index} != model {led.index} "
              f"(epoch {led.epoch})")
        self.check(env.do_kv_recompute == due(led.index, k), f"recompute={env.do_kv_recompute} at chunk {led.index} "
              f"with K={k}")
        self.check(env.init_cache == (led.index == 0), "init_cache only on an epoch's first chunk")
        self.check(env.reset_cache == (led.index == 0 and led.epoch > 0), f"reset_cache={env.reset_cache} at chunk "
              f"{led.index} of epoch {led.epoch}")
        self.check(env.timesteps == TIMESTEPS, f"timesteps {env.timesteps}")
        calls = len(TIMESTEPS) + (1 if env.do_kv_recompute else 0)
        self.check(env.expected_generator_calls == calls or env.chunk_index in self.corrupt_chunks,
                   f"expected_generator_calls {env.expected_generator_calls} != {calls}")
        if env.expected_generator_calls != calls:
            self.invalid_calls.add(env.call_id)
        if env.do_kv_recompute:
            want = min(led.index * T, self.window)
            self.check(len(tensors) == 3 and int(tensors[2].shape[1]) == want,
                       f"recompute of chunk {led.index} carries {[tuple(x.shape) for x in tensors]}, want {want} frames")
            self._check_context(env, tensors[2])
        cond = led.conditioning.setdefault(env.cache_epoch, tensors[0])
        self.check(torch.equal(cond, tensors[0]), f"epoch {env.cache_epoch} changed its conditioning mid-epoch")
        if led.cut_after_call is not None and env.call_id > led.cut_after_call:
            self.check(env.cache_epoch > led.cut_from_epoch, f"a cut was posted while serving, yet INFER call_id="
                  f"{env.call_id} is still of epoch {env.cache_epoch}")
            led.cut_after_call = None

    def _check_context(self, env: PPEnvelopeV1, ctx: torch.Tensor) -> None:
        """The context frames are the epoch's latent frames [s, s + n) as generated (the fake generator's latents
        of chunk j are noise(seed, j) / 2); with re-encode, frame s (when s > 0) is the VAE re-encode of its
        decoded frame instead."""
        n = int(ctx.shape[1])
        s = env.chunk_index * T - n
        chunks = [(STAGE0.make_noise(env.seed, j) * 0.5).float() for j in range(s // T, (s + n - 1) // T + 1)]
        want = torch.cat(chunks, dim=1)[:, s - (s // T) * T: s - (s // T) * T + n]
        reencoded = self.source == "reencode" and s > 0
        same = [torch.equal(ctx[:, i], want[:, i]) for i in range(n)]
        self.check(same[1:] == [True] * (n - 1) and same[0] != reencoded, f"the context of chunk {env.chunk_index} "
                   f"(frames [{s}, {s + n})) is not the epoch's latents{' with frame s re-encoded' if reencoded else ''}"
                   f": frames equal to the latents {same}")

    def _on_await(self, until: float | None) -> None:
        self.check(until is not None and math.isfinite(until), "the front waits for a result without a deadline")
        led, e = self.ledger, self.engine
        sent = led.last_sent
        if sent is not None and sent.action is Action.PING and until is not None:
            want_ping = led.sent_at[sent.call_id] + 4 * W
            self.check(until == want_ping, f"the PING's answer awaited until {until:g}, its bound is 4 W: {want_ping:g}")
        if sent is None or sent.action is Action.PING or e is None or e.machine.state != "serving":
            return
        assert until is not None
        want = led.sent_at[sent.call_id] + max(FACTOR * p99(led.samples[-P99_SAMPLES:]), FLOOR)
        self.check(abs(until - want) < 1e-6, f"the result of {sent.action.value} call_id={sent.call_id} awaited until "
              f"{until:g}, the deadline rule says {want:g} (p99 of the last {P99_SAMPLES} round trips)")

    def _on_result(self, res: PPResultV1) -> None:
        led = self.ledger
        led.received += 1
        sent = led.last_sent
        if sent is None or sent.action is Action.PING:
            return
        led.last_activity = self.job.now
        ids = (res.action, res.call_id, res.chunk_index, res.cache_epoch)
        if ids != (sent.action, sent.call_id, sent.chunk_index, sent.cache_epoch):
            return  # the front's tripwire fails it
        if res.action is not Action.SHUTDOWN and res.cache_epoch != led.epoch:
            led.stale += 1
        if res.action is not Action.INFER:
            return
        if res.ok and res.observed_generator_calls != sent.expected_generator_calls:
            self.check(self.tampered, f"the leader answered ok with {res.observed_generator_calls} generator calls "
                       f"for {sent.expected_generator_calls} expected: its tripwire must answer ok=False")
            return  # the front's tripwire fails it
        if res.ok:
            led.samples.append(self.job.now - led.sent_at[res.call_id])
            if res.cache_epoch == led.epoch:
                led.accepted.append((res.cache_epoch, res.chunk_index))
                led.index = res.chunk_index + 1
                led.failures_in_a_row = 0
                led.recomputes += int(sent.do_kv_recompute)

    def _on_chunk(self, machine: Any, event: str, _state: str) -> None:
        led = self.ledger
        if event == "cut":
            led.epoch += 1
            led.index = 0
        elif event == "fail" and "second failure in a row" in str(machine.failure):
            self.check(led.failures_in_a_row == 1, "failed on a 'second failure in a row' after a success")
        elif event in ("abort", "abort_closing"):
            self.check(bool(self.refusals), "the front refused its own envelope (planned again) without a fault "
                       "that breaks an envelope")
        elif event == "result_retry":
            self.check(led.failures_in_a_row == 0, "retried after a second failure in a row (retry once, then fail)")
            led.failures_in_a_row += 1
            led.retries += 1
            led.epoch += 1
            led.index = 0

    def _on_shown(self, batch: Any) -> None:
        rec = batch.record
        led = self.ledger
        self.check(rec.cache_epoch == led.epoch, f"stale chunk shown: epoch {rec.cache_epoch}, model epoch {led.epoch}")
        nxt = sum(1 for e, _ in led.shown if e == rec.cache_epoch)
        self.check(rec.chunk_index == nxt, f"shown chunk {rec.chunk_index} of epoch {rec.cache_epoch}, expected {nxt}")
        self.check((rec.cache_epoch, rec.chunk_index) in led.accepted, f"shown a chunk never accepted: {rec}")
        frames = 4 * T - (3 if rec.chunk_index == 0 else 0)
        self.check(int(batch.frames.shape[0]) == frames, f"chunk {rec.chunk_index} shows {batch.frames.shape[0]} frames")
        led.shown.append((rec.cache_epoch, rec.chunk_index))

    def _on_tp_header(self, h: TPHeaderV1) -> None:
        self.check(h.call_id not in self.invalid_calls or h.action is Action.WARMUP,
                   f"the leader relayed the invalid envelope call_id={h.call_id} to the workers")
        if h.action is Action.WARMUP and h.do_kv_recompute:
            want = min(h.chunk_index * T, self.window)
            got = int(h.tensors[2].shape[1])
            self.check(got == want, f"warmup chunk {h.chunk_index} recomputes over {got} frames, the window allows {want}")

    # == reading ====================================================================================
    def describe(self) -> str:
        return (f"{self.job.describe()} faults={self.faults} ledger(epoch={self.ledger.epoch} index="
                f"{self.ledger.index} sent={self.ledger.sent} received={self.ledger.received}) "
                f"trace[-16:]={self.trace[-16:]}")
