"""The real ``FrontAPI``: the front rank's engine (rank 0 of ``pp1 serve``: the PP1 front, or pure TP's
rank 0), seen by the server. It decides nothing of the protocol: every request becomes a request to the
front's engine (``FrontEngine.request_stream / request_cut / request_pause / request_stop``), which the
front's machine (``fsm/front.py``) applies between steps; it encodes prompts on the caller's thread
(never the engine's), keeps a status snapshot for the server (refreshed by a poller thread, so that
``status()`` never waits), and hands every shown chunk to the subscribers.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from pp1.adapters.front.engine import FrameBatch as EngineBatch
from pp1.adapters.front.report import ChunkRecord, EngineOutcome
from pp1.adapters.roles.context import RankContext
from pp1.adapters.roles.front import pace_for
from pp1.fsm.base import FailureCause
from pp1.fsm.blame import root_cause
from pp1.fsm.lifecycle import job_load_status
from pp1.pipelines.loader import DEFAULT_PIPELINE, load_factory
from pp1.protocol.schedule import FRAMES_PER_LATENT, p99

from .front_api import (
    Cause,
    ChunkCounters,
    FrameBatch,
    FrontEvent,
    FrontInfo,
    FrontRefused,
    FrontStatus,
    PipelineLoad,
    RankStatus,
    StreamEnded,
    StreamParameters,
    StreamTimings,
    Subscriber,
)

log = logging.getLogger("pp1.server.front")

FAILING_EXIT_NOTICE_S = 0.5  # what a failing exit gives the viewers' stream_ended notice to go out

SUPPORTED = frozenset({"prompts", "seed", "recompute_every", "reset_cache", "paused", "input_mode"})
VAE_SPATIAL = 8  # Wan's VAE: a latent pixel is 8 x 8 video pixels
POLL_S = 0.25
RECORDS = 240  # the rolling window of the status' timings


def blend(conditionings: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted blend of several prompts' conditionings (weights normalised; one prompt: itself)."""
    if len(conditionings) == 1:
        return conditionings[0]
    total = sum(weights)
    mixed = sum(c.float() * (w / total) for c, w in zip(conditionings, weights, strict=True))
    return mixed.to(conditionings[0].dtype)  # type: ignore[union-attr]


def _cause(entry: dict[str, Any] | None) -> Cause | None:
    c = (entry or {}).get("cause")  # the board is loose data: take the fields the API knows
    return Cause(**{k: v for k, v in c.items() if k in Cause.model_fields}) if c else None


class RankFront:
    """The FrontAPI of this rank (it must host the front)."""

    def __init__(self, ctx: RankContext, fps: float) -> None:
        self.ctx = ctx
        cfg = ctx.config
        factory = load_factory(cfg.pipeline, cfg.pipeline_options)
        g = factory.geometry(cfg.preset)
        self._info = FrontInfo(
            pipeline=getattr(factory, "name", cfg.pipeline), preset=cfg.preset, topology=cfg.topology,
            mesh_size=cfg.mesh_size, world_size=cfg.world_size, width=g.latent_width * VAE_SPATIAL,
            height=g.latent_height * VAE_SPATIAL, fps=fps, chunk_frames=FRAMES_PER_LATENT * g.latent_frames,
            paced=pace_for(ctx.options, g.latent_frames) is not None,
            reference_weights=cfg.pipeline == DEFAULT_PIPELINE, supported_parameters=SUPPORTED,
            default_prompt=ctx.options.prompt,
        )
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._records: deque[ChunkRecord] = deque(maxlen=RECORDS)
        self._accept_after_epoch: int | None = None  # frames of epochs after this one belong to the stream
        self._streaming = False
        self._paused = False
        self._stream_started: float | None = None
        self._first_frame_s: float | None = None
        self._prompt_changed: float | None = None
        self._prompt_first_frame_s: float | None = None
        self._ended: StreamEnded | None = None
        self._status = self._snapshot()
        ctx.frame_sinks.append(self._on_frames)
        ctx.outcome_sinks.append(self._on_outcome)
        ctx.exit_sinks.append(self._on_failing_exit)
        self._poller = threading.Thread(target=self._poll, name="pp1-front-status", daemon=True)
        self._poller.start()

    # -- FrontAPI -------------------------------------------------------------------------------------
    def info(self) -> FrontInfo:
        return self._info

    def status(self) -> FrontStatus:
        return self._status

    def start(self, params: StreamParameters) -> None:
        engine = self._serving_engine()
        if self._streaming:
            raise FrontRefused("a stream is already running", code="busy")
        prompt, conditioning = self._conditioning(params, engine, default=True)
        with self._lock:
            self._accept_after_epoch = engine.machine.chunk.cache_epoch  # the start's cut opens a later one
            self._streaming, self._paused = True, bool(params.paused)
            self._stream_started, self._first_frame_s = time.monotonic(), None
            self._prompt_changed, self._prompt_first_frame_s = None, None
        engine.request_stream(True, seed=params.seed, recompute_every=params.recompute_every, prompt=prompt,
                              conditioning=conditioning)
        if params.paused:
            engine.request_pause(True)

    def update(self, params: StreamParameters) -> None:
        engine = self._serving_engine()
        if not self._streaming:
            raise FrontRefused("no stream is running: start one first", code="no_stream")
        given = params.given()
        cut = any(k in given for k in ("prompts", "seed", "recompute_every")) or bool(params.reset_cache)
        if cut:
            prompt, conditioning = self._conditioning(params, engine, default=False)
            if conditioning is not None:
                self._prompt_changed, self._prompt_first_frame_s = time.monotonic(), None
            engine.request_cut("parameters changed" if conditioning is None else f"prompt change to {prompt!r}",
                               seed=params.seed, recompute_every=params.recompute_every, prompt=prompt,
                               conditioning=conditioning)
        if params.paused is not None:
            self._paused = params.paused
            engine.request_pause(params.paused)

    def stop(self) -> None:
        engine = self.ctx.engine
        with self._lock:
            self._streaming, self._paused = False, False
            self._accept_after_epoch = None  # from now on no frame of this stream is delivered
        if engine is not None:
            engine.request_stream(False)

    def request_shutdown(self, reason: str) -> None:
        """The SIGTERM path of the whole rank (its lifecycle decides what a signal means now)."""
        log.warning("shutdown requested: %s", reason)
        os.kill(os.getpid(), signal.SIGTERM)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)
            ended = self._ended

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        if ended is not None:
            callback(ended)
        return unsubscribe

    # -- requests -----------------------------------------------------------------------------------
    def _serving_engine(self) -> Any:
        engine = self.ctx.engine
        if engine is None or not self.ctx.lifecycle.ready:
            raise FrontRefused("the mesh is not ready (see /ready)", code="not_ready")
        return engine

    def _conditioning(self, params: StreamParameters, engine: Any, default: bool) -> tuple[str | None, Any]:
        """(prompt, its conditioning) from ``params.prompts``, encoded here (the caller's thread)."""
        prompts = [(p.text, p.weight) for p in params.prompts] if params.prompts else []
        if not prompts:
            if not default:
                return None, None
            prompts = [(self._info.default_prompt, 1.0)]
        if sum(w for _, w in prompts) <= 0:
            raise FrontRefused("the prompts' weights sum to 0", field="prompts", code="invalid")
        conds = [engine.conditioning_for(text) for text, _ in prompts]
        label = " | ".join(f"{t} ({w:g})" if len(prompts) > 1 else t for t, w in prompts)
        return label, blend(conds, [w for _, w in prompts])

    # -- from the engine's thread ---------------------------------------------------------------------
    def _on_frames(self, batch: EngineBatch) -> None:
        rec = batch.record
        with self._lock:
            self._records.append(rec)
            after = self._accept_after_epoch
            if after is None or rec.cache_epoch <= after:
                return
            now = time.monotonic()
            if self._first_frame_s is None and self._stream_started is not None:
                self._first_frame_s = now - self._stream_started
            if self._prompt_changed is not None and self._prompt_first_frame_s is None:
                self._prompt_first_frame_s = now - self._prompt_changed
            subscribers = list(self._subscribers)
        event = FrameBatch(frames=batch.frames, chunk_index=rec.chunk_index, cache_epoch=rec.cache_epoch,
                           call_id=rec.call_id, t_decoded=rec.t_shown)
        for cb in subscribers:
            cb(event)

    def _on_outcome(self, outcome: EngineOutcome) -> None:
        self._status = self._snapshot()
        cause = self._status.failure
        ended = StreamEnded(reason="shutdown" if outcome.ok else "mesh_failed",
                            detail=cause.reason if cause else outcome.reason, cause=cause)
        self._publish(ended)

    def _on_failing_exit(self, reason: str) -> None:
        """The rank exits failing before its engine told how the stream ended (e.g. torchrun's SIGTERM to a
        job that already failed: no drain could finish): the viewers still get ``stream_ended`` with the
        cause, and a moment (bounded) for the notice to go out."""
        with self._lock:
            ended = self._ended
        if ended is not None:
            return
        self._status = self._snapshot()
        cause = self._status.failure
        self._publish(StreamEnded(reason="mesh_failed", detail=cause.reason if cause else reason, cause=cause))
        time.sleep(FAILING_EXIT_NOTICE_S)

    def _publish(self, event: FrontEvent) -> None:
        with self._lock:
            if isinstance(event, StreamEnded):
                self._ended = event
            subscribers = list(self._subscribers)
        self._status = self._snapshot()
        for cb in subscribers:
            cb(event)

    # -- status -------------------------------------------------------------------------------------
    def _poll(self) -> None:
        while True:
            try:
                self._status = self._snapshot()
            except Exception as exc:  # the status must never take the server down
                log.debug("status snapshot failed: %s", exc)
            time.sleep(POLL_S)

    def _snapshot(self) -> FrontStatus:
        ctx = self.ctx
        entries = ctx.progress.snapshot() if ctx.progress is not None else [None] * ctx.config.world_size
        mine = ctx.lifecycle.state
        states = [e.get("state") if e else None for e in entries]
        states[ctx.rt.rank] = mine
        ranks = tuple(
            RankStatus(rank=r, role=(e or {}).get("role") or ctx.config.role_of(r), state=states[r] or "starting",
                       last_error=(_cause(e).reason if _cause(e) else None), cause=_cause(e),
                       pid=(e or {}).get("pid"))
            for r, e in enumerate(entries))
        status, stage = job_load_status(states)
        reports = {r: FailureCause(**{"blame": None, **e["cause"]}) for r, e in enumerate(entries)
                   if e and e.get("cause")}
        own = ctx.lifecycle.failure or (ctx.engine.machine.failure if ctx.engine is not None else None)
        if own is not None:
            reports[ctx.rt.rank] = own
        root = root_cause(reports, roles={r.rank: r.role for r in ranks})
        failure = (Cause(rank=root.rank, phase=root.phase, reason=root.reason, kind=root.kind, blame=root.blame)
                   if root else None)
        engine = ctx.engine
        counters = ChunkCounters()
        if engine is not None:
            st = engine.machine.chunk.stats
            counters = ChunkCounters(emitted=st.emitted, stale_dropped=st.discarded_stale, retries=st.retries,
                                     recomputes=st.recomputes, hard_cuts=st.hard_cuts)
        return FrontStatus(
            ready=ctx.lifecycle.ready and failure is None, streaming=self._streaming, paused=self._paused,
            ranks=ranks, pipeline=PipelineLoad(status=status, stage=stage,
                                               error=failure.reason if failure else None),
            counters=counters, timings=self._timings(), failure=failure,
        )

    def _timings(self) -> StreamTimings:
        with self._lock:
            shown = [r for r in self._records if r.shown]
            first, prompt_first = self._first_frame_s, self._prompt_first_frame_s
        periods = [r.period_ms for r in shown if r.period_ms is not None]
        if not shown:
            return StreamTimings(time_to_first_frame_s=first, prompt_to_first_frame_s=prompt_first)
        span = shown[-1].t_shown - shown[0].t_shown
        fps = sum(r.frames for r in shown[1:]) / span if len(shown) > 1 and span > 0 else None
        med = statistics.median
        mesh, decode, period = med(r.mesh_ms for r in shown), med(r.decode_ms for r in shown), \
            (med(periods) if periods else None)
        return StreamTimings(
            fps=fps, period_p50_ms=period, period_p99_ms=p99(periods) if periods else None, mesh_ms=mesh,
            decode_ms=decode, overlap_score=(max(mesh, decode) / period) if period else None,
            pp_overhead_ms=med(r.pp_overhead_ms for r in shown), time_to_first_frame_s=first,
            prompt_to_first_frame_s=prompt_first,
        )
