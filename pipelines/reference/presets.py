"""Model presets of the reference pipeline: the shapes of Wan 2.1 / Krea Realtime Video, and a tiny one.

Weights are random but seeded (``weight_seed``), so presets are runnable without downloads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pp1.protocol.geometry import ChunkGeometry

from ..dit.config import PATCH, DiTConfig

DEFAULT_TIMESTEPS: tuple[int, ...] = (1000, 750, 500, 250)

# Wan's causal VAE: x8 spatial, x4 temporal; patch 1x2x2 over the latents (PATCH).
VAE_SPATIAL = 8
VAE_TEMPORAL = 4


@dataclass(frozen=True)
class ReferenceConfig:
    """Everything that shapes the model. ``asdict`` of it goes into the fingerprint."""

    name: str
    dim: int
    num_heads: int
    num_blocks: int
    ffn_dim: int
    video_height: int
    video_width: int
    text_len: int
    text_dim: int
    latent_channels: int = 16
    latent_frames: int = 3  # per chunk: 3 latent frames = 12 video frames (9 on the first chunk)
    kv_window_frames: int = 6  # latent frames of past K/V the cache keeps (and a recompute may cover)
    freq_dim: int = 256  # sinusoidal timestep embedding width (Wan: 256)
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    flow_shift: float = 5.0  # sigma(t) = shift*s / (1 + (shift-1)*s), s = t/1000 (Wan's shifted schedule)
    weight_seed: int = 20250601
    eps: float = 1e-6
    # stage-0 VAE (reference/vae.py), Wan 2.1's causal VAE structure (defaults = Wan's): base width,
    # width multipliers of the 4 stages (x8 spatial), residual blocks per stage, middle attention
    vae_dim: int = 96
    vae_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_decoder_blocks: int = 3
    vae_encoder_blocks: int = 2
    vae_attention: bool = True
    vae_per_frame: bool = True  # decode one latent frame per decoder pass, as Wan's decode loop does

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} not divisible by {self.num_heads} heads")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim {self.head_dim} must be even (RoPE)")
        if len(self.vae_mult) != 4 or self.vae_dim < 1 or min(self.vae_decoder_blocks, self.vae_encoder_blocks) < 0:
            raise ValueError(f"{self.name}: the VAE needs 4 width multipliers (x8 spatial), vae_dim >= 1, blocks >= 0")
        if self.video_height % (VAE_SPATIAL * PATCH[1]) or self.video_width % (VAE_SPATIAL * PATCH[2]):
            raise ValueError(f"{self.name}: video size must be a multiple of {VAE_SPATIAL * PATCH[1]}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def latent_height(self) -> int:
        return self.video_height // VAE_SPATIAL

    @property
    def latent_width(self) -> int:
        return self.video_width // VAE_SPATIAL

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid of one latent frame after the 1x2x2 patch."""
        return self.latent_height // PATCH[1], self.latent_width // PATCH[2]

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def patch_features(self) -> int:
        return self.latent_channels * PATCH[0] * PATCH[1] * PATCH[2]

    def dit(self) -> DiTConfig:
        """The shared DiT's shapes: per-head QK-norm (no collective), a window of ``kv_window_frames``."""
        return DiTConfig(
            dim=self.dim, num_heads=self.num_heads, num_blocks=self.num_blocks, ffn_dim=self.ffn_dim,
            text_len=self.text_len, text_dim=self.text_dim, freq_dim=self.freq_dim,
            latent_channels=self.latent_channels, grid=self.grid, chunk_frames=self.latent_frames,
            window_frames=self.kv_window_frames, eps=self.eps, qk_norm="head",
        )

    def geometry(self, dtype: torch.dtype | str = "float32") -> ChunkGeometry:
        """The chunk geometry; ``dtype`` is the wire dtype (the run's dtype)."""
        return ChunkGeometry(
            latent_channels=self.latent_channels,
            latent_frames=self.latent_frames,
            latent_height=self.latent_height,
            latent_width=self.latent_width,
            text_len=self.text_len,
            text_dim=self.text_dim,
            max_context_frames=self.kv_window_frames,
            dtype=str(dtype).removeprefix("torch."),
        )

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ReferenceConfig] = {
    # CI: 64x64 video -> 8x8 latents -> 16 tokens per latent frame; uneven over 3 ranks (2/1/1 heads,
    # FFN 67/67/66). For tests that need every mechanism but not the cost.
    "micro": ReferenceConfig(
        name="micro", dim=64, num_heads=4, num_blocks=2, ffn_dim=200,
        video_height=64, video_width=64, text_len=8, text_dim=32, freq_dim=32,
        vae_dim=2, vae_decoder_blocks=0, vae_encoder_blocks=0, vae_per_frame=False,
    ),
    # CPU: 128x128 video -> 16x16 latents -> 64 tokens per latent frame, 192 per chunk.
    "tiny": ReferenceConfig(
        name="tiny", dim=128, num_heads=4, num_blocks=4, ffn_dim=512,
        video_height=128, video_width=128, text_len=16, text_dim=64, freq_dim=64,
        # VAE: widths 8..2, no residual blocks, whole chunk per pass (CPU)
        vae_dim=2, vae_decoder_blocks=0, vae_encoder_blocks=0, vae_per_frame=False,
    ),
    # Wan 2.1 T2V 1.3B shapes at 480x832 (Self-Forcing's resolution): 1560 tokens per latent frame.
    "wan-1.3b-shape": ReferenceConfig(
        name="wan-1.3b-shape", dim=1536, num_heads=12, num_blocks=30, ffn_dim=8960,
        video_height=480, video_width=832, text_len=512, text_dim=4096,
    ),
    # Krea Realtime Video 14B (pp1.md section 7): 320x576 -> 40x72 latents -> 720 tokens per frame.
    "krea-14b-shape": ReferenceConfig(
        name="krea-14b-shape", dim=5120, num_heads=40, num_blocks=40, ffn_dim=13824,
        video_height=320, video_width=576, text_len=512, text_dim=4096,
    ),
}


def get_preset(preset: str) -> ReferenceConfig:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}") from None
