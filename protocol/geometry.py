"""The shapes a chunk's tensors must have, derived from the model preset."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ChunkGeometry(BaseModel):
    """Latent geometry of one chunk; the preflight checks every announced tensor against it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_channels: int = Field(ge=1)  # 16 for Wan 2.1
    latent_frames: int = Field(ge=1)  # latent frames per chunk (3)
    latent_height: int = Field(ge=1)
    latent_width: int = Field(ge=1)
    text_len: int = Field(ge=1)  # conditioning tokens
    text_dim: int = Field(ge=1)
    max_context_frames: int = Field(ge=1)  # latent frames a KV recompute may cover (window)
    dtype: str = "float32"  # dtype of latents and conditioning on the wire

    def noise_shape(self) -> tuple[int, ...]:
        return (self.latent_channels, self.latent_frames, self.latent_height, self.latent_width)

    def latents_shape(self) -> tuple[int, ...]:
        return self.noise_shape()

    def conditioning_shape(self) -> tuple[int, ...]:
        return (self.text_len, self.text_dim)

    def context_shape(self, frames: int) -> tuple[int, ...]:
        return (self.latent_channels, frames, self.latent_height, self.latent_width)
