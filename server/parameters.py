"""Stream parameters as the server checks them: shape and range (the pydantic model), then what
this front supports (``FrontInfo``). What a change *means* is the front's business."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from .errors import ApiError
from .front_api import FrontInfo, StreamParameters

ONE_SHOT = frozenset({"reset_cache"})  # applied once, never kept in the parameters in force
MAX_MESSAGE_BYTES = 64 * 1024


def field_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """pydantic's errors as ``{"field": "a.b.0.c", "reason": "..."}`` (the field path first)."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        field = ".".join(p for p in (prefix, loc) if p) or "(body)"
        out.append({"field": field, "reason": err.get("msg", "invalid")})
    return out


def refuse_unsupported(params: StreamParameters, info: FrontInfo, prefix: str = "") -> None:
    """ApiError 422 naming every given field the front does not support (nothing is applied)."""
    bad = []
    for name in sorted(params.given()):
        field = f"{prefix}.{name}" if prefix else name
        if name not in info.supported_parameters:
            bad.append({"field": field, "reason": f"not supported by pipeline {info.pipeline!r} (preset "
                        f"{info.preset}); supported: {', '.join(sorted(info.supported_parameters))}"})
    if params.input_mode is not None and params.input_mode not in info.input_modes:
        field = f"{prefix}.input_mode" if prefix else "input_mode"
        bad.append({"field": field, "reason": f"input mode {params.input_mode!r} is not supported: "
                    f"video-to-video input does not exist on the PP1 path; use one of {sorted(info.input_modes)}"})
    if bad:
        raise ApiError(422, "unsupported_parameter", bad)


def parse_message(message: str | bytes) -> StreamParameters:
    """A data-channel message: JSON of ``StreamParameters``. ApiError naming the problem otherwise."""
    if isinstance(message, bytes):
        if len(message) > MAX_MESSAGE_BYTES:
            raise ApiError(413, "message_too_large", f"message of {len(message)} bytes > {MAX_MESSAGE_BYTES}")
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "malformed_json", f"message is not UTF-8: {exc}") from None
    if len(message) > MAX_MESSAGE_BYTES:
        raise ApiError(413, "message_too_large", f"message of {len(message)} characters > {MAX_MESSAGE_BYTES}")
    try:
        data: Any = json.loads(message)
    except json.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"message is not JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_parameters", [{"field": "(message)", "reason": "expected a JSON object of "
                                                    f"parameters, got {type(data).__name__}"}])
    try:
        return StreamParameters.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_parameters", field_errors(exc)) from None


def merged(current: dict[str, Any], update: StreamParameters) -> dict[str, Any]:
    """The parameters in force after ``update`` (one-shot fields dropped)."""
    out = dict(current)
    out.update({k: v for k, v in update.given().items() if k not in ONE_SHOT})
    return out
