"""The front's engine: the executor of the :class:`FrontMachine` (``fsm/front.py``) over the way to the
leader (the PP channel, or pure TP's in-process leader), with stage 0. It is the ONE owner of that
way: chunks, heartbeat NOOPs, SHUTDOWN all go out from the thread running :meth:`FrontEngine.run`.
The machine decides everything (what to send, when to wait, decode, show, drop, exit); this performs
it: builds each envelope's tensors (the conditioning of its epoch, the noise of (seed, chunk_index),
the context frames of a recompute), sends, receives, decodes, shows, and keeps what it needs as data
(the latents received, the history of latents and decoded keyframes per epoch, the records).

Other threads talk to it only through :meth:`request_stop`, :meth:`request_cut` and
:meth:`request_prompt` (fed to the machine between steps).

Prompt change (:meth:`request_prompt`, the one way to change the prompt): the caller's thread encodes
the conditioning (never the engine's: heartbeats keep flowing); the machine applies it as a hard cut
(``cache_epoch`` + 1; a chunk in flight is received and dropped, never decoded or shown; a chunk
received but not decoded yet is not shown); the new epoch's chunks carry the new conditioning.

Context frames (``RunConfig.context_source``), for a recompute of chunk p carrying n latent frames, epoch
latent frames [s, s + n) with s = p * T - n (``pp1.protocol.schedule.window_start``):
- ``"latents"``: those latents as the mesh generated them (cheap).
- ``"reencode"`` (Krea / Self-Forcing, parity with single-GPU): latent frame s is replaced by
  ``stage0.encode`` of ONE decoded video frame, the last frame latent s decoded to (a causal start; the
  VAE encodes 4k+1 frames as a fresh start, Krea's ``decoded_frame_buffer[:, :1]``); when s == 0 the
  epoch's own first latent frame is kept (``schedule.reencode_frame``). When the frame lies in the chunk
  not decoded yet, the machine decodes that chunk before the recompute goes out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from pp1.adapters.front.report import ChunkRecord, EngineOutcome
from pp1.adapters.rank.executor import Executor
from pp1.adapters.rank.faults import FaultPlan
from pp1.adapters.rank.observe import emit_event
from pp1.adapters.transport.interface import FrontEnd
from pp1.fsm.base import Event, Intent
from pp1.fsm.events import (
    CutRequested,
    Decoded,
    PairWarm,
    PauseRequested,
    ReadyReceived,
    ResultReceived,
    Sent,
    StopRequested,
    StreamRequested,
    Woke,
)
from pp1.fsm.front import FrontMachine
from pp1.fsm.intents import (
    AwaitReady,
    AwaitResult,
    Decode,
    Drop,
    Idle,
    KeepLatents,
    SendEnvelope,
    Show,
    WarmPair,
)
from pp1.pipelines.interface import Stage0
from pp1.protocol.codec import dtype_name
from pp1.protocol.errors import LocalProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import T_CONDITIONING, T_CONTEXT, T_NOISE, Action, PPEnvelopeV1
from pp1.protocol.schedule import keyframe_index
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.front.engine")


@dataclass
class FrameBatch:
    """One shown chunk: its uint8 frames [F, H, W, 3] (CPU), its record, and the latents they came from."""

    frames: torch.Tensor
    record: ChunkRecord
    latents: torch.Tensor


FrameSink = Callable[[FrameBatch], None]


def announce(env: PPEnvelopeV1, tensors: Sequence[torch.Tensor]) -> PPEnvelopeV1:
    """``env`` announcing ``tensors``, an INFER's conditioning, noise and (recompute) context frames, in
    travel order (the preflight checks them against the geometry)."""
    specs = tuple(TensorSpec(name=nm, dtype=dtype_name(t.dtype), shape=tuple(t.shape))
                  for nm, t in zip((T_CONDITIONING, T_NOISE, T_CONTEXT), tensors, strict=False))
    return env.model_copy(update={"tensors": specs})


@dataclass
class _Received:
    """What arrived for one call, kept until it is shown or dropped."""

    latents: torch.Tensor
    timings_ms: dict[str, float]
    decode: Decode | None = None
    frames: torch.Tensor | None = None
    decode_ms: float = 0.0


@dataclass
class History:
    """The latents (and, for re-encode, one decoded keyframe per latent frame) of each epoch, by epoch latent
    frame; what the machine's ``KeepLatents`` / ``Decode`` intents say to keep."""

    latents: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)  # epoch -> [(first, [C,T,h,w])]
    keyframes: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # epoch -> frame -> [1,H,W,3]

    def keep(self, epoch: int, first_frame: int, latents: torch.Tensor, keep_from: int) -> None:
        for old in [e for e in self.latents if e < epoch]:  # a new epoch: the old ones are never needed again
            del self.latents[old]
            self.keyframes.pop(old, None)
        chunks = self.latents.setdefault(epoch, [])
        chunks.append((first_frame, latents))
        self.latents[epoch] = [(f, t) for f, t in chunks if f + int(t.shape[1]) > keep_from]
        frames = self.keyframes.get(epoch, {})
        for k in [k for k in frames if k < keep_from]:
            del frames[k]

    def window(self, epoch: int, start: int, n: int) -> torch.Tensor:
        """Epoch latent frames [start, start + n) along dim 1."""
        parts = [t[:, max(0, start - f): start + n - f] for f, t in self.latents.get(epoch, [])
                 if f < start + n and f + int(t.shape[1]) > start]
        if not parts or sum(int(p.shape[1]) for p in parts) != n:
            have = sum(int(p.shape[1]) for p in parts)
            raise LocalProtocolError("envelope.context_frames", f"need latent frames [{start}, {start + n}) of "
                                     f"cache_epoch {epoch}, have {have}", "missing_context_frames")
        return torch.cat(parts, dim=1).contiguous()


class FrontEngine(Executor):
    """Performs a FrontMachine's intents. ``conditioning``: the first prompt's, encoded before READY;
    ``on_frames``: called for every shown chunk (on this thread)."""

    machine: FrontMachine

    def __init__(
        self,
        machine: FrontMachine,
        channel: FrontEnd,
        stage0: Stage0,
        geometry: ChunkGeometry,
        *,
        conditioning: torch.Tensor,
        prompt: str = "",
        faults: FaultPlan | None = None,
        on_frames: FrameSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[Executor, float], None] | None = None,
    ) -> None:
        super().__init__(machine, clock, wait)
        self.channel = channel
        self.stage0 = stage0
        self.geometry = geometry
        self.prompt = prompt
        self.faults = faults or FaultPlan(machine.rank)
        self.sinks: list[FrameSink] = [on_frames] if on_frames is not None else []
        self.records: list[ChunkRecord] = []
        self.reencoded = 0
        self.prompt_changes = 0
        self.last_shown: float | None = None
        self.history = History()
        self._conditioning: dict[int, torch.Tensor] = {0: conditioning}  # epoch -> conditioning from then on
        self._received: dict[int, _Received] = {}  # call_id -> what arrived, until shown or dropped
        self._idle_reported = False
        self._loop_thread: int | None = None
        self.ready_at: float | None = None
        self.started_at = clock()  # the rank's start, for the READY event (set by the role)
        self.exit_reason = ""

    # -- requests from other threads -----------------------------------------------------------------
    def request_stop(self) -> None:
        """Drain the job: finish what is in flight, SHUTDOWN through the mesh, exit 0."""
        self.post(StopRequested(self.clock()))

    def request_cut(self, reason: str, *, seed: int | None = None, recompute_every: int | None = None,
                    prompt: str | None = None, conditioning: torch.Tensor | None = None) -> None:
        """A hard cut (thread-safe): a new epoch from the next chunk on; with ``conditioning``, the new
        epoch's (a prompt change), with ``seed`` / ``recompute_every``, its parameters."""
        self._post(CutRequested(reason, self.clock(), seed, recompute_every), prompt, conditioning)

    def request_prompt(self, prompt: str, conditioning: torch.Tensor | None = None) -> None:
        """Change the prompt: a hard cut with a new conditioning (thread-safe; the one way to change it).
        ``conditioning`` defaults to ``stage0.encode_prompt(prompt)``, run HERE on the caller's thread."""
        conditioning = self.conditioning_for(prompt, conditioning)
        self._post(CutRequested(f"prompt change to {prompt!r}", self.clock()), prompt, conditioning)

    def request_stream(self, on: bool, *, seed: int | None = None, recompute_every: int | None = None,
                       prompt: str | None = None, conditioning: torch.Tensor | None = None) -> None:
        """Start (a fresh epoch, with this conditioning) or end the stream (thread-safe)."""
        self._post(StreamRequested(on, self.clock(), seed, recompute_every), prompt, conditioning)

    def request_pause(self, paused: bool) -> None:
        self.post(PauseRequested(paused, self.clock()))

    def conditioning_for(self, prompt: str, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """``conditioning`` (checked), or ``stage0.encode_prompt(prompt)`` on the CALLER's thread (refused on
        the engine's own: its heartbeats would stall while the text encoder runs)."""
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
        return conditioning

    def _post(self, event: Event, prompt: str | None, conditioning: torch.Tensor | None) -> None:
        if conditioning is not None:
            self.post(_Bound(event, prompt or self.prompt, conditioning))  # type: ignore[arg-type]
        else:
            self.post(event)

    def add_sink(self, sink: FrameSink) -> None:
        self.sinks.append(sink)

    def _apply_requests(self) -> None:  # a request's conditioning is bound to the epoch its cut opens
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return
            event = item.event if isinstance(item, _Bound) else item
            before = self.machine.chunk.cache_epoch
            out = self.machine.handle(event)
            epoch = self.machine.chunk.cache_epoch
            if isinstance(item, _Bound) and epoch != before:
                self._conditioning[epoch] = item.conditioning
                if item.prompt != self.prompt:
                    self.prompt, self.prompt_changes = item.prompt, self.prompt_changes + 1
                    emit_event("prompt", cache_epoch=epoch, prompt=item.prompt[:200])
            self.pending.extendleft(reversed(out))

    # -- the intents --------------------------------------------------------------------------------
    def perform(self, it: Intent) -> Event | None:
        if isinstance(it, SendEnvelope):
            return self._send(it)
        if isinstance(it, AwaitResult):
            result, tensors = self.channel.recv_result(it.until)
            if tensors:
                self._received[result.call_id] = _Received(tensors[0], dict(result.timings_ms))
            return ResultReceived(result, self.clock())
        if isinstance(it, KeepLatents):
            self.history.keep(it.cache_epoch, it.first_frame, self._received[it.call_id].latents, it.keep_from)
            return None
        if isinstance(it, Decode):
            return self._decode(it)
        if isinstance(it, Show):
            self._show(it.call_id)
            return None
        if isinstance(it, Drop):
            self._drop(it)
            return None
        if isinstance(it, Idle):
            if not self._idle_reported and self.machine.done:
                self._idle_reported = True
                emit_event("idle", accepted=self.machine.accepted)
                self.faults.check("idle")
            self.wait_for_request(it.until)
            return Woke(self.clock())
        if isinstance(it, WarmPair):
            self.channel.warm_pair(self.machine.warm_timeout_s)
            return PairWarm(self.clock())
        if isinstance(it, AwaitReady):
            ready = self.channel.recv_ready(it.until)
            self.ready_at = self.clock()
            emit_event("ready", mesh_size=ready.mesh_size, warmup_ms=list(ready.warmup_ms),
                       startup_s=self.ready_at - self.started_at)
            self.faults.check("ready")
            return ReadyReceived(ready, self.ready_at)
        raise TypeError(f"front: no way to perform {it!r}")

    def peer_of(self, intent: Intent) -> int | None:
        return self.machine.chunk.peer_rank

    # -- sending -------------------------------------------------------------------------------------
    def _send(self, it: SendEnvelope) -> Event:
        env, t0 = it.envelope, self.clock()
        tensors: list[torch.Tensor] = []
        preflight = True
        if env.action is Action.INFER:
            try:
                tensors = self._tensors_for(it)
            except LocalProtocolError as err:
                self._refused(env, err)
                raise
            env = announce(env, tensors)
            env, tensors, preflight = self._inject(env, tensors)
        try:
            self.channel.send_envelope(env, tensors, timeout_s=it.timeout_s, preflight=preflight)
        except LocalProtocolError as err:
            self._refused(env, err)
            raise
        (log.info if env.action is Action.INFER else log.debug)(
            "sent %s call_id=%d chunk_index=%d cache_epoch=%d recompute=%s", env.action.value, env.call_id,
                 env.chunk_index, env.cache_epoch, env.do_kv_recompute)
        if env.action is Action.INFER:
            self.faults.check(f"sent:{env.chunk_index}")
        return Sent(self.clock(), started_at=t0)

    def _refused(self, env: PPEnvelopeV1, err: LocalProtocolError) -> None:
        log.error("refused before sending: %s call_id=%d chunk_index=%d cache_epoch=%d: %s", env.action.value,
                  env.call_id, env.chunk_index, env.cache_epoch, err)
        emit_event("refused", call_id=env.call_id, chunk_index=env.chunk_index, code=err.code, reason=str(err))

    def _conditioning_of(self, epoch: int) -> torch.Tensor:
        return self._conditioning[max(e for e in self._conditioning if e <= epoch)]

    def _tensors_for(self, it: SendEnvelope) -> list[torch.Tensor]:
        env = it.envelope
        tensors = [self._conditioning_of(env.cache_epoch), self.stage0.make_noise(env.seed, env.chunk_index)]
        if env.do_kv_recompute:
            tensors.append(self._context(it))
        return tensors

    def _context(self, it: SendEnvelope) -> torch.Tensor:
        """The context frames of a recompute (module docstring: "latents" or "reencode")."""
        env, g = it.envelope, self.geometry
        ctx = self.history.window(env.cache_epoch, it.context_start, it.context_frames)
        if it.reencode is None:
            return ctx
        frame = self.history.keyframes.get(env.cache_epoch, {}).get(it.reencode)
        if frame is None:
            raise LocalProtocolError("envelope.context_frames", f"re-encode: latent frame {it.reencode} of "
                                     f"cache_epoch {env.cache_epoch} has no decoded frame", "missing_context_frames")
        first = self.stage0.encode(frame)  # one frame = 4*0 + 1: a causal start, one latent frame
        if tuple(first.shape) != tuple(g.context_shape(1)):
            raise LocalProtocolError("envelope.context_frames", f"re-encode gave {tuple(first.shape)}, expected "
                                     f"{g.context_shape(1)}", "bad_context_frames")
        ctx = ctx.clone()
        ctx[:, :1] = first.to(ctx.device, ctx.dtype)
        self.reencoded += 1
        log.debug("context re-encoded: latent frame %d from its decoded frame call_id=%d chunk_index=%d "
                  "cache_epoch=%d", it.reencode, env.call_id, env.chunk_index, env.cache_epoch)
        return ctx

    def _inject(self, env: PPEnvelopeV1, tensors: list[torch.Tensor]) -> tuple[PPEnvelopeV1, list[torch.Tensor], bool]:
        """Apply a message-level fault planned for this chunk (fault drills only)."""
        fault = self.faults.check(f"chunk:{env.chunk_index}")
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

    # -- decoding and showing ------------------------------------------------------------------------
    def _decode(self, it: Decode) -> Event:
        got = self._received[it.call_id]
        t0 = self.clock()
        frames = self.stage0.decode(got.latents, first_chunk=it.chunk_index == 0)
        if frames.device.type != "cpu":  # frames leave the GPU for the video track; this also syncs the decode
            frames = frames.cpu()
        got.frames, got.decode_ms, got.decode = frames, (self.clock() - t0) * 1000, it
        if self.machine.chunk.context_source == "reencode":
            self._keep_keyframes(it, frames)
        return Decoded(it.call_id, self.clock())

    def _keep_keyframes(self, it: Decode, frames: torch.Tensor) -> None:
        """For reencode: the last decoded frame of each latent frame a later window may start at."""
        t = self.geometry.latent_frames
        kept = self.history.keyframes.setdefault(it.cache_epoch, {})
        for j in range(it.first_frame, it.first_frame + t):
            idx = keyframe_index(j, it.chunk_index, t, int(frames.shape[0]))
            if idx is not None:
                kept[j] = frames[idx: idx + 1].clone()

    def _show(self, call_id: int) -> None:
        got = self._received.pop(call_id)
        it = got.decode
        assert got.frames is not None and it is not None
        now = self.clock()
        rec = self._record(it, got, shown=True, t_shown=now)
        if self.last_shown is not None:
            rec.period_ms = (now - self.last_shown) * 1000
        self.last_shown = now
        emit_event("chunk", **asdict(rec))
        batch = FrameBatch(got.frames, rec, got.latents)
        for sink in self.sinks:
            sink(batch)

    def _drop(self, it: Drop) -> None:
        got = self._received.pop(it.call_id, None)
        log.info("result dropped (%s): call_id=%d chunk_index=%d cache_epoch=%d", it.why, it.call_id,
                 it.chunk_index, it.cache_epoch)
        rec = self._record(it, got, shown=False, t_shown=self.clock())
        emit_event("chunk", **asdict(rec))

    def _record(self, it: Decode | Drop, got: _Received | None, *, shown: bool, t_shown: float) -> ChunkRecord:
        timings = got.timings_ms if got else {}
        rtt = (it.received_at - it.sent_at) * 1000
        mesh_ms = float(timings.get("shard_ms", timings.get("total", 0.0)))
        leader_ms = float(timings.get("leader_ms", mesh_ms))
        frames = int(got.frames.shape[0]) if shown and got is not None and got.frames is not None else 0
        rec = ChunkRecord(
            chunk_index=it.chunk_index, call_id=it.call_id, cache_epoch=it.cache_epoch, frames=frames,
            recompute=it.recompute, t_sent=it.sent_at, t_result=it.received_at,
            t_shown=t_shown if shown else it.received_at, round_trip_ms=rtt, mesh_ms=mesh_ms, leader_ms=leader_ms,
            decode_ms=got.decode_ms if got and shown else 0.0, pp_overhead_ms=max(0.0, rtt - leader_ms),
            shown=shown,
        )
        self.records.append(rec)
        return rec

    # -- the run -------------------------------------------------------------------------------------
    def outcome(self, code: int, reason: str) -> EngineOutcome:
        m = self.machine
        st = m.chunk.stats
        ok = code == 0
        return EngineOutcome(
            ok=ok, state=m.state, reason="stopped" if ok else str(m.failure or reason), poisoned=m.chunk.poisoned,
            records=list(self.records),
            stats={"emitted": st.emitted, "retries": st.retries, "discarded_stale": st.discarded_stale,
                   "recomputes": st.recomputes, "noops": st.noops, "hard_cuts": st.hard_cuts,
                   "prompt_changes": self.prompt_changes, "reencoded": self.reencoded,
                   "stale_results": sum(1 for r in self.records if not r.shown)},
        )

    def run_to_end(self, now: float | None = None) -> EngineOutcome:
        """Start the machine and perform until it exits."""
        self._loop_thread = threading.get_ident()
        ex = self.run(self.machine.start(self.clock() if now is None else now))
        self.exit_reason = ex.reason
        return self.outcome(ex.code, ex.reason)


@dataclass(frozen=True)
class _Bound:
    """A request whose conditioning belongs to the epoch its cut opens (a prompt change, a stream start)."""

    event: Event
    prompt: str
    conditioning: torch.Tensor
