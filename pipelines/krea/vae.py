"""The Wan 2.1 VAE of stage 0 through ``diffusers`` (``AutoencoderKLWan``), with streaming decode.

``--pipeline-option vae=PATH``: ``Wan2.1_VAE.pth`` of the Wan 2.1 release (original names, converted
by diffusers' ``convert_wan_vae_to_diffusers``; Wan 2.1's default config), a ``.safetensors`` with
either naming, or a diffusers ``AutoencoderKLWan`` folder.

Streaming decode (Wan's / Scope's ``stream_decode``): the decoder runs one latent frame at a time
with a causal-conv feature cache held HERE (``feat_cache``), not inside the diffusers module, so it
persists across chunks: 3 latent frames give 1 + 4 + 4 = 9 video frames on an epoch's first chunk
(``first_chunk=True`` empties the cache first: a hard cut), 12 on every later chunk. The whole
stream decodes to exactly what one ``decode`` of all its latents gives (tested).

Encode (the context frame a recompute needs): diffusers' ``encode`` runs with its own temporary
cache, so it never touches the streaming decode state. ``1 + 4k`` frames -> ``1 + k`` latent frames
(normalised: (mu - mean) / std). Latents are de-normalised before decoding: z * std + mean.
"""

from __future__ import annotations

from pathlib import Path

import torch


class VAEError(ValueError):
    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"VAE {path}: {reason}")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise VAEError(path, "is not a state dict")
    return state


def load_wan_vae(path: Path, device: torch.device, dtype: torch.dtype):
    """An ``AutoencoderKLWan`` in eval mode on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise VAEError(path, "a folder needs config.json (a diffusers AutoencoderKLWan folder)")
        vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, low_cpu_mem_usage=False)
    else:
        state = _load_state(path)
        if "decoder.conv_in.weight" not in state:  # original Wan names (Wan2.1_VAE.pth)
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

            state = convert_wan_vae_to_diffusers(state)
        vae = AutoencoderKLWan()  # Wan 2.1's config (base_dim 96, z 16, dim_mult 1,2,4,4)
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise VAEError(path, f"weights do not fit Wan 2.1's AutoencoderKLWan: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    if vae.config.z_dim != 16:
        raise VAEError(path, f"z_dim {vae.config.z_dim}, expected 16 (Wan 2.1)")
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


class StreamingWanVAE:
    """Decode chunk after chunk with the causal state kept between them; encode without touching it."""

    def __init__(self, vae, device: torch.device, dtype: torch.dtype) -> None:
        self.vae, self.device, self.dtype = vae, device, dtype
        z = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)
        self._convs = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
        self.feat_cache: list = [None] * self._convs
        self.decoded_frames = 0  # latent frames decoded since the last clear

    def clear(self) -> None:
        self.feat_cache = [None] * self._convs
        self.decoded_frames = 0

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """Normalised latents ``[C, T, h, w]`` -> video ``[F, 3, H, W]`` float32 in [-1, 1]; F = 4T, or
        4T - 3 when ``first_chunk`` (the stream restarts: the cache is cleared first)."""
        if first_chunk:
            self.clear()
        z = latents.to(self.device, torch.float32)[None] * self.std + self.mean
        x = self.vae.post_quant_conv(z.to(self.dtype))  # 1x1x1: stateless
        outs = []
        for i in range(x.shape[2]):
            outs.append(self.vae.decoder(x[:, :, i : i + 1], feat_cache=self.feat_cache, feat_idx=[0],
                                         first_chunk=self.decoded_frames == 0))
            self.decoded_frames += 1
        video = torch.cat(outs, dim=2).float().clamp(-1.0, 1.0)
        return video[0].transpose(0, 1)  # [F, 3, H, W]

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[F, 3, H, W]`` in [-1, 1], F = 1 + 4k -> normalised latents ``[C, 1 + k, h, w]`` (float32)."""
        x = video.to(self.device, self.dtype).transpose(0, 1)[None]
        mu = self.vae.encode(x).latent_dist.mode().float()
        return ((mu - self.mean) / self.std)[0]
