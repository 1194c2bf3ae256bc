"""The front's chunk engine: drives B2's ChunkMachine over a link to the mesh leader (the PP
channel, or the in-process leader under pure TP). It is the ONE owner of that link: chunks,
heartbeat NOOPs every H s while idle, and SHUTDOWN all go out from the thread running :meth:`run`.

Per chunk: conditioning (from the prompt), the noise of (seed, chunk_index), context frames from
the epoch's previous latents when the machine plans a recompute; overlap depth 1 (when result k
arrives, submit k+1 at once, then decode k); frames shown only if their epoch is still current;
every wait bounded by the machine's deadline. Other threads talk to it only through
:meth:`request_stop` / :meth:`request_cut` (applied between steps).
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from pp1.fsm.chunk import ChunkMachine, ChunkPlan, Decision, Verdict, envelope_from_plan
from pp1.pipelines.interface import Stage0
from pp1.protocol.codec import dtype_name
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import T_CONDITIONING, T_CONTEXT, T_NOISE, Action, PPEnvelopeV1, PPResultV1
from pp1.protocol.tensors import TensorSpec

from .faults import FaultPlan
from .observe import emit_event
from .runtime import ChannelPoisoned, PeerLost

log = logging.getLogger("pp1.adapters.chunk_engine")


class Link(Protocol):
    """The front's end of the way to the leader.

    ``overlaps``: True when ``send`` returns while the mesh computes (the PP channel), so the decode
    of chunk k runs during the generation of k+1; False when ``send`` runs the whole call (pure TP's
    in-process leader): then chunk k is decoded and shown before k+1 is computed.
    """

    overlaps: bool

    def send(
        self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], preflight: bool = True,
        timeout_s: float | None = None,
    ) -> None: ...

    def recv(self, deadline_at: float | None) -> tuple[PPResultV1, list[torch.Tensor]]: ...


@dataclass
class ChunkRecord:
    """Timings of one shown chunk (ms unless noted; t_* are time.monotonic seconds)."""

    chunk_index: int
    call_id: int
    cache_epoch: int
    frames: int
    recompute: bool
    t_sent: float
    t_result: float
    t_shown: float
    round_trip_ms: float
    mesh_ms: float
    leader_ms: float
    decode_ms: float
    pp_overhead_ms: float
    period_ms: float | None = None
    shown: bool = True


@dataclass
class EngineOutcome:
    ok: bool
    state: str
    reason: str = ""
    poisoned: bool = False
    records: list[ChunkRecord] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    latents: torch.Tensor
    decision: Decision
    plan: ChunkPlan
    t_sent: float
    t_result: float


class ChunkEngine:
    """One comms thread's loop. ``max_chunks``: shown chunks to produce (None: forever);
    ``then``: after them, ``"shutdown"`` (headless run) or ``"idle"`` (keep heartbeating until
    a stop request)."""

    def __init__(
        self,
        machine: ChunkMachine,
        link: Link,
        stage0: Stage0,
        geometry: ChunkGeometry,
        *,
        prompt: str = "a calm sea at dawn",
        conditioning: torch.Tensor | None = None,
        faults: FaultPlan | None = None,
        max_chunks: int | None = None,
        then: str = "shutdown",
        on_frames: Callable[[torch.Tensor, ChunkRecord], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.m = machine
        self.link = link
        self.stage0 = stage0
        self.geometry = geometry
        self.prompt = prompt
        self.faults = faults or FaultPlan(machine.rank)
        self.max_chunks = max_chunks
        self.then = then
        self.on_frames = on_frames
        self.on_stop = on_stop
        self.clock = clock
        self.records: list[ChunkRecord] = []
        self.accepted = 0
        self._requests: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._history: list[torch.Tensor] = []  # this epoch's latents, for context frames
        self._history_epoch = -1
        self._sent: dict[int, tuple[ChunkPlan, float]] = {}  # call_id -> (plan, sent at)
        self._conditioning: torch.Tensor | None = conditioning  # encode the prompt early (before READY)
        self._idle_fault_checked = False
        self.last_shown: float | None = None

    # -- requests from other threads ---------------------------------------------------------------
    def request_stop(self) -> None:
        self._requests.put(("stop", "stop requested"))
        self._wake.set()

    def request_cut(self, reason: str) -> None:
        self._requests.put(("cut", reason))
        self._wake.set()

    def _apply_requests(self) -> None:
        while True:
            try:
                kind, reason = self._requests.get_nowait()
            except queue.Empty:
                return
            if self.m.is_terminal:
                continue
            if kind == "stop" and self.m.can_fire("stop"):
                self._stop()
            elif kind == "cut" and self.m.can_fire("cut"):
                self.m.hard_cut(reason)

    def _stop(self) -> None:
        self.m.request_stop()
        emit_event("draining", state=self.m.state)
        if self.on_stop is not None:
            self.on_stop()

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> EngineOutcome:
        m = self.m
        pending: _Pending | None = None
        if self._conditioning is None:
            self._conditioning = self.stage0.encode_prompt(self.prompt)
        while True:
            self._apply_requests()
            done_chunks = self.max_chunks is not None and self.accepted >= self.max_chunks
            if done_chunks and self.then == "shutdown" and m.can_fire("stop") and m.state == "idle":
                self._stop()
            plan = None
            now = self.clock()
            if m.state == "closing":
                plan = m.plan_shutdown()
            elif m.state == "idle" and not done_chunks:
                plan = m.plan_next(now)
            elif m.state == "idle" and m.noop_due(now):
                plan = m.plan_noop(now)
            if pending is not None and not self.link.overlaps:  # serial link: show k, then compute k+1
                self._decode(pending)
                pending = None
            if plan is not None:
                self._send(plan)
            if pending is not None:  # overlap: k+1 went out (if due), now decode k
                self._decode(pending)
                pending = None
            if m.is_terminal:
                return self._outcome()
            if m.waiting:
                d, tensors = self._recv()
                if d.verdict is not Verdict.EMIT:
                    self._sent.pop(d.call_id, None)
                if d.verdict is Verdict.EMIT:
                    pending = self._accept(d, tensors)
                elif d.verdict is Verdict.STOPPED:
                    return self._outcome()
                elif d.verdict is Verdict.FAIL:
                    self._farewell()
                    return self._outcome()
                continue
            if plan is None:
                if done_chunks and self.then == "idle" and not self._idle_fault_checked:
                    self._idle_fault_checked = True
                    emit_event("idle", accepted=self.accepted)
                    self.faults.check("idle")
                last = m.last_activity if m.last_activity is not None else now
                self._wake.wait(timeout=max(0.0, last + m.heartbeat_s - self.clock()))
                self._wake.clear()

    # -- sending -----------------------------------------------------------------------------------
    def _tensors_for(self, plan: ChunkPlan) -> tuple[list[torch.Tensor], list[TensorSpec]]:
        g = self.geometry
        assert self._conditioning is not None
        if plan.chunk_index == 0 or plan.cache_epoch != self._history_epoch:
            self._history, self._history_epoch = [], plan.cache_epoch
        tensors = [self._conditioning, self.stage0.make_noise(plan.seed, plan.chunk_index)]
        names = [T_CONDITIONING, T_NOISE]
        if plan.do_kv_recompute:
            past = torch.cat(self._history, dim=1) if self._history else torch.zeros(g.context_shape(0))
            n = plan.context_frames
            if past.shape[1] < n:
                raise LocalProtocolError("envelope.context_frames", f"need {n} past latent frames, have "
                                         f"{past.shape[1]}", "missing_context_frames")
            tensors.append(past[:, past.shape[1] - n:].contiguous())
            names.append(T_CONTEXT)
        specs = [TensorSpec(name=nm, dtype=dtype_name(t.dtype), shape=tuple(t.shape)) for nm, t in zip(names, tensors,
                                                                                                     strict=True)]
        return tensors, specs

    def _send(self, plan: ChunkPlan) -> None:
        m = self.m
        preflight = True
        t0 = self.clock()
        try:
            tensors: list[torch.Tensor] = []
            specs: list[TensorSpec] = []
            if plan.action is Action.INFER:
                tensors, specs = self._tensors_for(plan)
            env = envelope_from_plan(plan, specs)
            if plan.action is Action.INFER:
                env, tensors, preflight = self._inject(plan, env, tensors)
            self.link.send(env, tensors, preflight=preflight, timeout_s=m.deadline_s())
        except LocalProtocolError as err:
            log.error("refused before sending: %s call_id=%d chunk_index=%d cache_epoch=%d: %s",
                      plan.action.value, plan.call_id, plan.chunk_index, plan.cache_epoch, err)
            emit_event("refused", call_id=plan.call_id, chunk_index=plan.chunk_index, code=err.code, reason=str(err))
            m.abort_plan(str(err))
            return
        except (PeerLost, RemoteProtocolError) as exc:
            m.poison(f"send failed: {exc}")
            return
        now = self.clock()
        self._sent[plan.call_id] = (plan, t0)
        m.on_sent(now)
        log.info("sent %s call_id=%d chunk_index=%d cache_epoch=%d recompute=%s",
                 plan.action.value, plan.call_id, plan.chunk_index, plan.cache_epoch, plan.do_kv_recompute)
        if plan.action is Action.INFER:
            self.faults.check(f"sent:{plan.chunk_index}")

    def _inject(
        self, plan: ChunkPlan, env: PPEnvelopeV1, tensors: list[torch.Tensor]
    ) -> tuple[PPEnvelopeV1, list[torch.Tensor], bool]:
        """Apply a message-level fault planned for this chunk (tests only)."""
        fault = self.faults.check(f"chunk:{plan.chunk_index}")
        if fault is None:
            return env, tensors, True
        if fault.do == "corrupt_envelope":  # decodable but invalid: the leader must reject it
            return env.model_copy(update={"expected_generator_calls": env.expected_generator_calls + 1}), tensors, False
        if fault.do == "unserialisable":
            fields = {**dict(env), "timesteps": tuple(env.timesteps)}
            fields["seed"] = float("nan")
            return PPEnvelopeV1.model_construct(**fields), tensors, True
        if fault.do == "bad_dtype":
            return env, [tensors[0], tensors[1].double(), *tensors[2:]], True
        return env, tensors, True

    # -- receiving ---------------------------------------------------------------------------------
    def _recv(self) -> tuple[Decision, list[torch.Tensor]]:
        m = self.m
        due = m.deadline_at()
        try:
            result, tensors = self.link.recv(due)
        except ChannelPoisoned as exc:
            now = self.clock()
            if due is not None and now >= due - 0.05:  # the bounded wait ran out: deadline missed
                return m.on_deadline_missed(max(now, due)), []
            return m.poison(str(exc)), []
        except (PeerLost, RemoteProtocolError) as exc:
            return m.poison(f"receive failed: {exc}"), []
        return m.on_result(result, self.clock()), tensors

    def _accept(self, d: Decision, tensors: list[torch.Tensor]) -> _Pending:
        plan, t_sent = self._sent.pop(d.call_id)
        if d.cache_epoch == self._history_epoch:
            self._history.append(tensors[0])
            keep = self.geometry.max_context_frames
            while sum(t.shape[1] for t in self._history) - self._history[0].shape[1] >= keep:
                self._history.pop(0)
        self.accepted += 1
        return _Pending(latents=tensors[0], decision=d, plan=plan, t_sent=t_sent, t_result=self.clock())

    def _decode(self, p: _Pending) -> None:
        t0 = self.clock()
        frames = self.stage0.decode(p.latents, first_chunk=p.plan.chunk_index == 0)
        if frames.device.type != "cpu":  # frames leave the GPU for the video track; this also syncs the decode
            frames = frames.cpu()
        t1 = self.clock()
        res = p.decision.result
        timings = dict(res.timings_ms) if res else {}
        rtt = (p.t_result - p.t_sent) * 1000
        mesh_ms = float(timings.get("shard_ms", timings.get("total", 0.0)))
        leader_ms = float(timings.get("leader_ms", mesh_ms))
        shown = self.m.is_current(p.decision.cache_epoch)
        rec = ChunkRecord(
            chunk_index=p.plan.chunk_index, call_id=p.decision.call_id, cache_epoch=p.decision.cache_epoch,
            frames=int(frames.shape[0]), recompute=p.plan.do_kv_recompute, t_sent=p.t_sent, t_result=p.t_result,
            t_shown=t1, round_trip_ms=rtt, mesh_ms=mesh_ms, leader_ms=leader_ms, decode_ms=(t1 - t0) * 1000,
            pp_overhead_ms=max(0.0, rtt - leader_ms), shown=shown,
        )
        if shown:
            if self.last_shown is not None:
                rec.period_ms = (t1 - self.last_shown) * 1000
            self.last_shown = t1
            if self.on_frames is not None:
                self.on_frames(frames, rec)
        self.records.append(rec)
        emit_event("chunk", **asdict(rec))

    def _farewell(self) -> None:
        plan = self.m.farewell_plan()
        if plan is None:
            return
        try:
            self.link.send(envelope_from_plan(plan), (), preflight=True, timeout_s=min(1.0, self.m.heartbeat_s * 4))
            log.info("farewell SHUTDOWN sent call_id=%d", plan.call_id)
        except Exception as exc:  # best effort
            log.warning("farewell SHUTDOWN not sent: %s", exc)

    def _outcome(self) -> EngineOutcome:
        m = self.m
        ok = m.state == "stopped"
        reason = str(m.failure) if m.failure else ("stopped" if ok else m.state)
        st = m.stats
        return EngineOutcome(
            ok=ok, state=m.state, reason=reason, poisoned=m.poisoned, records=list(self.records),
            stats={"emitted": st.emitted, "retries": st.retries, "discarded_stale": st.discarded_stale,
                   "recomputes": st.recomputes, "noops": st.noops, "hard_cuts": st.hard_cuts},
        )


def summarise(records: Sequence[ChunkRecord], ready_at: float | None) -> dict[str, Any]:
    """chunks, frames, video fps (steady: after the first shown chunk), p50/p99 period, time to first frame."""
    shown = [r for r in records if r.shown]
    periods = [r.period_ms for r in shown if r.period_ms is not None]
    out: dict[str, Any] = {"chunks": len(shown), "frames": sum(r.frames for r in shown)}
    if len(shown) >= 2:
        span = shown[-1].t_shown - shown[0].t_shown
        out["video_fps"] = sum(r.frames for r in shown[1:]) / span if span > 0 else None
    elif shown:
        span = shown[0].t_shown - shown[0].t_sent
        out["video_fps"] = shown[0].frames / span if span > 0 else None
    else:
        out["video_fps"] = None
    out["period_p50_ms"] = statistics.median(periods) if periods else None
    out["period_p99_ms"] = sorted(periods)[max(0, int(round(0.99 * len(periods))) - 1)] if periods else None
    out["time_to_first_frame_s"] = (shown[0].t_shown - ready_at) if shown and ready_at is not None else None
    for key in ("mesh_ms", "decode_ms", "pp_overhead_ms", "round_trip_ms"):
        vals = [getattr(r, key) for r in shown]
        out[f"{key}_p50"] = statistics.median(vals) if vals else None
    return out
