"""The front's chunk engine: drives B2's ChunkMachine over a link to the mesh leader (the PP
channel, or the in-process leader under pure TP). It is the ONE owner of that link: chunks,
heartbeat NOOPs every H s while idle, and SHUTDOWN all go out from the thread running :meth:`run`.

Per chunk: conditioning (from the prompt), the noise of (seed, chunk_index), context frames when the
machine plans a recompute; overlap depth 1 (when result k arrives, submit k+1 at once, then decode
k); frames shown only if their epoch is still current; every wait bounded by the machine's deadline.
Other threads talk to it only through :meth:`request_stop`, :meth:`request_cut` and
:meth:`request_prompt` (applied between steps: at the top of the loop and just before a blocking
receive).

Prompt change (:meth:`request_prompt`, the one way to change the prompt): the caller's thread
encodes the conditioning (never the engine's: heartbeats keep flowing); the engine applies it as a
hard cut: cache_epoch + 1; a chunk in flight is received and dropped (never decoded or shown; it
is reported as a stale record); a chunk received but not decoded yet is not decoded; the new
epoch's chunk 0 goes out with init_cache + reset_cache and the new conditioning.

Context frames (``RunConfig.context_source``), for a recompute of chunk p carrying the window's last
n latent frames of this epoch, epoch latent frames [s, s + n) with s = p * T - n (T latent frames a
chunk):
- ``"latents"``: those latents as the mesh generated them (cheap).
- ``"reencode"`` (Krea / Self-Forcing, parity with single-GPU): the same, except that latent frame
  s is replaced by ``stage0.encode`` of ONE decoded video frame, the last frame latent s decoded to
  (video frame 4s of the epoch). The window then reads as a causal start: its 1 + 4(n - 1) decoded
  frames begin with that frame, and the VAE encodes 4k+1 frames as a fresh start whose first latent
  frame stands for one image (Krea's ``decoded_frame_buffer[:, :1]``). When s == 0 the window starts
  at the epoch's first latent frame, which already is such a causal start (one frame): it is kept
  (Krea's ``first_context_frame``). The frame must be decoded before the recompute is sent; with
  the reference window (6 frames, 3 a chunk) it always is, otherwise the engine decodes chunk k
  before sending k+1 (that one chunk loses its overlap).
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

from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.transport.runtime import ChannelPoisoned, PeerLost
from pp1.fsm.chunk import ChunkMachine, ChunkPlan, Decision, Verdict, envelope_from_plan
from pp1.pipelines.interface import Stage0
from pp1.protocol.codec import dtype_name
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import T_CONDITIONING, T_CONTEXT, T_NOISE, Action, PPEnvelopeV1, PPResultV1
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.front.engine")

FRAMES_PER_LATENT = 4  # Stage0.decode: T latent frames -> 4T video frames (4T - 3 on an epoch's first chunk)


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


@dataclass(frozen=True)
class _Request:
    kind: str  # "stop" | "cut" | "prompt"
    reason: str
    prompt: str = ""
    conditioning: torch.Tensor | None = None


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
        self.shown = 0  # chunks shown (every epoch)
        self.reencoded = 0  # context frames re-encoded from a decoded frame
        self.prompt_changes = 0
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._history: list[torch.Tensor] = []  # this epoch's latents, for context frames
        self._history_epoch = -1
        self._keyframes: dict[int, torch.Tensor] = {}  # epoch latent frame -> its last decoded frame (reencode)
        self._sent: dict[int, tuple[ChunkPlan, float]] = {}  # call_id -> (plan, sent at)
        self._conditioning: torch.Tensor | None = conditioning  # encode the prompt early (before READY)
        self._pending: _Pending | None = None  # received, not decoded yet (overlap depth 1)
        self._loop_thread: int | None = None
        self._idle_fault_checked = False
        self.last_shown: float | None = None

    @property
    def accepted(self) -> int:
        """Chunks of the run so far: shown, plus the one received but not decoded yet if still current."""
        p = self._pending
        return self.shown + (1 if p is not None and self.m.is_current(p.decision.cache_epoch) else 0)

    # -- requests from other threads ---------------------------------------------------------------
    def request_stop(self) -> None:
        self._requests.put(_Request("stop", "stop requested"))
        self._wake.set()

    def request_cut(self, reason: str) -> None:
        """A hard cut keeping the prompt (error recovery). To change the prompt use request_prompt."""
        self._requests.put(_Request("cut", reason))
        self._wake.set()

    def request_prompt(self, prompt: str, conditioning: torch.Tensor | None = None) -> None:
        """Change the prompt: a hard cut with a new conditioning (thread-safe; the one way to change it).

        ``conditioning`` defaults to ``stage0.encode_prompt(prompt)``, run HERE on the caller's thread
        (refused on the engine's own thread: the loop would stop heartbeating while it encodes).
        Applied between steps: epoch + 1, a chunk in flight is received and dropped, the epoch's
        chunk 0 carries init_cache + reset_cache and this conditioning."""
        if conditioning is None:
            if threading.get_ident() == self._loop_thread:
                raise LocalProtocolError("engine.request_prompt", "would encode the prompt on the engine's thread "
                                         "(stalling its heartbeats): encode it first and pass conditioning",
                                         "encode_on_engine_thread")
            conditioning = self.stage0.encode_prompt(prompt)
        g = self.geometry
        if tuple(conditioning.shape) != tuple(g.conditioning_shape()) or dtype_name(conditioning.dtype) != g.dtype:
            raise LocalProtocolError("engine.request_prompt.conditioning", f"expected {g.conditioning_shape()} "
                                     f"{g.dtype}, got {tuple(conditioning.shape)} {dtype_name(conditioning.dtype)}",
                                     "bad_conditioning")
        self._requests.put(_Request("prompt", f"prompt change to {prompt!r}", prompt, conditioning))
        self._wake.set()

    def _apply_requests(self) -> None:
        m = self.m
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            if m.is_terminal:
                continue
            if req.kind == "stop" and m.can_fire("stop"):
                self._stop()
            elif req.kind in ("cut", "prompt") and m.can_fire("cut"):
                m.hard_cut(req.reason)
                if req.kind == "prompt":
                    assert req.conditioning is not None
                    self._conditioning, self.prompt = req.conditioning, req.prompt
                    self.prompt_changes += 1
                    emit_event("prompt", cache_epoch=m.cache_epoch, prompt=req.prompt[:200], state=m.state)
                log.info("hard cut applied: cache_epoch=%d state=%s in_flight=%s: %s", m.cache_epoch, m.state,
                         m.waiting, req.reason)
            elif req.kind != "stop":
                log.warning("%s ignored in state %s (cache_epoch=%d)", req.reason, m.state, m.cache_epoch)

    def _stop(self) -> None:
        self.m.request_stop()
        emit_event("draining", state=self.m.state)
        if self.on_stop is not None:
            self.on_stop()

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> EngineOutcome:
        m = self.m
        self._loop_thread = threading.get_ident()
        if self._conditioning is None:  # the first prompt, before anything is sent (callers pass it encoded)
            self._conditioning = self.stage0.encode_prompt(self.prompt)
        while True:
            if self._pending is not None and not self.link.overlaps:  # serial link: show k, then compute k+1
                self._decode_pending()
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
            if plan is not None:
                if self._pending is not None and self._needs_pending_decoded(plan):
                    self._decode_pending()  # the frame to re-encode is in chunk k: decode it before k+1 goes
                self._send(plan)
            if self._pending is not None:  # overlap: k+1 went out (if due), now decode k
                self._decode_pending()
            if m.is_terminal:
                return self._outcome()
            if m.waiting:
                self._apply_requests()  # a cut asked for meanwhile: what is in flight is received and dropped
                d, tensors = self._recv()
                if d.verdict is not Verdict.EMIT:
                    sent = self._sent.pop(d.call_id, None)
                    if d.verdict is Verdict.DISCARD_STALE and sent is not None and sent[0].action is Action.INFER:
                        self._record_stale(d, *sent)
                if d.verdict is Verdict.EMIT:
                    self._pending = self._accept(d, tensors)
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
        assert self._conditioning is not None
        if plan.chunk_index == 0 or plan.cache_epoch != self._history_epoch:
            self._history, self._history_epoch, self._keyframes = [], plan.cache_epoch, {}
        tensors = [self._conditioning, self.stage0.make_noise(plan.seed, plan.chunk_index)]
        names = [T_CONDITIONING, T_NOISE]
        if plan.do_kv_recompute:
            tensors.append(self._context(plan))
            names.append(T_CONTEXT)
        specs = [TensorSpec(name=nm, dtype=dtype_name(t.dtype), shape=tuple(t.shape)) for nm, t in zip(names, tensors,
                                                                                                     strict=True)]
        return tensors, specs

    def _window_start(self, plan: ChunkPlan) -> int:
        """s: the epoch latent frame the recompute window of ``plan`` starts at."""
        return plan.chunk_index * self.geometry.latent_frames - plan.context_frames

    def _context(self, plan: ChunkPlan) -> torch.Tensor:
        """The context frames of a recompute (module docstring: "latents" or "reencode")."""
        g = self.geometry
        past = torch.cat(self._history, dim=1) if self._history else torch.zeros(g.context_shape(0))
        n = plan.context_frames
        if past.shape[1] < n:
            raise LocalProtocolError("envelope.context_frames", f"need {n} past latent frames, have "
                                     f"{past.shape[1]}", "missing_context_frames")
        ctx = past[:, past.shape[1] - n:].contiguous()
        s = self._window_start(plan)
        if plan.context_source != "reencode" or s <= 0:
            return ctx
        frame = self._keyframes.get(s)
        if frame is None:
            raise LocalProtocolError("envelope.context_frames", f"re-encode: latent frame {s} of cache_epoch "
                                     f"{plan.cache_epoch} has no decoded frame", "missing_context_frames")
        first = self.stage0.encode(frame)  # one frame = 4*0 + 1: a causal start, one latent frame
        if tuple(first.shape) != tuple(g.context_shape(1)):
            raise LocalProtocolError("envelope.context_frames", f"re-encode gave {tuple(first.shape)}, expected "
                                     f"{g.context_shape(1)}", "bad_context_frames")
        ctx = ctx.clone()
        ctx[:, :1] = first.to(ctx.device, ctx.dtype)
        self.reencoded += 1
        log.debug("context re-encoded: latent frame %d from its decoded frame call_id=%d chunk_index=%d "
                  "cache_epoch=%d", s, plan.call_id, plan.chunk_index, plan.cache_epoch)
        return ctx

    def _needs_pending_decoded(self, plan: ChunkPlan) -> bool:
        """A reencode recompute whose frame lies in the chunk not decoded yet (window <= one chunk)."""
        return (plan.action is Action.INFER and plan.do_kv_recompute and plan.context_source == "reencode"
                and self._window_start(plan) > 0 and self._window_start(plan) not in self._keyframes)

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
        return _Pending(latents=tensors[0], decision=d, plan=plan, t_sent=t_sent, t_result=self.clock())

    def _decode_pending(self) -> None:
        p, self._pending = self._pending, None
        assert p is not None
        if not self.m.is_current(p.decision.cache_epoch):  # a hard cut since it arrived: never decoded
            self._record(p.plan, p.decision, p.t_sent, p.t_result, frames=0, decode_ms=0.0, shown=False)
            return
        t0 = self.clock()
        frames = self.stage0.decode(p.latents, first_chunk=p.plan.chunk_index == 0)
        if frames.device.type != "cpu":  # frames leave the GPU for the video track; this also syncs the decode
            frames = frames.cpu()
        t1 = self.clock()
        if self.m.context_source == "reencode" and p.plan.cache_epoch == self._history_epoch:
            self._keep_keyframes(p, frames)
        rec = self._record(p.plan, p.decision, p.t_sent, p.t_result, frames=int(frames.shape[0]),
                           decode_ms=(t1 - t0) * 1000, shown=True, t_shown=t1, emit=False)
        self.shown += 1
        if self.last_shown is not None:
            rec.period_ms = (t1 - self.last_shown) * 1000
        self.last_shown = t1
        emit_event("chunk", **asdict(rec))
        if self.on_frames is not None:
            self.on_frames(frames, rec)

    def _keep_keyframes(self, p: _Pending, frames: torch.Tensor) -> None:
        """For reencode: the last decoded frame of each latent frame a later window may start at."""
        t, f = int(p.latents.shape[1]), int(frames.shape[0])
        base = p.plan.chunk_index * t
        for j in range(t):
            idx = f - 1 - FRAMES_PER_LATENT * (t - 1 - j)  # chunk 0: latent 0 -> frame 0 (one frame)
            if idx >= 0:
                self._keyframes[base + j] = frames[idx : idx + 1].clone()
        lowest = base + t - self.geometry.max_context_frames  # no later window starts before this
        for k in [k for k in self._keyframes if k < lowest]:
            del self._keyframes[k]

    def _record_stale(self, d: Decision, plan: ChunkPlan, t_sent: float) -> None:
        """A result received after a hard cut: dropped (never decoded or shown), reported as stale."""
        self._record(plan, d, t_sent, self.clock(), frames=0, decode_ms=0.0, shown=False)

    def _record(self, plan: ChunkPlan, d: Decision, t_sent: float, t_result: float, *, frames: int,
                decode_ms: float, shown: bool, t_shown: float | None = None, emit: bool = True) -> ChunkRecord:
        res = d.result
        timings = dict(res.timings_ms) if res else {}
        rtt = (t_result - t_sent) * 1000
        mesh_ms = float(timings.get("shard_ms", timings.get("total", 0.0)))
        leader_ms = float(timings.get("leader_ms", mesh_ms))
        rec = ChunkRecord(
            chunk_index=plan.chunk_index, call_id=d.call_id, cache_epoch=d.cache_epoch, frames=frames,
            recompute=plan.do_kv_recompute, t_sent=t_sent, t_result=t_result,
            t_shown=t_shown if t_shown is not None else t_result, round_trip_ms=rtt, mesh_ms=mesh_ms,
            leader_ms=leader_ms, decode_ms=decode_ms, pp_overhead_ms=max(0.0, rtt - leader_ms), shown=shown,
        )
        if not shown:
            log.info("stale result dropped: call_id=%d chunk_index=%d cache_epoch=%d (now cache_epoch=%d)",
                     d.call_id, plan.chunk_index, d.cache_epoch, self.m.cache_epoch)
        self.records.append(rec)
        if emit:
            emit_event("chunk", **asdict(rec))
        return rec

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
                   "recomputes": st.recomputes, "noops": st.noops, "hard_cuts": st.hard_cuts,
                   "prompt_changes": self.prompt_changes, "reencoded": self.reencoded,
                   "stale_results": sum(1 for r in self.records if not r.shown)},
        )


def summarise(records: Sequence[ChunkRecord], ready_at: float | None) -> dict[str, Any]:
    """chunks (shown), frames, stale (results dropped by the epoch fence), epochs (of the shown chunks),
    video fps (steady: after the first shown chunk), p50/p99 period, time to first frame."""
    shown = [r for r in records if r.shown]
    periods = [r.period_ms for r in shown if r.period_ms is not None]
    out: dict[str, Any] = {"chunks": len(shown), "frames": sum(r.frames for r in shown),
                           "stale": len(records) - len(shown), "epochs": len({r.cache_epoch for r in shown})}
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
