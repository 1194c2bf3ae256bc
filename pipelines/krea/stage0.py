"""Stage 0 of the Krea pipeline (the front): UMT5 conditioning, the chunk noise, and the Wan 2.1 VAE.

- ``encode_prompt``: UMT5-XXL encoder, ``text_len`` tokens, padding zeroed (``text_encoder.py``).
- ``make_noise(seed, chunk_index)``: Scope's rule: a generator on this device seeded with
  seed + 3 * chunk_index (the chunk's first latent frame), one ``[T, C, h, w]`` draw. The generator
  re-creates the same generator to continue the stream for its re-noising (``generator.py``).
- ``decode``: streaming decode, 9 frames on an epoch's first chunk, then 12; ``first_chunk=True``
  clears the causal state (hard cut). ``encode``: 1 + 4k frames, a temporary cache (the streaming
  decode state is untouched): the re-encoded context frame of a recompute.
"""

from __future__ import annotations

import torch

from .config import KreaRun
from .generator import draw_noise, noise_generator
from .text_encoder import TOKENIZER_FILES, UMT5TextEncoder
from .vae import StreamingWanVAE, load_wan_vae


class KreaStage0:
    def __init__(self, run: KreaRun, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.device, self.dtype = run, torch.device(device), dtype
        self.geometry = run.geometry(dtype)
        opts = run.options
        encoder = opts.require("text_encoder")
        tokenizer = opts.tokenizer
        if tokenizer is None:
            if not (encoder.is_dir() and any((encoder / f).is_file() for f in TOKENIZER_FILES)):
                opts.require("tokenizer")  # raises: name the option
            tokenizer = encoder
        # the VAE in float32 on the CPU (as Scope's tests), the run's dtype on CUDA
        self.vae_dtype = dtype if self.device.type == "cuda" else torch.float32
        self.text = UMT5TextEncoder(encoder, tokenizer, run.model.text_len, self.device, dtype)
        if self.text.d_model != run.model.text_dim:
            raise ValueError(f"text encoder {encoder}: d_model {self.text.d_model}, but preset {run.model.name} "
                             f"conditions on {run.model.text_dim}")
        self.vae = StreamingWanVAE(load_wan_vae(opts.require("vae"), self.device, self.vae_dtype), self.device,
                                   self.vae_dtype)
        self.prompts_encoded = 0

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        self.prompts_encoded += 1
        return self.text(prompt).to(self.dtype).contiguous()

    def make_noise(self, seed: int, chunk_index: int) -> torch.Tensor:
        g = self.geometry
        gen = noise_generator(seed, chunk_index, g.latent_frames, self.device)
        return draw_noise(gen, g.noise_shape(), self.device).to(self.dtype).contiguous()

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        video = self.vae.decode(latents, first_chunk)  # [F, 3, H, W] in [-1, 1]
        return ((video + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        f = int(frames.shape[0])
        if frames.dim() != 4 or frames.shape[-1] != 3 or (f - 1) % 4:
            raise ValueError(f"encode takes uint8 [F, H, W, 3] with F = 1 + 4k (Wan's causal VAE), got "
                             f"{tuple(frames.shape)}")
        video = frames.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.vae.encode(video).to(self.dtype).contiguous()
