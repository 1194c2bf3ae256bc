"""The one thing the server knows about the job: ``FrontAPI``, and the data it speaks.

The server (``pp1.server.app``) drives the front only through this protocol. The real
implementation (``pp1.server.front.RankFront``) wraps the front's engine on rank 0
(``pp1.adapters.front.engine.FrontEngine``: its thread, "the front's comms thread" below, owns the way to
the leader); tests use ``pp1.testing.fake_front.FakeFront``. Nothing here imports FastAPI or aiortc.

Threads (what the front may rely on, what it must honour):

- ``info()``: constant after construction; any thread; never blocks.
- ``status()``: a snapshot, from the server's event-loop thread (every HTTP status / readiness /
  metrics request): it must return in well under a millisecond and never wait on the mesh, a
  collective or a lock held across I/O.
- ``start``, ``update``, ``stop``: from a server worker thread (``asyncio.to_thread``), never two
  at once (the server serialises them), never from the front's own comms thread. They may block
  for bounded work (encoding a prompt: ``update`` is where the text encoder runs, off the comms
  thread, so heartbeats keep flowing), never for a chunk. They return once the request is queued
  for the comms thread; refusals raise ``FrontRefused`` before anything changed.
- ``request_shutdown``: any thread (a signal handler's helper, the event loop); non-blocking,
  idempotent.
- ``subscribe(callback)``: any thread; the callback is then called ON THE FRONT'S COMMS THREAD (or
  the decode thread) with a ``FrameBatch`` per decoded chunk and one ``StreamEnded`` when the
  stream ends for good (mesh failed, or shutdown). The callback never blocks (the server hands
  the object to its event loop and returns); it may be called before the subscription call
  returns. The front hands over ownership of the frames: it must not write to them afterwards.
  The returned function unsubscribes (any thread, idempotent).

Semantics the front owns (the server only validates shapes and ranges, and refuses what
``info().supported_parameters`` / ``info().input_modes`` say is unsupported):

- ``start(params)``: begin a stream from idle (READY, heartbeats only) for a new session: a fresh
  epoch and KV cache (nothing of an earlier session is shown), the session's initial parameters
  (prompts missing -> the front's default prompt). Raises ``FrontRefused`` when not ready or a
  stream is already running.
- ``update(params)``: a partial change of the running stream (fields left ``None`` are unchanged).
  The front decides what a change means: new prompts -> a hard cut through the epoch fence (or a
  blend where the pipeline supports weights); ``reset_cache`` -> a hard cut keeping the prompt;
  ``paused`` -> stop planning chunks (heartbeats only) keeping the cache, resume on False; ``seed``
  / ``recompute_every`` -> from the next epoch. Raises ``FrontRefused`` when no stream runs.
- ``stop()``: back to idle (heartbeats only). A chunk in flight is received and dropped (epoch
  fence); once ``stop`` returns, no ``FrameBatch`` of that stream is delivered.
- ``request_shutdown(reason)``: SIGTERM path: stop admitting, drain in-flight chunks, SHUTDOWN
  through the mesh, every rank exits 0; subscribers get ``StreamEnded(reason="shutdown")``.
- A mesh failure: subscribers get ``StreamEnded(reason="mesh_failed", cause=...)``; ``status()``
  then says ``ready=False`` with each rank's state and the cause, until the process exits
  non-zero after its grace period (the launcher restarts the job).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

Topology = Literal["pp1", "tp"]
LoadStatus = Literal["not_loaded", "loading", "loaded", "error"]
InputMode = Literal["text", "video"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- parameters -------------------------------------------------------------------------------------------


class PromptItem(BaseModel):
    """One prompt with its blending weight (Daydream Scope's ``PromptItem``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(..., min_length=1, max_length=2000, description="Prompt text")
    weight: float = Field(default=1.0, ge=0.0, le=1000.0, description="Weight for blending (non-negative)")


class PromptTransition(BaseModel):
    """Scope's temporal transition between prompt blends (accepted only where the front supports it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    target_prompts: list[PromptItem] = Field(..., min_length=1, max_length=8)
    num_steps: int = Field(default=4, ge=0, le=1000)
    temporal_interpolation_method: Literal["linear", "slerp"] = "linear"


class StreamParameters(BaseModel):
    """Parameters of a stream: Daydream Scope's ``Parameters`` where they overlap, plus what a PP1
    mesh adds (``seed``, ``recompute_every``). Every field is optional: a partial update names only
    what changes. Unknown fields are refused, and so are values of the wrong JSON type (strict: no
    "5" for 5, no true for 1). A field that ``FrontInfo.supported_parameters`` does not list is
    refused by the server before the front sees it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[PromptItem] | None = Field(default=None, min_length=1, max_length=8,
                                             description="Prompts with weights (a blend where supported)")
    prompt_interpolation_method: Literal["linear", "slerp"] | None = None
    transition: PromptTransition | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Noise seed (from the next epoch)")
    recompute_every: int | None = Field(default=None, ge=0, le=1000,
                                        description="KV recompute every K chunks (0: never; from the next epoch)")
    reset_cache: bool | None = Field(default=None, description="One-shot: hard cut keeping the prompt")
    paused: bool | None = Field(default=None, description="Stop generating (heartbeats only), keep the cache")
    denoising_step_list: list[int] | None = Field(default=None, min_length=1, max_length=16)
    noise_scale: float | None = Field(default=None, ge=0.0, le=1.0)
    noise_controller: bool | None = None
    manage_cache: bool | None = None
    kv_cache_attention_bias: float | None = Field(default=None, ge=0.01, le=1.0)
    input_mode: InputMode | None = Field(default=None, description="'text' (text-to-video) or 'video' (video "
                                         "input; refused unless the front lists it)")

    @field_validator("denoising_step_list")
    @classmethod
    def _steps_decreasing(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(not 0 <= t <= 1000 for t in v):
            raise ValueError("every step must be within 0..1000")
        if any(b >= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("steps must be strictly decreasing")
        return v

    def given(self) -> dict[str, Any]:
        """The fields this update names (left out: unchanged)."""
        return self.model_dump(exclude_none=True)


# -- info and status ---------------------------------------------------------------------------------------


class FrontInfo(_Frozen):
    """What the job is (constant for the life of the process)."""

    pipeline: str = Field(..., description="pipeline import path or name, e.g. 'reference'")
    preset: str
    topology: Topology
    mesh_size: int = Field(..., ge=1, description="ranks of the TP mesh (PP1: world size - 1)")
    world_size: int = Field(..., ge=1)
    width: int = Field(..., ge=1)
    height: int = Field(..., ge=1)
    fps: float = Field(..., gt=0, description="the stream's frame rate: frames are paced at it")
    chunk_frames: int = Field(..., ge=1, description="video frames a chunk decodes to (steady state)")
    paced: bool = Field(False, description="chunks are planned at fps: a faster mesh waits (the stream's "
                        "period is then the frame rate's, the mesh's own time is mesh_ms); False: --no-pace")
    reference_weights: bool = Field(..., description="True: random seeded weights (the picture is noise by design)")
    supported_parameters: frozenset[str] = Field(..., description="StreamParameters fields the front honours")
    input_modes: frozenset[InputMode] = frozenset({"text"})
    default_prompt: str = "a calm sea at dawn"
    version: str = "0.1.0"


class Cause(_Frozen):
    """Why a rank (or the mesh) failed: ``pp1.fsm.base.FailureCause`` as data."""

    rank: int
    phase: str
    reason: str
    kind: Literal["local", "remote"]
    blame: int | None = Field(default=None, description="remote: the peer's global rank this rank blames, when known")


class RankStatus(_Frozen):
    rank: int
    role: str = Field(..., description="front | leader | worker | tp_rank0")
    state: str = Field(..., description="its lifecycle state (init, parity, loading, ..., serving, failed)")
    phase: str | None = Field(default=None, description="finer progress inside the state (e.g. a loading stage)")
    last_error: str | None = None
    cause: Cause | None = None
    pid: int | None = Field(default=None, description="the rank's process id (on its host)")


class PipelineLoad(_Frozen):
    status: LoadStatus
    stage: str | None = Field(default=None, description="the loading stage while loading")
    error: str | None = None


class ChunkCounters(_Frozen):
    emitted: int = 0
    stale_dropped: int = 0
    retries: int = 0
    recomputes: int = 0
    hard_cuts: int = 0


class StreamTimings(_Frozen):
    """Rolling figures of the running stream (None until measured)."""

    fps: float | None = None
    period_p50_ms: float | None = None
    period_p99_ms: float | None = None
    mesh_ms: float | None = None
    decode_ms: float | None = None
    overlap_score: float | None = Field(default=None, description="share of decode hidden behind mesh compute")
    pp_overhead_ms: float | None = None
    time_to_first_frame_s: float | None = None
    prompt_to_first_frame_s: float | None = Field(default=None, description="last prompt change -> its first frame")


class FrontStatus(_Frozen):
    ready: bool = Field(..., description="the mesh is READY (warmed up) and not failed")
    streaming: bool = False
    paused: bool = False
    ranks: tuple[RankStatus, ...] = ()
    pipeline: PipelineLoad
    counters: ChunkCounters = ChunkCounters()
    timings: StreamTimings = StreamTimings()
    failure: Cause | None = Field(default=None, description="the job's failure cause (mesh failed)")


# -- events from the front -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameBatch:
    """One decoded chunk: ``frames`` uint8 [F, H, W, 3] RGB (a CPU torch tensor or a numpy array),
    ownership handed to the server. ``t_decoded``: ``time.monotonic()`` when decoded."""

    frames: Any
    chunk_index: int
    cache_epoch: int
    call_id: int
    t_decoded: float


StreamEndReason = Literal["mesh_failed", "shutdown"]


@dataclass(frozen=True)
class StreamEnded:
    """The stream ended for good: every viewer is told ``reason`` (and the cause) and closed."""

    reason: StreamEndReason
    detail: str = ""
    cause: Cause | None = None


FrontEvent = FrameBatch | StreamEnded
Subscriber = Callable[[FrontEvent], None]


class FrontRefused(Exception):
    """The front refused a request before anything changed. ``field``: the parameter at fault (or
    None for the request as a whole); ``code``: ``not_ready`` | ``busy`` | ``no_stream`` |
    ``unsupported`` | ``invalid``."""

    def __init__(self, reason: str, *, field: str | None = None, code: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.code = code


@runtime_checkable
class FrontAPI(Protocol):
    """The job as the server sees it (module docstring: threads and semantics)."""

    def info(self) -> FrontInfo: ...

    def status(self) -> FrontStatus: ...

    def start(self, params: StreamParameters) -> None: ...

    def update(self, params: StreamParameters) -> None: ...

    def stop(self) -> None: ...

    def request_shutdown(self, reason: str) -> None: ...

    def subscribe(self, callback: Subscriber) -> Callable[[], None]: ...
