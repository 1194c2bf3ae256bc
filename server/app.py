"""The HTTP app: ``create_app(front, settings)`` -> FastAPI (OpenAPI at ``/openapi.json``).

Daydream Scope's routes where they overlap (``/health``, ``/api/v1/pipeline/status``,
``/api/v1/pipeline/load``, ``/api/v1/webrtc/ice-servers``, ``/api/v1/webrtc/offer`` + PATCH/DELETE,
``/api/v1/session/parameters``), pp1's beyond them (``/ready``, ``/api/v1/status``, ``/metrics``,
``/api/v1/webrtc/watch``) and the viewer page at ``/``. See server/README.md.

Every route that changes state (POST, PATCH, DELETE) needs ``Authorization: Bearer <token>`` when
a token is set (``--token`` / ``$PP1_TOKEN``); reads are open.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from .core import ServerCore, readiness_reason
from .errors import ApiError
from .front_api import FrontAPI, StreamParameters
from .metrics import CONTENT_TYPE
from .schemas import (
    ErrorResponse,
    HealthResponse,
    IceCandidateRequest,
    IceServersResponse,
    MessageResponse,
    ParametersResponse,
    PipelineLoadRequest,
    PipelineStatusResponse,
    ReadyResponse,
    StatusResponse,
    WatchRequest,
    WebRTCOfferRequest,
    WebRTCOfferResponse,
)
from .settings import ServerSettings

STATIC = Path(__file__).resolve().parent / "static"
GUARDED_METHODS = frozenset({"POST", "PATCH", "DELETE", "PUT"})
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "(body)"


def create_app(front: FrontAPI, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    core = ServerCore(front, settings)
    info = core.info

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await core.startup()
        try:
            yield
        finally:
            await core.shutdown("server shutting down")

    app = FastAPI(
        title="pp1-server",
        version=info.version,
        description=f"Realtime video from a PP1 mesh: pipeline {info.pipeline} (preset {info.preset}), "
                    f"topology {info.topology}, mesh of {info.mesh_size}. Routes that change state need "
                    "`Authorization: Bearer <token>` when the server has a token.",
        lifespan=lifespan,
    )
    app.state.core = core
    app.state.settings = settings

    # -- errors -----------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        whole_body = [e for e in errors if tuple(e.get("loc", ())) == ("body",)]
        content_type = request.headers.get("content-type", "")
        if whole_body and "json" not in content_type.lower():
            core.metrics.refusals.labels(code="unsupported_media_type").inc()
            return JSONResponse({"error": "unsupported_media_type", "detail": [{"field": "(body)", "reason":
                                 f"send a JSON body with 'Content-Type: application/json' (got {content_type!r})"}]},
                                status_code=415)
        if whole_body and whole_body[0].get("type") == "missing":
            core.metrics.refusals.labels(code="missing_body").inc()
            return JSONResponse({"error": "missing_body", "detail": [{"field": "(body)", "reason":
                                 "a JSON object body is required"}]}, status_code=422)
        if any(e.get("type") == "json_invalid" for e in errors):
            e = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (e.get("ctx") or {}).get("error", e.get("msg", "invalid JSON"))
            core.metrics.refusals.labels(code="malformed_json").inc()
            return JSONResponse({"error": "malformed_json", "detail": [{"field": "(body)", "reason":
                                 f"malformed JSON: {reason}"}]}, status_code=400)
        detail = [{"field": _field_name(tuple(e.get("loc", ()))), "reason": e.get("msg", "invalid")} for e in errors]
        core.metrics.refusals.labels(code="invalid_request").inc()
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    # -- the token: every state-changing route ------------------------------------------------------------
    @app.middleware("http")
    async def _token_guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if settings.token and request.method in GUARDED_METHODS:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), settings.token.encode()):
                core.metrics.refusals.labels(code="unauthorized").inc()
                return JSONResponse({"error": "unauthorized", "detail": "this route changes state: send "
                                     "'Authorization: Bearer <token>' (the server's --token / $PP1_TOKEN)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # -- the page ---------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/viewer.js", include_in_schema=False)
    async def viewer_js() -> FileResponse:
        return FileResponse(STATIC / "viewer.js", media_type="text/javascript",
                            headers={"Cache-Control": "no-cache"})

    # -- health, readiness, status, metrics -----------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse, tags=["scope"])
    async def health() -> HealthResponse:
        """The process answers (always 200 while it runs; readiness is /ready)."""
        return HealthResponse(timestamp=datetime.now(timezone.utc).isoformat(), server_start_time=core.started_at,
                              version=info.version)

    @app.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["pp1"])
    async def ready() -> JSONResponse:
        """200 only when the mesh is READY and the server admits sessions; else 503 with each rank's
        lifecycle state, the last error and its cause."""
        st = front.status()
        refusal = core.machine.watch_refusal()
        ok = st.ready and refusal is None
        reason = readiness_reason(st) if refusal is None else refusal.reason
        body = ReadyResponse(ready=ok, reason=reason, session_state=core.machine.state, ranks=list(st.ranks),
                             failure=st.failure)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)

    @app.get("/api/v1/status", response_model=StatusResponse, tags=["pp1"])
    async def status() -> StatusResponse:
        """The job (topology, pipeline, preset), every rank's state, the chunk counters and timings,
        the session slot and each viewer."""
        return StatusResponse(info=info, front=front.status(), server=core.server_status())

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(core.metrics.render(), media_type=CONTENT_TYPE)

    # -- Scope's pipeline routes ------------------------------------------------------------------------------
    @app.get("/api/v1/pipeline/status", response_model=PipelineStatusResponse, tags=["scope"])
    async def pipeline_status() -> PipelineStatusResponse:
        st = front.status()
        return PipelineStatusResponse(status=st.pipeline.status, pipeline_id=info.pipeline,
                                      load_params={"preset": info.preset, "height": info.height, "width": info.width},
                                      loading_stage=st.pipeline.stage, error=st.pipeline.error)

    @app.post("/api/v1/pipeline/load", response_model=MessageResponse, responses=ERRORS, tags=["scope"])
    async def pipeline_load(req: PipelineLoadRequest) -> MessageResponse:
        """Scope clients call this first. Here the pipeline loads with the job; a request for another
        pipeline is refused."""
        asked = [*(req.pipeline_ids or []), *([req.pipeline_id] if req.pipeline_id else [])]
        other = [p for p in asked if p != info.pipeline]
        if other:
            raise ApiError.field(422, "unsupported_pipeline", "pipeline_ids", f"this job serves pipeline "
                                 f"{info.pipeline!r} (preset {info.preset}); it cannot load {other}")
        return MessageResponse(message=f"pipeline {info.pipeline!r} loads with the job: status "
                               f"{front.status().pipeline.status}")

    # -- WebRTC ---------------------------------------------------------------------------------------------
    @app.get("/api/v1/webrtc/ice-servers", response_model=IceServersResponse, tags=["scope"])
    async def ice_servers() -> IceServersResponse:
        return IceServersResponse(iceServers=settings.ice_servers)

    @app.post("/api/v1/webrtc/offer", response_model=WebRTCOfferResponse, responses=ERRORS, tags=["scope"])
    async def offer(req: WebRTCOfferRequest) -> WebRTCOfferResponse:
        """Start the one live session (one KV cache per mesh): SDP offer in (a recvonly video section,
        a data channel for parameters), SDP answer out. 409 while another session is live."""
        return await core.offer(req)

    @app.patch("/api/v1/webrtc/offer/{session_id}", status_code=204, response_class=Response, responses=ERRORS,
               tags=["scope"])
    async def add_ice(session_id: str, req: IceCandidateRequest) -> Response:
        """Trickle ICE for a session or a watcher."""
        await core.add_candidates(session_id, req)
        return Response(status_code=204)

    @app.delete("/api/v1/webrtc/offer/{session_id}", status_code=204, response_class=Response, responses=ERRORS,
                tags=["scope"])
    async def close(session_id: str) -> Response:
        """Close a session (the stream stops, the mesh goes back to heartbeats) or a watcher."""
        await core.delete(session_id)
        return Response(status_code=204)

    @app.post("/api/v1/webrtc/watch", response_model=WebRTCOfferResponse, responses=ERRORS, tags=["pp1"])
    async def watch(req: WatchRequest) -> WebRTCOfferResponse:
        """Watch the live stream (no parameters): any number of viewers up to --max-viewers. PATCH and
        DELETE on /api/v1/webrtc/offer/{sessionId} work for watchers too."""
        return await core.watch(req)

    # -- parameters -----------------------------------------------------------------------------------------
    @app.get("/api/v1/session/parameters", response_model=ParametersResponse, tags=["scope"])
    async def get_parameters() -> ParametersResponse:
        return core.get_parameters()

    @app.post("/api/v1/session/parameters", response_model=ParametersResponse, responses=ERRORS, tags=["scope"])
    async def post_parameters(params: StreamParameters) -> ParametersResponse:
        """A partial update of the live session's parameters (as on the data channel)."""
        return await core.set_parameters(params)

    return app
