"""Stage 0 of the reference pipeline: text conditioner, noise, and a VAE with Wan's compression.

Text: each word (lower-cased ``\\w+`` or punctuation) gets a seeded random embedding plus a
position signal; padding tokens are zero (as Wan pads its T5 context). Deterministic; a different
prompt gives a different conditioning, and through cross-attention a different video.

VAE: x8 spatial, x4 temporal, causal like Wan's: on the first chunk the first latent frame decodes
to ONE video frame (9 frames for 3 latent frames), later latent frames to four each (12 frames).
Each latent pixel (16 channels) maps linearly to its 4x8x8 (or 1x8x8) RGB patch, then a sigmoid to
uint8. ``encode`` inverts it by least squares (exact up to uint8 rounding and saturation). Stateless:
decoding a chunk does not depend on earlier chunks. It is much cheaper than Wan's VAE.
Stage 0 computes in float32; what it hands out (conditioning, noise, encoded latents) has the run's
dtype, which is also the wire dtype (``geometry.dtype``).
"""

from __future__ import annotations

import re

import torch

from .presets import VAE_SPATIAL, VAE_TEMPORAL, ReferenceConfig
from .weights import mix_seed, seeded_randn

_WORD = re.compile(r"\w+|[^\w\s]")


class ReferenceStage0:
    def __init__(self, cfg: ReferenceConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        self.geometry = cfg.geometry(dtype)
        self.device = torch.device(device)
        self.dtype = dtype  # the wire dtype of what stage 0 hands out
        c, s, ts = cfg.latent_channels, VAE_SPATIAL, VAE_TEMPORAL
        seed = cfg.weight_seed
        # decoder: latent pixel -> (ts frames x s x s x RGB) pre-activations; first frame: 1 frame
        self._w = (seeded_randn((ts * s * s * 3, c), mix_seed(seed, "vae.decoder")) * c**-0.5).double()
        self._b = (seeded_randn((ts * s * s * 3,), mix_seed(seed, "vae.decoder.bias")) * 0.3).double()
        self._w1 = (seeded_randn((s * s * 3, c), mix_seed(seed, "vae.decoder.first")) * c**-0.5).double()
        self._b1 = (seeded_randn((s * s * 3,), mix_seed(seed, "vae.decoder.first.bias")) * 0.3).double()
        self._pinv, self._pinv1 = torch.linalg.pinv(self._w), torch.linalg.pinv(self._w1)
        dev = self.device
        self._w, self._b, self._w1, self._b1 = (t.float().to(dev) for t in (self._w, self._b, self._w1, self._b1))
        self._pinv, self._pinv1 = self._pinv.float().to(dev), self._pinv1.float().to(dev)
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
        c, t, h, w = latents.shape
        s = VAE_SPATIAL
        z = latents.to(self.device, torch.float32).permute(1, 2, 3, 0)  # [T, h, w, C]
        parts = []
        rest = z
        if first_chunk:
            one = torch.sigmoid(z[:1] @ self._w1.T + self._b1).view(1, h, w, 1, s, s, 3)
            parts.append(one)
            rest = z[1:]
        if rest.shape[0]:
            many = torch.sigmoid(rest @ self._w.T + self._b).view(rest.shape[0], h, w, VAE_TEMPORAL, s, s, 3)
            parts.append(many)
        frames = [p.permute(0, 3, 1, 4, 2, 5, 6).reshape(-1, h * s, w * s, 3) for p in parts]
        return (torch.cat(frames) * 255.0).round_().to(torch.uint8)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[F, H, W, 3]`` with F = 4k (continuation) or 4k+1 (causal start) -> latents."""
        f, hh, ww, _ = frames.shape
        s, ts = VAE_SPATIAL, VAE_TEMPORAL
        if f % ts not in (0, 1) or hh % s or ww % s:
            raise ValueError(f"encode: need 4k or 4k+1 frames of a multiple of {s} pixels, got {tuple(frames.shape)}")
        h, w = hh // s, ww // s
        p = frames.to(self.device, torch.float32).div(255.0).clamp(0.5 / 255, 254.5 / 255)
        y = torch.log(p) - torch.log1p(-p)  # inverse sigmoid
        out = []
        if f % ts == 1:
            one = y[:1].view(1, h, s, w, s, 3).permute(0, 1, 3, 2, 4, 5).reshape(1, h, w, s * s * 3)
            out.append((one - self._b1) @ self._pinv1.T)
            y = y[1:]
        if y.shape[0]:
            n = y.shape[0] // ts
            many = y.view(n, ts, h, s, w, s, 3).permute(0, 2, 4, 1, 3, 5, 6).reshape(n, h, w, ts * s * s * 3)
            out.append((many - self._b) @ self._pinv.T)
        return torch.cat(out).permute(3, 0, 1, 2).to(self.dtype).contiguous()  # [C, T, h, w]


def video_size(cfg: ReferenceConfig) -> tuple[int, int]:
    return cfg.video_height, cfg.video_width


def frames_per_chunk(cfg: ReferenceConfig, first_chunk: bool) -> int:
    return VAE_TEMPORAL * cfg.latent_frames - (VAE_TEMPORAL - 1 if first_chunk else 0)


