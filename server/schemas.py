"""HTTP request and response models (pydantic). Daydream Scope's shapes where the API overlaps
(``WebRTCOfferRequest``, ``WebRTCOfferResponse``, ``IceCandidateRequest``, ``PipelineStatusResponse``,
``HealthResponse``, ``IceServersResponse``); pp1's own beyond it (readiness, status, watch).
Requests refuse unknown fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .front_api import Cause, FrontInfo, FrontStatus, LoadStatus, RankStatus, StreamParameters

MAX_SDP_CHARS = 100_000


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WebRTCOfferRequest(_Request):
    """A publisher's offer: starts the one live session (Scope's ``WebRTCOfferRequest``)."""

    sdp: str = Field(..., min_length=1, max_length=MAX_SDP_CHARS, description="SDP offer")
    type: Literal["offer"] = Field(..., description="SDP type: 'offer'")
    initialParameters: StreamParameters | None = Field(default=None, description="the stream's initial parameters")


class WatchRequest(_Request):
    """A watcher's offer: receives the live stream's frames, changes nothing."""

    sdp: str = Field(..., min_length=1, max_length=MAX_SDP_CHARS, description="SDP offer")
    type: Literal["offer"] = Field(..., description="SDP type: 'offer'")


class WebRTCOfferResponse(BaseModel):
    sdp: str = Field(..., description="SDP answer")
    type: Literal["answer"] = "answer"
    sessionId: str = Field(..., description="the peer's id (PATCH / DELETE /api/v1/webrtc/offer/{sessionId})")


class IceCandidateInit(_Request):
    candidate: str = Field(..., max_length=1000, description="ICE candidate line ('' = end of candidates)")
    sdpMid: str | None = Field(default=None, max_length=64)
    sdpMLineIndex: int | None = Field(default=None, ge=0, le=64)
    usernameFragment: str | None = Field(default=None, max_length=256)


class IceCandidateRequest(_Request):
    """Trickle ICE (Scope's ``IceCandidateRequest``)."""

    candidates: list[IceCandidateInit] = Field(..., min_length=1, max_length=64)


class IceServerConfig(BaseModel):
    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class IceServersResponse(BaseModel):
    iceServers: list[IceServerConfig]


class PipelineLoadRequest(_Request):
    """Scope's load request. The pipeline loads with the job (``pp1 serve``): this only checks that
    the pipeline asked for is the one the job runs."""

    pipeline_ids: list[str] | None = Field(default=None, max_length=16)
    pipeline_id: str | None = Field(default=None, max_length=500)
    load_params: dict[str, Any] | None = None


class MessageResponse(BaseModel):
    message: str


class HealthResponse(BaseModel):
    status: Literal["healthy"] = "healthy"
    timestamp: str
    server_start_time: float
    version: str


class PipelineStatusResponse(BaseModel):
    """Scope's pipeline status: ``status`` is not_loaded | loading | loaded | error."""

    status: LoadStatus
    pipeline_id: str | None = None
    load_params: dict[str, Any] | None = None
    loaded_lora_adapters: list[dict[str, Any]] | None = None
    loading_stage: str | None = None
    error: str | None = None


class ReadyResponse(BaseModel):
    ready: bool
    reason: str
    session_state: str
    ranks: list[RankStatus]
    failure: Cause | None = None


class ViewerStatus(BaseModel):
    id: str
    kind: Literal["session", "watcher"]
    connection: str
    frames_sent: int
    frames_dropped: int  # the queue was full: the oldest went
    frames_superseded: int = 0  # an older epoch's frames still queued when a hard cut's first frames came
    queued: int
    fps: float | None


class ServerStatus(BaseModel):
    session_state: str
    session_id: str | None
    viewers: list[ViewerStatus]
    frames_in: int
    frames_dropped: int
    started_at: float


class StatusResponse(BaseModel):
    """Everything the viewer page shows: the job, each rank, the stream's counters and timings."""

    info: FrontInfo
    front: FrontStatus
    server: ServerStatus


class ParametersResponse(BaseModel):
    """The parameters in force (the session's initial ones with every update applied; one-shot
    fields such as ``reset_cache`` are not kept)."""

    sessionId: str | None
    parameters: dict[str, Any]


class ErrorField(BaseModel):
    field: str
    reason: str


class ErrorResponse(BaseModel):
    error: str
    detail: str | list[ErrorField]
