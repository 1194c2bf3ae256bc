"""The front's chunk machine: ids, epochs, the recompute schedule, overlap depth 1, hard cuts,
stale-result drop, retry once, the tripwires and the result deadline. No I/O, no clocks: time
comes in as numbers (seconds on any monotonic clock).

It is driven by the front's loop machine (``fsm/front.py``: ``FrontMachine``), which owns it the way
it owns its ``KVCacheMachine``: the loop decides when to plan (``plan_next`` / ``plan_noop`` /
``plan_shutdown``), reports each send (``on_sent`` / ``abort_plan``) and each result (``on_result`` ->
a :class:`Decision`), applies requests (``request_stop``, ``hard_cut``) and turns the decisions into
intents for its adapter.

Rules the machine holds:
- ``call_id`` strictly increases over the job: INFER, NOOP and SHUTDOWN (and anything the front
  sends through ``next_call_id()``) take ids from one counter.
- ``chunk_index`` is the chunk's position in its epoch (0 = first chunk: init_cache, 9 frames).
  ``cache_epoch`` +1 on every hard cut; the epoch's first chunk after a cut carries reset_cache.
- Recompute every K chunks (``recompute_every``): chunk p of an epoch recomputes iff K > 0,
  p > 0 and p % K == 0 (never the first chunk of an epoch; K=0 never).
- A result must match what was sent (action, call_id, chunk_index, cache_epoch) and, when ok,
  observed generator calls == expected; else FAIL with a RemoteProtocolError (codes "id_mismatch",
  "tripwire_calls": ``pp1.protocol.preflight.check_result_matches``).
- ok=False: drop it, hard cut, RETRY; a second failure in a row (no ok chunk between) -> FAIL.
  MESH_FAILED / UNSUPPORTED_VERSION fail at once (a retry cannot help).
- Deadline: max(deadline_factor x rolling p99 of INFER round trips, deadline_floor_s).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal

from pp1.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pp1.protocol.messages import Action, ErrorCode, PPEnvelopeV1, PPResultV1
from pp1.protocol.preflight import check_result_matches
from pp1.protocol.schedule import (
    DEADLINE_SAMPLES,
    FIRST_CALL_ID,
    expected_generator_calls,
    p99,
    recompute_due,
)
from pp1.protocol.tensors import TensorSpec

from .base import FAILED, FailureCause, InvalidEvent, ProtocolMachine
from .kv_cache import NEEDS_RECOMPUTE, KVCacheMachine

log = logging.getLogger("pp1.fsm.chunk")

ContextSource = Literal["latents", "reencode"]

IDLE = "idle"  # nothing in flight; may plan a chunk, a NOOP or (stop) a SHUTDOWN
BUILDING = "building"  # a plan is out; the engine builds + preflights + sends it, then on_sent/abort_plan
IN_FLIGHT = "in_flight"  # one envelope (INFER or NOOP) awaits its result
CUTTING = "cutting"  # in flight, but a hard cut came: its result will be received and discarded
DRAINING = "draining"  # in flight, stop requested: receive its result, then shut down
CLOSING = "closing"  # stop requested, nothing in flight: the next envelope is SHUTDOWN
STOPPING = "stopping"  # SHUTDOWN planned / sent, awaiting its result
STOPPED = "stopped"

CHUNK_STATES = [IDLE, BUILDING, IN_FLIGHT, CUTTING, DRAINING, CLOSING, STOPPING, STOPPED, FAILED]

# (event, source(s), dest). Self-loops are spelled out per state.
CHUNK_TRANSITIONS: list[tuple[str, str | list[str], str]] = [
    # plan (the engine builds the envelope) ...
    ("infer_planned", IDLE, BUILDING),
    ("noop_planned", IDLE, BUILDING),
    ("shutdown_planned", [IDLE, CLOSING], STOPPING),
    # ... then sent, or aborted before the first byte (nothing sent)
    ("sent", BUILDING, IN_FLIGHT),
    ("sent_stale", BUILDING, CUTTING),  # a hard cut came while building: the envelope is already stale
    ("sent_draining", BUILDING, DRAINING),  # a stop came while building
    ("shutdown_sent", STOPPING, STOPPING),
    ("abort", BUILDING, IDLE),
    ("abort_closing", BUILDING, CLOSING),
    # results
    ("result_emit", IN_FLIGHT, IDLE),  # ok INFER of the current epoch
    ("result_ack", IN_FLIGHT, IDLE),  # ok NOOP
    ("result_retry", IN_FLIGHT, IDLE),  # first failure: hard cut done, next plan is the retry
    ("result_stale", CUTTING, IDLE),  # result of an older epoch: dropped
    ("result_drained", DRAINING, CLOSING),
    ("result_stopped", STOPPING, STOPPED),
    # hard cut (prompt reset / error recovery): epoch + 1 at once, in every live state but stopping
    ("cut", IDLE, IDLE),
    ("cut", BUILDING, BUILDING),
    ("cut", IN_FLIGHT, CUTTING),
    ("cut", CUTTING, CUTTING),
    ("cut", DRAINING, DRAINING),
    ("cut", CLOSING, CLOSING),
    # stop requested (SIGTERM / Ctrl-C): idempotent
    ("stop", IDLE, CLOSING),
    ("stop", BUILDING, BUILDING),
    ("stop", IN_FLIGHT, DRAINING),
    ("stop", CUTTING, DRAINING),
    ("stop", DRAINING, DRAINING),
    ("stop", CLOSING, CLOSING),
    ("stop", STOPPING, STOPPING),
]

WAITING_STATES = frozenset({IN_FLIGHT, CUTTING, DRAINING, STOPPING})


class ChunkPlan(PPEnvelopeV1):
    """The envelope the machine plans (its tensors are announced when the engine builds them), plus how
    to build its context: for INFER the engine builds conditioning, the noise of (seed, chunk_index)
    and, iff ``do_kv_recompute``, a context tensor of ``context_frames`` latent frames taken from
    ``context_source``."""

    context_source: ContextSource | None = None
    context_frames: int = 0

    @property
    def first_chunk(self) -> bool:
        return self.action is Action.INFER and self.chunk_index == 0


_PLAN_ONLY = frozenset({"context_source", "context_frames"})


def envelope_from_plan(plan: ChunkPlan, tensors: Sequence[TensorSpec] = ()) -> PPEnvelopeV1:
    """The PP envelope for ``plan``, announcing ``tensors`` in travel order (the preflight checks them)."""
    return PPEnvelopeV1(**plan.model_dump(exclude=_PLAN_ONLY | {"tensors"}), tensors=tuple(tensors))


class Verdict(str, Enum):
    EMIT = "emit"  # decode and show this chunk (after submitting the next one)
    DISCARD_STALE = "discard_stale"  # result of an older epoch: never decoded or shown
    DROP = "drop"  # failed while draining for stop: nothing to show, shutting down anyway
    ACK = "ack"  # a NOOP was answered
    RETRY = "retry"  # the chunk failed once: hard cut done; the next plan_next is the retry
    STOPPED = "stopped"  # SHUTDOWN was answered: exit 0
    FAIL = "fail"  # mesh failed: see cause / error


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    call_id: int
    chunk_index: int
    cache_epoch: int
    state: str  # the machine's state after the decision
    result: PPResultV1 | None = None
    cause: FailureCause | None = None
    error: ProtocolError | None = None
    round_trip_s: float | None = None
    plan: ChunkPlan | None = None  # what was sent (None for an unsolicited result)

    @property
    def failed(self) -> bool:
        return self.verdict is Verdict.FAIL

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if self.cause is not None:
            raise RemoteProtocolError("result", self.cause.reason, "mesh_failed")


@dataclass
class _Outstanding:
    plan: ChunkPlan
    sent_at: float | None = None  # None while building (not sent yet)


@dataclass
class ChunkStats:
    emitted: int = 0
    discarded_stale: int = 0
    retries: int = 0
    recomputes: int = 0
    noops: int = 0
    hard_cuts: int = 0
    round_trips_s: deque[float] = field(default_factory=lambda: deque(maxlen=200))


class ChunkMachine(ProtocolMachine):
    """The front's chunk / recompute / epoch schedule. See the module docstring for the loop."""

    NAME: ClassVar[str] = "chunk"
    STATES: ClassVar[list[str]] = CHUNK_STATES
    TRANSITIONS: ClassVar[list[tuple[str, str | list[str], str]]] = CHUNK_TRANSITIONS
    INITIAL: ClassVar[str] = IDLE
    TERMINAL: ClassVar[frozenset[str]] = frozenset({STOPPED, FAILED})

    def __init__(
        self,
        rank: int = 0,
        *,
        chunk_frames: int,
        window: int,
        timesteps: Sequence[int],
        recompute_every: int = 1,
        context_source: ContextSource = "latents",
        seed: int = 0,
        heartbeat_s: float = 1.0,
        deadline_floor_s: float = 30.0,
        deadline_factor: float = 4.0,
        deadline_samples: int = DEADLINE_SAMPLES,
        peer_rank: int | None = None,
        **ctx: Any,
    ) -> None:
        if recompute_every < 0:
            raise ValueError(f"recompute_every must be >= 0, got {recompute_every}")
        if not timesteps:
            raise ValueError("timesteps must not be empty")
        self.chunk_frames = chunk_frames
        self.peer_rank = peer_rank  # the leader's global rank: a remote failure is its fault
        self.timesteps = tuple(int(t) for t in timesteps)
        self.recompute_every = recompute_every
        self.context_source: ContextSource = context_source
        self.seed = seed
        self.heartbeat_s = heartbeat_s
        self.deadline_floor_s = deadline_floor_s
        self.deadline_factor = deadline_factor
        self.cache_epoch = 0
        self.position = 0  # chunk_index of the epoch's next chunk
        self.consecutive_failures = 0
        self.poisoned = False  # a receive could not complete: never touch the channel again
        self.last_activity: float | None = None  # last send or result (for the heartbeat)
        self.stats = ChunkStats(round_trips_s=deque(maxlen=deadline_samples))
        self._next_call_id = FIRST_CALL_ID  # after the PP channel's startup PING
        self._reset_pending = False  # the epoch's first chunk must carry reset_cache (after a cut)
        self._out: _Outstanding | None = None
        self._stop_while_building = False
        self.kv = KVCacheMachine(rank, window=window, chunk_frames=chunk_frames, **ctx)
        super().__init__(rank, **ctx)

    # -- ids ----------------------------------------------------------------------------------------
    def next_call_id(self) -> int:
        """Take the next call_id (strictly increasing over the job)."""
        cid = self._next_call_id
        self._next_call_id += 1
        return cid

    @property
    def outstanding(self) -> ChunkPlan | None:
        """The plan being built or in flight (None when nothing is)."""
        return self._out.plan if self._out else None

    @property
    def waiting(self) -> bool:
        """True while a sent envelope awaits its result."""
        return self.state in WAITING_STATES and self._out is not None and self._out.sent_at is not None

    def is_current(self, cache_epoch: int) -> bool:
        """May frames of ``cache_epoch`` be shown now (no hard cut since)?"""
        return cache_epoch == self.cache_epoch and self.state != FAILED

    # -- planning -----------------------------------------------------------------------------------
    def plan_next(self, now: float) -> ChunkPlan:
        """Plan the epoch's next chunk (the retry, after a RETRY). Only in idle."""
        self._require("infer_planned")
        k = self.position
        recompute = recompute_due(k, self.recompute_every)
        if recompute and self.kv.state != NEEDS_RECOMPUTE:  # pragma: no cover - schedule invariant
            raise LocalProtocolError("chunk.kv", f"recompute due at chunk {k} but kv is {self.kv.state}", "schedule")
        plan = ChunkPlan(
            action=Action.INFER,
            call_id=self.next_call_id(),
            chunk_index=k,
            cache_epoch=self.cache_epoch,
            init_cache=k == 0,
            reset_cache=k == 0 and self._reset_pending,
            do_kv_recompute=recompute,
            num_denoising_steps=len(self.timesteps),
            timesteps=self.timesteps,
            expected_generator_calls=expected_generator_calls(len(self.timesteps), recompute),
            seed=self.seed,
            context_source=self.context_source if recompute else None,
            context_frames=self.kv.context_frames() if recompute else 0,
        )
        self._begin(plan, "infer_planned")
        return plan

    def plan_noop(self, now: float) -> ChunkPlan:
        """Plan a heartbeat. Only in idle (never while anything is in flight)."""
        self._require("noop_planned")
        plan = ChunkPlan(action=Action.NOOP, call_id=self.next_call_id(), cache_epoch=self.cache_epoch)
        self._begin(plan, "noop_planned")
        return plan

    def plan_shutdown(self) -> ChunkPlan:
        """Plan the SHUTDOWN envelope. In idle or closing (drain first: never while in flight)."""
        self._require("shutdown_planned")
        plan = ChunkPlan(action=Action.SHUTDOWN, call_id=self.next_call_id(), cache_epoch=self.cache_epoch)
        self._begin(plan, "shutdown_planned")
        return plan

    def farewell_plan(self) -> ChunkPlan | None:
        """After a failure: a best-effort SHUTDOWN, or None when the channel is poisoned or an
        envelope is still unanswered. No state change; its result is not fed back."""
        if self.state != FAILED or self.poisoned or self.waiting:
            return None
        return ChunkPlan(action=Action.SHUTDOWN, call_id=self.next_call_id(), cache_epoch=self.cache_epoch)

    def noop_due(self, now: float) -> bool:
        """A heartbeat is due: idle and nothing sent or received for heartbeat_s."""
        if self.state != IDLE:
            return False
        return self.last_activity is None or now - self.last_activity >= self.heartbeat_s

    def on_sent(self, now: float) -> str:
        """The planned envelope (and its tensors) went out: start its deadline."""
        out = self._out
        if out is None or out.sent_at is not None:
            raise LocalProtocolError("chunk.on_sent", f"nothing planned to send in state {self.state}", "no_plan")
        plan = out.plan
        if self.state == STOPPING:
            self.fire("shutdown_sent")
        elif self._stop_while_building:
            self.fire("sent_draining")
        elif plan.cache_epoch != self.cache_epoch:
            self.fire("sent_stale")
        else:
            self.fire("sent")
        self._stop_while_building = False
        out.sent_at = now
        self.last_activity = now
        if plan.action is Action.INFER and plan.cache_epoch == self.cache_epoch:
            if plan.chunk_index == 0:
                self._reset_pending = False
            if plan.do_kv_recompute:
                self.kv.begin_recompute()
                self.stats.recomputes += 1
        self._log("sent", plan)
        return self.state

    def abort_plan(self, reason: str) -> str:
        """The plan could not be sent (a local error before the first byte): nothing went out.
        Its call_id is burned; the schedule is untouched."""
        if self._out is None or self._out.sent_at is not None or self.state not in (BUILDING, STOPPING):
            raise LocalProtocolError("chunk.abort_plan", f"no unsent plan in state {self.state}", "no_plan")
        plan = self._out.plan
        self._out = None
        log.warning("chunk rank=%d aborted plan call_id=%d chunk_index=%d cache_epoch=%d: %s",
                    self.rank, plan.call_id, plan.chunk_index, plan.cache_epoch, reason)
        if self.state == STOPPING:  # a SHUTDOWN that cannot even be built: fail locally
            self.fail_with(f"could not send SHUTDOWN: {reason}", "local")
            return self.state
        self.fire("abort_closing" if self._stop_while_building else "abort")
        self._stop_while_building = False
        return self.state

    # -- requests from outside (applied by the engine between steps) -------------------------------
    def hard_cut(self, reason: str, *, seed: int | None = None, recompute_every: int | None = None) -> str:
        """Prompt reset / error recovery: epoch + 1, KV cache reset, the next chunk is chunk 0 with
        reset_cache. With a chunk in flight its result will be received and discarded. ``seed`` /
        ``recompute_every``: the new epoch's (a stream's parameters change only at a cut)."""
        self._require("cut")
        if recompute_every is not None and recompute_every < 0:
            raise ValueError(f"recompute_every must be >= 0, got {recompute_every}")
        self.fire("cut")
        if seed is not None:
            self.seed = seed
        if recompute_every is not None:
            self.recompute_every = recompute_every
        self._do_cut(reason)
        return self.state

    def request_stop(self) -> str:
        """SIGTERM / Ctrl-C: admit no new work; drain what is in flight, then SHUTDOWN."""
        self._require("stop")
        if self.state == BUILDING:
            self._stop_while_building = True
        self.fire("stop")
        log.info("chunk rank=%d stop requested state=%s", self.rank, self.state)
        return self.state

    # -- results ------------------------------------------------------------------------------------
    def on_result(self, result: PPResultV1, now: float) -> Decision:
        """Judge the result of the outstanding envelope. Tripwires first; then the verdict."""
        if self.is_terminal:
            raise LocalProtocolError("chunk.on_result", f"result received in terminal state {self.state}",
                                     "terminal")
        out = self._out
        if out is None or out.sent_at is None:
            err = RemoteProtocolError("result.call_id", f"unsolicited result call_id={result.call_id} "
                                      f"in state {self.state} (nothing in flight)", "unsolicited_result")
            return self._fail(err, result, None)
        plan, sent_at = out.plan, out.sent_at
        err = self._tripwire(plan, result)
        if err is not None:
            return self._fail(err, result, plan)
        self._out = None
        self.last_activity = now
        rtt = max(0.0, now - sent_at)

        if self.state == STOPPING:
            if not result.ok:
                log.warning("chunk rank=%d SHUTDOWN call_id=%d answered ok=False: %s %s", self.rank,
                            plan.call_id, result.error_code, result.error_message)
            self.fire("result_stopped")
            return self._decide(Verdict.STOPPED, plan, result, rtt)

        stale = plan.cache_epoch != self.cache_epoch
        if plan.action is Action.INFER and result.ok:
            self.stats.round_trips_s.append(rtt)
        if self.state == CUTTING or (self.state == DRAINING and stale):
            self.stats.discarded_stale += 1
            self.fire("result_stale" if self.state == CUTTING else "result_drained")
            return self._decide(Verdict.DISCARD_STALE, plan, result, rtt)
        if self.state == DRAINING:
            if result.ok and plan.action is Action.INFER:
                self._accept_chunk(plan)
                self.fire("result_drained")
                return self._decide(Verdict.EMIT, plan, result, rtt)
            self.fire("result_drained")
            return self._decide(Verdict.ACK if result.ok else Verdict.DROP, plan, result, rtt)

        # IN_FLIGHT, current epoch
        if not result.ok:
            return self._on_failed_result(plan, result, rtt)
        if plan.action is Action.NOOP:
            self.stats.noops += 1
            self.fire("result_ack")
            return self._decide(Verdict.ACK, plan, result, rtt)
        self._accept_chunk(plan)
        self.fire("result_emit")
        return self._decide(Verdict.EMIT, plan, result, rtt)

    # -- deadline -----------------------------------------------------------------------------------
    def deadline_s(self) -> float:
        """max(deadline_factor x rolling p99 of INFER round trips, deadline_floor_s)."""
        return max(self.deadline_factor * p99(self.stats.round_trips_s), self.deadline_floor_s)

    def deadline_at(self) -> float | None:
        """When the outstanding result is due (None when nothing sent awaits a result)."""
        if not self.waiting:
            return None
        assert self._out is not None and self._out.sent_at is not None
        return self._out.sent_at + self.deadline_s()

    def on_deadline_missed(self, now: float) -> Decision:
        """No result by deadline_at(): the mesh failed; the receive is abandoned, so the channel is
        poisoned (no further send, not even a farewell SHUTDOWN)."""
        due = self.deadline_at()
        if due is None:
            raise LocalProtocolError("chunk.deadline", f"no result awaited in state {self.state}", "no_deadline")
        if now < due:
            raise LocalProtocolError("chunk.deadline", f"deadline not passed: now={now} < due={due}", "early")
        assert self._out is not None
        plan = self._out.plan
        self.poisoned = True
        err = RemoteProtocolError(
            "result", f"no result for {plan.action.value} call_id={plan.call_id} chunk_index={plan.chunk_index} "
            f"cache_epoch={plan.cache_epoch} within {self.deadline_s():.3f}s", "deadline")
        return self._fail(err, None, plan)

    def poison(self, reason: str) -> Decision:
        """The channel broke mid-message (a send or receive failed: the peer is gone, or its stream is out
        of step): the fault is the peer's (remote, blaming ``peer_rank``); never touch the channel again."""
        self.poisoned = True
        plan = self._out.plan if self._out else None
        err = RemoteProtocolError("channel", reason, "poisoned")
        return self._fail(err, None, plan, kind="remote")

    # -- internals ----------------------------------------------------------------------------------
    def _require(self, event: str) -> None:
        if not self.can_fire(event):
            raise InvalidEvent(self.NAME, self.state, event)

    def _begin(self, plan: ChunkPlan, event: str) -> None:
        self.fire(event)
        self._out = _Outstanding(plan)
        self._log("planned", plan)

    def _do_cut(self, reason: str) -> None:
        self.cache_epoch += 1
        self.position = 0
        self._reset_pending = True
        self.stats.hard_cuts += 1
        self.kv.reset()
        log.info("chunk rank=%d hard cut -> cache_epoch=%d state=%s: %s", self.rank, self.cache_epoch,
                 self.state, reason)

    def _accept_chunk(self, plan: ChunkPlan) -> None:
        self.consecutive_failures = 0
        self.stats.emitted += 1
        self.position = plan.chunk_index + 1
        self.kv.store()
        if recompute_due(self.position, self.recompute_every):
            self.kv.mark_recompute()

    def _on_failed_result(self, plan: ChunkPlan, result: PPResultV1, rtt: float) -> Decision:
        reason = f"{plan.action.value} call_id={plan.call_id} failed: {result.error_code} {result.error_message}"
        fatal = result.error_code in (ErrorCode.MESH_FAILED, ErrorCode.UNSUPPORTED_VERSION)
        if fatal or self.consecutive_failures >= 1:
            why = "fatal error code" if fatal else "second failure in a row"
            err = RemoteProtocolError("result.ok", f"{why}: {reason}", "mesh_failed")
            return self._fail(err, result, plan)
        self.consecutive_failures += 1
        self.stats.retries += 1
        self.fire("result_retry")
        self._do_cut(f"retry after {reason}")
        return self._decide(Verdict.RETRY, plan, result, rtt)

    def _tripwire(self, plan: ChunkPlan, result: PPResultV1) -> RemoteProtocolError | None:
        """The front's tripwires (shared with the protocol's rules): the ids match what was sent
        and, when ok, observed generator calls == expected."""
        try:
            check_result_matches(result, plan, RemoteProtocolError)  # a plan is the envelope sent, plus its build
        except RemoteProtocolError as err:
            return err
        return None

    def _fail(self, err: ProtocolError, result: PPResultV1 | None, plan: ChunkPlan | None,
              kind: Literal["local", "remote"] = "remote") -> Decision:
        cause = self.fail_with(str(err), kind, self.peer_rank)
        log.error("chunk rank=%d FAILED call_id=%s chunk_index=%s cache_epoch=%s: %s", self.rank,
                  plan.call_id if plan else None, plan.chunk_index if plan else None,
                  plan.cache_epoch if plan else self.cache_epoch, err)
        if result is not None and self._out is not None and self._out.plan is plan:
            self._out = None  # received: the channel is clean
        if self.kv.state != FAILED:
            self.kv.fail_with(f"chunk machine failed: {err.reason}", kind)
        return Decision(
            verdict=Verdict.FAIL,
            call_id=plan.call_id if plan else (result.call_id if result else -1),
            chunk_index=plan.chunk_index if plan else 0,
            cache_epoch=plan.cache_epoch if plan else self.cache_epoch,
            state=self.state, result=result, cause=cause, error=err, plan=plan,
        )

    def _decide(self, verdict: Verdict, plan: ChunkPlan, result: PPResultV1, rtt: float) -> Decision:
        self._log(verdict.value, plan)
        return Decision(verdict=verdict, call_id=plan.call_id, chunk_index=plan.chunk_index,
                        cache_epoch=plan.cache_epoch, state=self.state, result=result, round_trip_s=rtt, plan=plan)

    def _log(self, step: str, plan: ChunkPlan) -> None:
        log.debug("chunk rank=%d %s %s call_id=%d chunk_index=%d cache_epoch=%d recompute=%s state=%s kv=%s",
                  self.rank, step, plan.action.value, plan.call_id, plan.chunk_index, plan.cache_epoch,
                  plan.do_kv_recompute, self.state, self.kv.state)
