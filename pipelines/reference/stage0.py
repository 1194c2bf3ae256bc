"""Stage 0 of the reference pipeline: text conditioner, noise, and a VAE with Wan's compression.

Text: each word (lower-cased ``\\w+`` or punctuation) gets a seeded random embedding plus a
position signal; padding tokens are zero (as Wan pads its T5 context). Deterministic; a different
prompt gives a different conditioning, and through cross-attention a different video.

VAE (``reference/vae.py``): Wan 2.1's causal video VAE -- causal 3x3x3 convs, residual blocks,
per-frame middle attention, x8 spatial / x4 temporal up- and downsampling, Wan's widths on the big
presets (decoder 384 -> 384 -> 192 -> 96) and small ones on tiny / micro -- with random seeded
weights, so it costs what a real one costs. Causal like Wan's: on the first chunk the first latent
frame decodes to ONE video frame (9 frames for 3 latent frames), later latent frames to four each
(12 frames). The decoder is STATEFUL like Wan's streaming decode: each causal conv keeps the last
frames of the previous chunk, ``first_chunk=True`` resets it; decode one stream's chunks in order.
``encode`` (the mirrored encoder, stateless per call) gives latents of the right shape and dtype
but does NOT invert ``decode`` (random weights). The VAE computes in the run's dtype on CUDA and in
float32 on the CPU; text and noise are made in float32.
What stage 0 hands out (conditioning, noise, encoded latents) has the run's dtype, which is also the
wire dtype (``geometry.dtype``).
"""

from __future__ import annotations

import re

import torch

from .presets import VAE_SPATIAL, VAE_TEMPORAL, ReferenceConfig
from .vae import ReferenceVAE
from .weights import mix_seed, seeded_randn

_WORD = re.compile(r"\w+|[^\w\s]")


class ReferenceStage0:
    def __init__(self, cfg: ReferenceConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        self.geometry = cfg.geometry(dtype)
        self.device = torch.device(device)
        self.dtype = dtype  # the wire dtype of what stage 0 hands out
        self.vae = ReferenceVAE(cfg, self.device, dtype)
        self._words: dict[str, torch.Tensor] = {}

    # --- text -----------------------------------------------------------------------------------

    def _word(self, word: str) -> torch.Tensor:
        if word not in self._words:
            self._words[word] = seeded_randn((self.cfg.text_dim,), mix_seed(self.cfg.weight_seed, "token", word))
        return self._words[word]

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        cfg = self.cfg
        words = _WORD.findall(prompt.lower())[: cfg.text_len]
        out = torch.zeros(cfg.text_len, cfg.text_dim)
        if words:
            pos = torch.arange(len(words), dtype=torch.float64)[:, None]
            freqs = torch.pow(10000.0, -torch.arange(cfg.text_dim // 2, dtype=torch.float64) / (cfg.text_dim // 2))
            signal = torch.cat([(pos * freqs).sin(), (pos * freqs).cos()], dim=1).float()
            out[: len(words), : signal.shape[1]] = 0.5 * signal
            out[: len(words)] += torch.stack([self._word(w) for w in words])
        return out.to(self.device, self.dtype)

    # --- noise ----------------------------------------------------------------------------------

    def make_noise(self, seed: int, chunk_index: int) -> torch.Tensor:
        return seeded_randn(self.geometry.noise_shape(), mix_seed("chunk_noise", seed, chunk_index)).to(
            self.device, self.dtype
        )

    # --- VAE ------------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """``[C, T, h, w]`` -> uint8 ``[F, H, W, 3]`` on this device; F = 4T, or 4T-3 on the first chunk."""
        return self.vae.decode(latents, first_chunk)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[F, H, W, 3]`` with F = 4k (continuation) or 4k+1 (causal start) -> latents (run dtype)."""
        f, hh, ww, _ = frames.shape
        s, ts = VAE_SPATIAL, VAE_TEMPORAL
        if f % ts not in (0, 1) or hh % s or ww % s:
            raise ValueError(f"encode: need 4k or 4k+1 frames of a multiple of {s} pixels, got {tuple(frames.shape)}")
        return self.vae.encode(frames).to(self.dtype).contiguous()  # [C, T, h, w]


def video_size(cfg: ReferenceConfig) -> tuple[int, int]:
    return cfg.video_height, cfg.video_width


def frames_per_chunk(cfg: ReferenceConfig, first_chunk: bool) -> int:
    return VAE_TEMPORAL * cfg.latent_frames - (VAE_TEMPORAL - 1 if first_chunk else 0)


