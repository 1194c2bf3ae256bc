"""The server's refusals: one exception carrying the HTTP status, a short code and the reason.

Every refusal is raised before anything changed (the session slot, the front, the peers), so a
4xx always means "nothing happened". The body is ``{"error": code, "detail": reason | [fields]}``
(``detail`` as in FastAPI / Daydream Scope; field errors list ``{"field", "reason"}``).
"""

from __future__ import annotations

from typing import Any

from pp1.fsm.session import Refusal

# The session slot's refusal codes -> HTTP status.
REFUSAL_STATUS: dict[str, int] = {
    "busy": 409,
    "closing": 409,
    "no_session": 409,
    "shutting_down": 503,
    "failed": 503,
}


class ApiError(Exception):
    """A refusal: ``status`` (4xx/5xx), ``code`` (machine-readable) and ``detail`` (a reason, or a
    list of ``{"field", "reason"}``)."""

    def __init__(self, status: int, code: str, detail: str | list[dict[str, Any]], *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail}

    @classmethod
    def field(cls, status: int, code: str, field: str, reason: str) -> ApiError:
        return cls(status, code, [{"field": field, "reason": reason}])

    @classmethod
    def from_refusal(cls, refusal: Refusal) -> ApiError:
        return cls(REFUSAL_STATUS[refusal.code], refusal.code, refusal.reason)
