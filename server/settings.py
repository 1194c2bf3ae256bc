"""The server's settings (``pp1 serve`` options map onto these)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from .schemas import IceServerConfig

TOKEN_ENV = "PP1_TOKEN"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="bind address (127.0.0.1 unless told otherwise)")
    port: int = Field(default=8000, ge=0, le=65535)
    token: str | None = Field(default=None, min_length=8, description="bearer token guarding every route that "
                              f"changes state (or ${TOKEN_ENV}); None: no guard")
    max_viewers: int = Field(default=16, ge=1, le=256, description="peers at once (the session + watchers)")
    queue_frames: int | None = Field(default=None, ge=1, le=10_000, description="frames queued per viewer before "
                                     "the oldest is dropped (default: max(2 chunks, 1 s))")
    negotiation_timeout_s: float = Field(default=20.0, gt=0, le=600, description="a peer that does not connect "
                                         "within this is closed (and its session ended)")
    close_flush_s: float = Field(default=0.5, ge=0, le=10, description="time given to a stream_ended notice "
                                 "before the peer is closed")
    ice_servers: list[IceServerConfig] = Field(default_factory=list, description="STUN/TURN servers (none: "
                                               "host candidates only, fine on one host or a LAN)")

    @classmethod
    def from_env(cls, **overrides: object) -> ServerSettings:
        """Settings with the token from ${PP1_TOKEN} unless given."""
        values = dict(overrides)
        if values.get("token") is None and os.environ.get(TOKEN_ENV):
            values["token"] = os.environ[TOKEN_ENV]
        return cls(**values)  # type: ignore[arg-type]
