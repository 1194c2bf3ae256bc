"""What shapes the shared DiT: dimensions, the token grid, the KV window and the QK-norm rule."""

from __future__ import annotations

from dataclasses import dataclass

PATCH = (1, 2, 2)  # Wan's patch embedding: 1 latent frame x 2 x 2 latent pixels per token

QK_NORMS = ("head", "all")


@dataclass(frozen=True)
class DiTConfig:
    """``qk_norm``: ``"all"`` = Wan's RMSNorm over all heads (``WanRMSNorm(dim)``; under TP one small
    all-reduce of sums of squares per norm), ``"head"`` = RMSNorm per head (no collective; the reference's
    approximation). ``window_frames``: past latent frames the KV cache keeps (a chunk attends to them
    and to itself); ``chunk_frames``: latent frames per chunk."""

    dim: int
    num_heads: int
    num_blocks: int
    ffn_dim: int
    text_len: int
    text_dim: int
    freq_dim: int
    latent_channels: int
    grid: tuple[int, int]  # tokens of one latent frame after the patch: (h/2, w/2)
    chunk_frames: int
    window_frames: int
    eps: float = 1e-6
    qk_norm: str = "all"

    def __post_init__(self) -> None:
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size (RoPE)")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_features(self) -> int:
        return self.latent_channels * PATCH[0] * PATCH[1] * PATCH[2]
