"""The reference VAE: Wan 2.1's causal video VAE structure, random seeded weights, widths per preset.

Decoder (Wan's ``Decoder3d``), widths ``dims = vae_dim * (mult[-1], *reversed(mult))`` (Wan, dim 96:
384, 384, 384, 192, 96): 1x1x1 conv on the latents, 3x3x3 causal conv to dims[0], middle (residual
block, per-frame attention, residual block), then four stages of ``vae_blocks + 1`` residual blocks,
the first three followed by a x2 upsample (spatial x8 in all; the first two also x2 in time, x4 in
all), each upsample halving the width; head: norm, SiLU, causal conv to RGB; clamp to [-1, 1] ->
uint8. Encoder (Wan's ``Encoder3d``): the mirror, with stride-2 downsamples and ``vae_blocks``
residual blocks per stage, to 2 x 16 channels; the latents are the first 16 (the mean).

Causality and state: the decoder is STATEFUL across chunks like Wan's streaming decode
(``feat_cache``): every causal conv keeps the last two frames it saw, so chunk k+1 continues chunk k.
``first_chunk=True`` resets that state (zero past) and applies the causal-start rule: the first
latent frame decodes to one video frame (3 latent frames -> 9 frames, later chunks 12). Decoding
a whole chunk at once equals Wan's frame-by-frame decode (the convs see the same past);
``vae_per_frame`` (big presets) runs Wan's loop, one latent frame per pass, for Wan's cost. Decode
the chunks of one stream in order. The encoder is stateless per call: 4k+1 frames are a causal start
(first frame alone, then 4 frames per latent frame), 4k frames continue from a zero past.
"""

from __future__ import annotations

import torch

from .presets import ReferenceConfig
from .vae_layers import AttentionBlock, CausalConv3d, Resample, ResidualBlock, RMSNorm, VaeWeights

Layer = ResidualBlock | AttentionBlock | Resample


def _reset(layers: list[Layer], convs: list[CausalConv3d]) -> None:
    for layer in layers:
        if isinstance(layer, Resample):
            layer.reset()
        for conv in layer.convs():
            conv.reset()
    for conv in convs:
        conv.reset()


class VaeDecoder:
    """Latents ``[1, z, T, h, w]`` -> video ``[1, 3, F, 8h, 8w]`` in [-1, 1] (compute dtype)."""

    def __init__(self, cfg: ReferenceConfig, wts: VaeWeights) -> None:
        mult, dim, z = cfg.vae_mult, cfg.vae_dim, cfg.latent_channels
        dims = [dim * u for u in (mult[-1], *mult[::-1])]
        up_time = (True, True, False)  # Wan: temporal upsampling in the first two stages
        self.conv_z = CausalConv3d(wts, "conv2", z, z, (1, 1, 1), gain=1.0)
        self.conv_in = CausalConv3d(wts, "conv1", z, dims[0], gain=1.0)
        self.middle: list[Layer] = [ResidualBlock(wts, "middle.0", dims[0], dims[0])]
        if cfg.vae_attention:
            self.middle.append(AttentionBlock(wts, "middle.1", dims[0]))
        self.middle.append(ResidualBlock(wts, "middle.2", dims[0], dims[0]))
        self.stages: list[Layer] = []
        cur = dims[0]
        for i, cout in enumerate(dims[1:]):
            for j in range(cfg.vae_decoder_blocks):
                self.stages.append(ResidualBlock(wts, f"up.{i}.{j}", cur, cout))
                cur = cout
            if i != len(mult) - 1:  # the upsample halves the width (Wan)
                mode = "upsample3d" if up_time[i] else "upsample2d"
                self.stages.append(Resample(wts, f"up.{i}.resample", cur, cout // 2, mode))
                cur = cout // 2
        self.head_norm = RMSNorm(wts, cur)
        self.head = CausalConv3d(wts, "head.conv", cur, 3, gain=0.5)

    def reset(self) -> None:
        _reset(self.middle + self.stages, [self.conv_z, self.conv_in, self.head])

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(self.conv_z(z))
        for layer in self.middle + self.stages:
            x = layer(x)
        return self.head(torch.nn.functional.silu(self.head_norm(x))).clamp_(-1.0, 1.0)


class VaeEncoder:
    """Video ``[1, 3, F, H, W]`` in [-1, 1] -> latent means ``[1, z, T, H/8, W/8]``; stateless per call."""

    def __init__(self, cfg: ReferenceConfig, wts: VaeWeights) -> None:
        mult, dim, z = cfg.vae_mult, cfg.vae_dim, cfg.latent_channels
        dims = [dim * u for u in (1, *mult)]
        down_time = (False, True, True)  # Wan: temporal downsampling in the last two stages
        self.conv_in = CausalConv3d(wts, "conv1", 3, dims[0], gain=1.0)
        self.stages: list[Layer] = []
        cur = dims[0]
        for i, cout in enumerate(dims[1:]):
            for j in range(cfg.vae_encoder_blocks):
                self.stages.append(ResidualBlock(wts, f"down.{i}.{j}", cur, cout))
                cur = cout
            if i != len(mult) - 1:
                mode = "downsample3d" if down_time[i] else "downsample2d"
                self.stages.append(Resample(wts, f"down.{i}.resample", cur, cout, mode))
                cur = cout
        self.middle: list[Layer] = [ResidualBlock(wts, "middle.0", dims[-1], dims[-1])]
        if cfg.vae_attention:
            self.middle.append(AttentionBlock(wts, "middle.1", dims[-1]))
        self.middle.append(ResidualBlock(wts, "middle.2", dims[-1], dims[-1]))
        self.head_norm = RMSNorm(wts, dims[-1])
        self.head = CausalConv3d(wts, "head.conv", dims[-1], 2 * z)
        self.conv_mu = CausalConv3d(wts, "conv1x1", 2 * z, 2 * z, (1, 1, 1), gain=1.0)
        self.z = z

    def __call__(self, x: torch.Tensor, causal_start: bool) -> torch.Tensor:
        _reset(self.stages + self.middle, [self.conv_in, self.head, self.conv_mu])
        x = self.conv_in(x)
        for layer in self.stages:
            x = layer(x, causal_start) if isinstance(layer, Resample) else layer(x)
        for layer in self.middle:
            x = layer(x)
        x = self.conv_mu(self.head(torch.nn.functional.silu(self.head_norm(x))))
        return x[:, : self.z]


class ReferenceVAE:
    """The stage-0 VAE: ``decode(latents, first_chunk) -> uint8 [F, H, W, 3]``, ``encode(frames) -> latents``.

    Computes in ``dtype`` on CUDA (the run's dtype, e.g. bf16) and in float32 on the CPU, under
    ``torch.inference_mode``; channels-last on CUDA.
    """

    def __init__(self, cfg: ReferenceConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.compute_dtype = dtype if self.device.type == "cuda" else torch.float32
        cl = self.device.type == "cuda"
        self.fmt = torch.channels_last_3d if cl else torch.contiguous_format
        with torch.inference_mode():
            self.decoder = VaeDecoder(cfg, VaeWeights(cfg.weight_seed, "vae.decoder", self.device, self.compute_dtype, cl))
            self.encoder = VaeEncoder(cfg, VaeWeights(cfg.weight_seed, "vae.encoder", self.device, self.compute_dtype, cl))

    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """``[C, T, h, w]`` -> uint8 ``[F, 8h, 8w, 3]`` on this device; F = 4T, or 4T-3 if ``first_chunk``."""
        with torch.inference_mode():
            if first_chunk:
                self.decoder.reset()
            z = latents.to(self.device, self.compute_dtype)[None].contiguous(memory_format=self.fmt)
            if self.cfg.vae_per_frame:  # Wan's loop: one latent frame per pass (same result, smaller convs)
                x = torch.cat([self.decoder(z[:, :, i : i + 1]) for i in range(z.shape[2])], dim=2)[0]
            else:
                x = self.decoder(z)[0]  # [3, F, H, W]
            return x.add_(1.0).mul_(127.5).round_().permute(1, 2, 3, 0).to(torch.uint8).contiguous()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[F, H, W, 3]`` -> ``[C, T, H/8, W/8]`` float (compute dtype); F = 4k+1 (causal start) or 4k."""
        with torch.inference_mode():
            x = frames.to(self.device).permute(3, 0, 1, 2)[None].to(self.compute_dtype)
            x = (x / 127.5 - 1.0).contiguous(memory_format=self.fmt)
            return self.encoder(x, causal_start=frames.shape[0] % 4 == 1)[0]
