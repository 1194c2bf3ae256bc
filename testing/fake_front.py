"""A fake ``FrontAPI`` for the server's tests and the dev entry: no mesh, no model.

A thread plays the job: every rank walks its real lifecycle machine (``pp1.fsm.lifecycle``) through
startup over ``startup_s`` seconds, then serves. While a stream runs it "decodes" a chunk of
``chunk_frames`` frames every ``chunk_frames / fps`` seconds: a background colour chosen by the
prompt (so a prompt change shows), a white bar that moves one step per frame (so motion shows) and
a stripe per cache epoch. Faults are injected with ``fail`` (the mesh failed, with a cause) and
``fail_during_startup``; ``request_shutdown`` drains like the real front.

Every call the server makes is recorded in ``calls`` (tests assert that bad input changed nothing).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pp1.fsm.lifecycle import LOADING, LifecycleMachine, job_load_status, make_lifecycle
from pp1.server.front_api import (
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

log = logging.getLogger("pp1.testing.fake_front")

FAKE_SUPPORTED = frozenset({"prompts", "seed", "recompute_every", "reset_cache", "paused",
                            "prompt_interpolation_method", "input_mode"})

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "blue": (40, 90, 220), "green": (40, 180, 60), "yellow": (230, 200, 30),
    "purple": (170, 60, 200), "cyan": (30, 190, 190), "orange": (240, 120, 20), "grey": (120, 120, 120),
}


def prompt_colour(text: str) -> tuple[int, int, int]:
    """The background colour a prompt paints: the first colour word it names, else one chosen by
    its hash (deterministic)."""
    for word in text.lower().replace(",", " ").split():
        if word in PALETTE:
            return PALETTE[word]
    colours = list(PALETTE.values())
    return colours[hashlib.sha256(text.encode()).digest()[0] % len(colours)]


@dataclass(frozen=True)
class Job:
    """What one chunk is rendered from (taken under the lock, rendered outside it)."""

    prompt: str
    cache_epoch: int
    chunk_index: int
    call_id: int
    frame_number: int
    params: dict[str, Any]


def startup_events(lc: LifecycleMachine) -> list[str]:
    """The lifecycle table's events from init up to and including ``warmup_done``."""
    out: list[str] = []
    for event, _src, _dst in lc.TRANSITIONS:
        out.append(event)
        if event == "warmup_done":
            return out
    raise ValueError(f"{lc.NAME} has no warmup_done")


class FakeFront:
    """A ``FrontAPI`` (structurally) whose frames come from a thread, see the module docstring."""

    def __init__(
        self,
        *,
        width: int = 128,
        height: int = 128,
        fps: float = 24.0,
        chunk_frames: int = 12,
        mesh_size: int = 2,
        topology: str = "pp1",
        pipeline: str = "fake",
        preset: str = "fake",
        reference_weights: bool = True,
        supported_parameters: frozenset[str] = FAKE_SUPPORTED,
        startup_s: float = 0.0,
        default_prompt: str = "a calm sea at dawn",
    ) -> None:
        world = mesh_size + (1 if topology == "pp1" else 0)
        self._info = FrontInfo(
            pipeline=pipeline, preset=preset, topology=topology, mesh_size=mesh_size, world_size=world,  # type: ignore[arg-type]
            width=width, height=height, fps=fps, chunk_frames=chunk_frames, reference_weights=reference_weights,
            supported_parameters=supported_parameters, default_prompt=default_prompt,
        )
        roles = (["front", "leader"] + ["worker"] * (mesh_size - 1)) if topology == "pp1" else \
            (["tp_rank0"] + ["worker"] * (mesh_size - 1))
        self.lifecycles: list[LifecycleMachine] = [make_lifecycle(r, i) for i, r in enumerate(roles)]
        self._startup_s = startup_s
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._subs: dict[int, Subscriber] = {}
        self._next_sub = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # stream state
        self.streaming = False
        self.paused = False
        self.params: dict[str, Any] = {}
        self.prompt = default_prompt
        self.cache_epoch = 0
        self.chunk_index = 0
        self.call_id = 0
        self.frame_number = 0
        self.counters = {"emitted": 0, "stale_dropped": 0, "retries": 0, "recomputes": 0, "hard_cuts": 0}
        self._periods: list[float] = []
        self._last_emit: float | None = None
        self._started_at: float | None = None
        self._ttff: float | None = None
        self._prompt_at: float | None = None
        self._prompt_epoch: int | None = None
        self._prompt_ttff: float | None = None
        self._failure: Cause | None = None
        self._ended = False
        self._load_error: str | None = None
        self._fail_startup: tuple[int, str] | None = None
        self._next_at = 0.0
        self._mesh_ms: float | None = None  # none: the fake renders nothing
        self._decode_ms: float | None = None
        self._thread = threading.Thread(target=self._run, name="fake-front-comms", daemon=True)
        self._thread.start()

    # -- FrontAPI -------------------------------------------------------------------------------------
    def info(self) -> FrontInfo:
        return self._info

    def status(self) -> FrontStatus:
        with self._lock:
            ranks = tuple(RankStatus(rank=lc.rank, role=lc.ctx["role"], state=lc.state,
                                     last_error=lc.failure.reason if lc.failure else None,
                                     cause=_cause(lc)) for lc in self.lifecycles)
            ready = self._ready()
            status, stage = job_load_status([lc.state for lc in self.lifecycles])  # the lifecycle's rule
            if self._load_error is not None:
                load = PipelineLoad(status="error", error=self._load_error)
            elif status == "error":
                load = PipelineLoad(status="error", error=self._failure.reason if self._failure else "failed")
            else:
                load = PipelineLoad(status=status, stage=stage)
            periods = sorted(self._periods[-200:])
            timings = StreamTimings(
                fps=(self._info.chunk_frames * 1000.0 / statistics.median(periods)) if periods else None,
                period_p50_ms=statistics.median(periods) if periods else None,
                period_p99_ms=periods[max(0, round(0.99 * len(periods)) - 1)] if periods else None,
                mesh_ms=self._mesh_ms, decode_ms=self._decode_ms,
                overlap_score=None, pp_overhead_ms=None,
                time_to_first_frame_s=self._ttff, prompt_to_first_frame_s=self._prompt_ttff,
            )
            return FrontStatus(ready=ready, streaming=self.streaming, paused=self.paused, ranks=ranks,
                               pipeline=load, counters=ChunkCounters(**self.counters), timings=timings,
                               failure=self._failure)

    def start(self, params: StreamParameters) -> None:
        with self._lock:
            if not self._ready():
                raise FrontRefused("the mesh is not ready", code="not_ready")
            if self.streaming:
                raise FrontRefused("a stream is already running", code="busy")
            if params.input_mode == "video":
                raise FrontRefused("video input is not supported", field="input_mode", code="unsupported")
            self.calls.append(("start", params.given()))
            self.streaming, self.paused = True, bool(params.paused)
            self.params = params.given()
            self.prompt = params.prompts[0].text if params.prompts else self._info.default_prompt
            self._hard_cut()
            self._started_at, self._ttff = time.monotonic(), None
            self._next_at = self._started_at + self._info.chunk_frames / self._info.fps  # the first chunk's compute
            self._last_emit = None
            self._wake.notify_all()

    def update(self, params: StreamParameters) -> None:
        with self._lock:
            if not self.streaming:
                raise FrontRefused("no stream is running", code="no_stream")
            given = params.given()
            self.calls.append(("update", given))
            reset = given.pop("reset_cache", False)
            self.params.update(given)
            if params.paused is not None:
                self.paused = params.paused
            if params.prompts:
                self.prompt = params.prompts[0].text
                self._hard_cut()
                self._prompt_at, self._prompt_epoch, self._prompt_ttff = time.monotonic(), self.cache_epoch, None
            elif reset:
                self._hard_cut()
            self._wake.notify_all()

    def stop(self) -> None:
        with self._lock:
            self.calls.append(("stop", {}))
            self.streaming = False
            self._hard_cut()
            self._wake.notify_all()

    def request_shutdown(self, reason: str) -> None:
        with self._lock:
            self.calls.append(("request_shutdown", {"reason": reason}))
            if self._ended:
                return
            self._ended = True
            self.streaming = False
            for lc in self.lifecycles:
                if lc.can_fire("drain"):
                    lc.fire("drain")
                for ev in ("drained", "shutdown_received"):
                    if lc.can_fire(ev):
                        lc.fire(ev)
                if not lc.is_terminal:
                    lc.fail_with(f"shutdown during {lc.state}: {reason}", "local")
            self._wake.notify_all()
        self._emit(StreamEnded(reason="shutdown", detail=reason))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        with self._lock:
            key = self._next_sub
            self._next_sub += 1
            self._subs[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._subs.pop(key, None)

        return unsubscribe

    # -- fault injection (tests) ----------------------------------------------------------------------
    def fail(self, reason: str = "leader lost: Connection closed by peer", rank: int = 1,
             kind: str = "remote") -> Cause:
        """The mesh failed (as the front's chunk machine would report it): every stream ends."""
        with self._lock:
            if self._ended and self._failure is not None:
                return self._failure
            victim = self.lifecycles[rank]
            cause = Cause(rank=rank, phase=victim.state, reason=reason, kind=kind)  # type: ignore[arg-type]
            for lc in self.lifecycles:
                if not lc.is_terminal:
                    lc.fail_with(reason if lc is victim else f"mesh failed: rank {rank}: {reason}",
                                 "local" if lc is victim else "remote")
            self._failure, self._ended, self.streaming = cause, True, False
            self._wake.notify_all()
        self._emit(StreamEnded(reason="mesh_failed", detail=str(reason), cause=cause))
        return cause

    def fail_during_startup(self, rank: int, reason: str) -> None:
        """Make rank ``rank``'s load fail (the vote then fails every rank)."""
        with self._lock:
            self._fail_startup = (rank, reason)
            self._wake.notify_all()

    def close(self) -> None:
        """Stop the thread (tests)."""
        with self._lock:
            self._ended = True
            self.streaming = False
            self._wake.notify_all()
        self._thread.join(timeout=5)

    # -- the thread -----------------------------------------------------------------------------------
    def _ready(self) -> bool:
        return not self._ended and all(lc.ready for lc in self.lifecycles)

    def _hard_cut(self) -> None:
        self.cache_epoch += 1
        self.chunk_index = 0
        self.counters["hard_cuts"] += 1

    def _startup(self) -> None:
        # every rank moves through its table in lock step (the collectives keep them together)
        per_rank = [startup_events(lc) for lc in self.lifecycles]
        longest = max(len(evs) for evs in per_rank)
        delay = self._startup_s / max(1, longest)
        for i in range(longest):
            with self._lock:
                if self._ended:
                    return
                if self._fail_startup is not None:
                    self._fail_all(*self._fail_startup, phase="loading")
                    return
                for lc, evs in zip(self.lifecycles, per_rank, strict=True):
                    if i < len(evs) and lc.can_fire(evs[i]):
                        lc.fire(evs[i])
                loading = job_load_status([lc.state for lc in self.lifecycles]) == ("loading", LOADING)
                if delay > 0:
                    self._wake.wait(timeout=delay)
            if loading:
                self._load()  # outside the lock (a subclass builds its pipeline here)

    def _load(self) -> None:
        """Load what the frames need (the fake: nothing)."""

    def _fail_all(self, bad: int, reason: str, phase: str) -> None:
        with self._lock:
            self._load_error = f"rank {bad}: {reason}"
            for lc in self.lifecycles:
                if not lc.is_terminal:
                    lc.fail_with(reason if lc.rank == bad else f"load vote failed on rank {bad}: {reason}",
                                 "local" if lc.rank == bad else "remote")
            self._failure = Cause(rank=bad, phase=phase, reason=reason, kind="local")
            self._ended = True

    def _run(self) -> None:
        try:
            self._startup()
        except Exception as exc:  # a subclass's load failed: every rank fails, as the vote would make it
            log.exception("startup failed")
            self._fail_all(0, f"load failed: {type(exc).__name__}: {exc}", phase="loading")
            return
        period = self._info.chunk_frames / self._info.fps
        while True:
            with self._lock:
                if self._ended:
                    return
                if not self.streaming or self.paused:
                    self._wake.wait(timeout=0.5)
                    self._next_at = max(self._next_at, time.monotonic() + period)
                    continue
                now = time.monotonic()
                if now < self._next_at:
                    self._wake.wait(timeout=self._next_at - now)
                    continue
                self._next_at = max(self._next_at + period, now - period)
                job = Job(prompt=self.prompt, cache_epoch=self.cache_epoch, chunk_index=self.chunk_index,
                          call_id=self.call_id + 1, frame_number=self.frame_number, params=dict(self.params))
                self.call_id += 1
            frames = self._render(job)  # outside the lock: status() never waits for a chunk
            with self._lock:
                if self._ended or not self.streaming or job.cache_epoch != self.cache_epoch:
                    self.counters["stale_dropped"] += 1  # the epoch fence: never shown
                    continue
                self._emit(self._commit(job, frames, time.monotonic()))  # under the lock: not after stop()

    def _render(self, job: Job) -> Any:
        """The chunk's frames (uint8 [F, H, W, 3]): the prompt's colour, a moving bar, an epoch stripe."""
        info = self._info
        f = info.chunk_frames
        frames = np.empty((f, info.height, info.width, 3), dtype=np.uint8)
        frames[:] = np.asarray(prompt_colour(job.prompt), dtype=np.uint8)
        bar = max(2, info.width // 16)
        for i in range(f):
            x = (job.frame_number + i) * 2 % max(1, info.width - bar)
            frames[i, :, x : x + bar] = 255
        stripe = (job.cache_epoch * 8) % max(1, info.height - 4)
        frames[:, stripe : stripe + 4, :] = 0
        return frames

    def _commit(self, job: Job, frames: Any, now: float) -> FrameBatch:
        self.frame_number += int(frames.shape[0])
        batch = FrameBatch(frames=frames, chunk_index=job.chunk_index, cache_epoch=job.cache_epoch,
                           call_id=job.call_id, t_decoded=now)
        self.chunk_index += 1
        self.counters["emitted"] += 1
        if self._last_emit is not None:
            self._periods.append((now - self._last_emit) * 1000)
        self._last_emit = now
        if self._ttff is None and self._started_at is not None:
            self._ttff = now - self._started_at
        if self._prompt_at is not None and self._prompt_ttff is None and self.cache_epoch == self._prompt_epoch:
            self._prompt_ttff = now - self._prompt_at
        return batch

    def _emit(self, event: FrontEvent) -> None:
        with self._lock:
            subs = list(self._subs.values())
        for cb in subs:
            try:
                cb(event)
            except Exception:  # a subscriber must not break the comms thread
                log.exception("subscriber failed")


def _cause(lc: LifecycleMachine) -> Cause | None:
    f = lc.failure
    return Cause(rank=f.rank, phase=f.phase, reason=f.reason, kind=f.kind) if f else None
