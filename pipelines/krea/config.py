"""The Krea Realtime Video 14B pipeline's configuration: model shapes (presets) and run options.

Model presets fix the shapes the checkpoint must have (the header is checked against them before a
byte of weights is read): ``krea-14b`` is the released model (Wan 2.1 T2V 14B: 40 blocks, dim 5120,
40 heads of 128, FFN 13824, UMT5 text 512 x 4096); ``krea-tiny`` is the shape of the checkpoints the
tests write (2 blocks, 4 heads of 12, FFN 64).

Run options come from ``--pipeline-option KEY=VALUE`` (``KreaOptions.parse``): file paths,
resolution, denoising steps, the KV attention bias, the memory preflight. Every refusal names the key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pp1.protocol.geometry import ChunkGeometry

from ..dit.config import PATCH, DiTConfig
from ..loader import PipelineOptionError, parse_bool

VAE_SPATIAL = 8  # Wan 2.1 VAE: x8 spatial
VAE_TEMPORAL = 4  # x4 temporal (a causal start: 1 latent frame -> 1 video frame)


@dataclass(frozen=True)
class KreaModelConfig:
    """The shapes of the causal DiT (original Wan names in ``checkpoint.expected_tensors``)."""

    name: str
    dim: int
    num_heads: int
    num_blocks: int
    ffn_dim: int
    text_len: int  # conditioning tokens (UMT5: 512, padding zeroed)
    text_dim: int  # UMT5-XXL d_model: 4096
    freq_dim: int = 256  # sinusoidal timestep embedding width
    latent_channels: int = 16
    chunk_frames: int = 3  # latent frames per chunk (num_frame_per_block)
    context_frames: int = 3  # latent frames a KV recompute rebuilds (kv_cache_num_frames)
    eps: float = 1e-6
    flow_shift: float = 5.0  # the sampler's shifted table (FlowMatchScheduler(shift=5))
    video_height: int = 320  # default resolution (option "resolution" overrides)
    video_width: int = 576

    def __post_init__(self) -> None:
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"{self.name}: dim {self.dim} must split into {self.num_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_features(self) -> int:
        return self.latent_channels * math.prod(PATCH)

    @property
    def window_frames(self) -> int:
        """Latent frames the KV cache holds: context + chunk (Krea's local_attn_size = 6)."""
        return self.context_frames + self.chunk_frames

    def parameters(self) -> int:
        """Parameter count (from the shapes of ``checkpoint.expected_tensors``)."""
        from .checkpoint import expected_tensors

        return sum(math.prod(s) for s in expected_tensors(self).values())


MODELS: dict[str, KreaModelConfig] = {
    # The released checkpoint (krea/krea-realtime-video): Wan 2.1 T2V 14B, 320x576 by default (Scope).
    "krea-14b": KreaModelConfig(
        name="krea-14b", dim=5120, num_heads=40, num_blocks=40, ffn_dim=13824, text_len=512, text_dim=4096,
    ),
    # The tests' checkpoints: every mechanism (uneven 2/1/1 heads and 22/21/21 FFN over 3 ranks), 64x64.
    "krea-tiny": KreaModelConfig(
        name="krea-tiny", dim=48, num_heads=4, num_blocks=2, ffn_dim=64, text_len=16, text_dim=32,
        freq_dim=32, video_height=64, video_width=64,
    ),
}


def get_model(preset: str) -> KreaModelConfig:
    try:
        return MODELS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r} for the krea pipeline; known: {sorted(MODELS)}") from None


# --- denoising step lists ------------------------------------------------------------------------

SCOPE_STEPS: tuple[int, ...] = (1000, 750, 500, 250)  # Scope's default denoising_steps


def flow_table(shift: float = 5.0, steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of Self-Forcing's ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)``
    after ``set_timesteps(1000)``, in float32 as it computes them: sigma_i = shift*s/(1+(shift-1)*s)
    for s = linspace(1, 0, steps+1)[:-1]; timesteps = 1000 * sigma."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas, sigmas * 1000


def krea_steps(n: int, shift: float = 5.0) -> tuple[int, ...]:
    """Krea's release schedule (v2v.get_denoising_schedule, warp_denoising_step): the shifted table
    with a trailing 0, sampled at ``1000 - linspace(1000, 0, n)``; rounded to ints (the wire carries
    ints; sigma then moves by at most 5e-4)."""
    if n < 1:
        raise ValueError("krea:N needs N >= 1")
    _, timesteps = flow_table(shift)
    table = torch.cat([timesteps, torch.zeros(1)])
    idx = (1000 - torch.linspace(1000, 0, n)).long()
    return tuple(int(round(float(t))) for t in table[idx])


def parse_steps(text: str) -> tuple[int, ...]:
    """``scope`` | ``krea:N`` | ``1000,750,500,250``."""
    text = text.strip()
    if text == "scope":
        return SCOPE_STEPS
    if text.startswith("krea:"):
        return krea_steps(int(text.removeprefix("krea:")))
    steps = tuple(int(s) for s in text.split(",") if s.strip())
    if not steps or not all(0 <= t <= 1000 for t in steps):
        raise ValueError(f"expected 'scope', 'krea:N' or ints in 0..1000 separated by commas, got {text!r}")
    return steps


# --- run options -----------------------------------------------------------------------------------

OPTION_HELP: dict[str, str] = {
    "checkpoint": "the generator's .safetensors (krea-realtime-video-14b.safetensors); mesh ranks",
    "text_encoder": "UMT5-XXL encoder: a transformers folder, or one file (.safetensors/.pth; Wan or HF names)",
    "tokenizer": "the UMT5 tokenizer folder (google/umt5-xxl); default: the text_encoder folder",
    "vae": "Wan 2.1 VAE: Wan2.1_VAE.pth, or a diffusers AutoencoderKLWan folder",
    "resolution": "HxW video size, multiples of 16 (default 320x576; Krea's release: 480x832)",
    "steps": "denoising steps: 'scope' (1000,750,500,250; default), 'krea:N', or a comma list",
    "kv_bias": "KV attention bias on past frames but the first, in (0, 1] (default 0.3 = Scope; 1 = off = Krea)",
    "memory_check": "on|off: refuse a rank whose weights + KV + working memory do not fit its device (default on)",
    "fp8_linears": "true|false (default false): the six large linears of every block in float8 e4m3 with per-row "
                   "scales (CUDA, compute capability 8.9+, bfloat16/float16 runs)",
}


@dataclass(frozen=True)
class KreaOptions:
    checkpoint: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    resolution: tuple[int, int] | None = None  # None: the preset's
    steps: tuple[int, ...] = SCOPE_STEPS
    kv_bias: float = 0.3
    memory_check: bool = True
    fp8_linears: bool = False
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict[str, str]) -> KreaOptions:
        """Every key checked; a refused key raises ``PipelineOptionError`` naming it. Paths must exist."""
        out = cls(raw=dict(options))
        for key, value in options.items():
            if key not in OPTION_HELP:
                raise PipelineOptionError(key, f"unknown option; the krea pipeline takes {sorted(OPTION_HELP)}")
            try:
                out = replace(out, **{key: _parse_value(key, value)})
            except PipelineOptionError:
                raise
            except (ValueError, TypeError) as exc:
                raise PipelineOptionError(key, f"{exc} ({OPTION_HELP[key]})") from None
        return out

    def require(self, key: str) -> Path:
        path = getattr(self, key)
        if path is None:
            raise PipelineOptionError(key, f"required: --pipeline-option {key}=PATH ({OPTION_HELP[key]})")
        return path

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _parse_value(key: str, value: str) -> object:
    if key in ("checkpoint", "text_encoder", "tokenizer", "vae"):
        path = Path(value).expanduser()
        if not path.exists():
            raise PipelineOptionError(key, f"{path} does not exist")
        return path
    if key == "resolution":
        h, sep, w = value.lower().partition("x")
        if not sep:
            raise ValueError(f"expected HxW (e.g. 320x576), got {value!r}")
        hw = (int(h), int(w))
        if min(hw) < 16 or hw[0] % 16 or hw[1] % 16:
            raise ValueError(f"height and width must be positive multiples of 16 (VAE x8, patch x2), got {value!r}")
        return hw
    if key == "steps":
        return parse_steps(value)
    if key == "kv_bias":
        bias = float(value)
        if not 0.0 < bias <= 1.0:
            raise ValueError(f"must be in (0, 1], got {value!r}")
        return bias
    if key == "memory_check":
        if value not in ("on", "off"):
            raise ValueError(f"expected on or off, got {value!r}")
        return value == "on"
    if key == "fp8_linears":
        return parse_bool(key, value)
    raise PipelineOptionError(key, "unknown option")


@dataclass(frozen=True)
class KreaRun:
    """One preset with its options: everything that shapes a run."""

    model: KreaModelConfig
    options: KreaOptions

    @property
    def video_size(self) -> tuple[int, int]:
        return self.options.resolution or (self.model.video_height, self.model.video_width)

    @property
    def latent_size(self) -> tuple[int, int]:
        h, w = self.video_size
        return h // VAE_SPATIAL, w // VAE_SPATIAL

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid of one latent frame after the 1x2x2 patch."""
        h, w = self.latent_size
        return h // PATCH[1], w // PATCH[2]

    @property
    def tokens_per_frame(self) -> int:
        gh, gw = self.grid
        return gh * gw

    def dit(self) -> DiTConfig:
        """The shared DiT's shapes: Wan's QK-norm over all heads, a window of the context frames."""
        m = self.model
        return DiTConfig(
            dim=m.dim, num_heads=m.num_heads, num_blocks=m.num_blocks, ffn_dim=m.ffn_dim, text_len=m.text_len,
            text_dim=m.text_dim, freq_dim=m.freq_dim, latent_channels=m.latent_channels, grid=self.grid,
            chunk_frames=m.chunk_frames, window_frames=m.context_frames, eps=m.eps, qk_norm="all",
        )

    def geometry(self, dtype: torch.dtype | str = "float32") -> ChunkGeometry:
        h, w = self.latent_size
        m = self.model
        return ChunkGeometry(
            latent_channels=m.latent_channels, latent_frames=m.chunk_frames, latent_height=h, latent_width=w,
            text_len=m.text_len, text_dim=m.text_dim, max_context_frames=m.context_frames,
            dtype=str(dtype).removeprefix("torch."),
        )
