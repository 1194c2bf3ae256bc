"""Layers of the reference VAE, after Wan 2.1's causal VAE (``wan/modules/vae.py``), seeded weights.

Tensors are ``[B, C, T, H, W]``. Every temporal convolution is causal: it pads only the past, with
the last frames of the previous call (``past``, Wan's ``feat_cache``) or zeros after a ``reset``.
Spatial resampling runs per frame as 2D convolutions, as in Wan. On CUDA activations are kept
channels-last (``channels_last_3d``), which cuDNN prefers; the 2D views of them stay channels-last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .weights import mix_seed, seeded_randn

# E[silu(x)^2] for x ~ N(0, 1): a conv after norm + SiLU with std gain/sqrt(fan_in * this) keeps unit RMS
_SILU_GAIN = 1.0 / math.sqrt(0.3557)


class VaeWeights:
    """Seeded random weights, generated on the CPU in float32 (same on every device), moved once."""

    def __init__(self, seed: int, prefix: str, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        self.seed, self.prefix, self.device, self.dtype, self.channels_last = seed, prefix, device, dtype, channels_last

    def conv(self, name: str, shape: tuple[int, ...], gain: float = _SILU_GAIN) -> tuple[torch.Tensor, torch.Tensor]:
        fan_in = math.prod(shape[1:])
        w = seeded_randn(shape, mix_seed(self.seed, self.prefix, name)) * (gain / math.sqrt(fan_in))
        b = seeded_randn((shape[0],), mix_seed(self.seed, self.prefix, name, "bias")) * 0.02
        w = w.to(self.device, self.dtype)
        if self.channels_last:
            w = w.contiguous(memory_format=torch.channels_last_3d if w.dim() == 5 else torch.channels_last)
        return w, b.to(self.device, self.dtype)

    def ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, 1, 1, 1, device=self.device, dtype=self.dtype)  # Wan's RMS_norm gamma at init

    def memory_format(self, dims: int) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last_3d if dims == 5 else torch.channels_last


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T, H, W]`` -> ``[B*T, C, H, W]`` (a view when x is channels_last_3d)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(y: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = y.shape
    return y.reshape(b, bt // b, c, h, w).transpose(1, 2)


class CausalConv3d:
    """Conv3d, temporal kernel ``kt`` causal (past ``kt - 1`` frames), spatial 'same' padding.

    CUDA: ``F.conv3d`` (cuDNN). CPU: the same sum as ONE 2D conv over the ``kt`` time-shifted frames
    stacked on channels (PyTorch's CPU conv3d is ~10x slower than conv2d at these small widths).
    """

    def __init__(self, wts: VaeWeights, name: str, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 gain: float = _SILU_GAIN) -> None:
        self.weight, self.bias = wts.conv(name, (cout, cin, *kernel), gain)
        self.kt, self.pad_hw = kernel[0], (kernel[1] // 2, kernel[2] // 2)
        self.fmt = wts.memory_format(5)
        self.as_2d = wts.device.type == "cpu"
        if self.as_2d:  # [Cout, Cin, kt, kh, kw] -> [Cout, kt*Cin, kh, kw], time-major channels
            self.weight = self.weight.permute(0, 2, 1, 3, 4).reshape(cout, self.kt * cin, *kernel[1:]).contiguous()
        self.past: torch.Tensor | None = None  # the last kt-1 input frames of the previous call

    def reset(self) -> None:
        self.past = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        if self.kt > 1:
            n = self.kt - 1
            past = self.past
            if past is None:
                past = torch.zeros_like(x[:, :, :1]).expand(-1, -1, n, -1, -1)
            x = torch.cat([past, x], dim=2)
            if not self.as_2d:
                x = x.contiguous(memory_format=self.fmt)
            self.past = x[:, :, -n:].clone()
        if not self.as_2d:
            return F.conv3d(x, self.weight, self.bias, padding=(0, *self.pad_hw))
        b = x.shape[0]
        f = x.transpose(1, 2)  # [B, T+kt-1, C, H, W]
        f = torch.cat([f[:, k : k + t] for k in range(self.kt)], dim=2) if self.kt > 1 else f
        y = F.conv2d(f.reshape(b * t, *f.shape[2:]), self.weight, self.bias, padding=self.pad_hw)
        return from_frames(y, b)


class RMSNorm:
    """Wan's ``RMS_norm``: L2-normalise over channels, times sqrt(C) and gamma."""

    def __init__(self, wts: VaeWeights, dim: int) -> None:
        self.scale = dim**0.5
        self.gamma = wts.ones(dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gamma if x.dim() == 5 else self.gamma[:, :, 0]
        # = F.normalize(x, dim=1) * sqrt(C) (eps aside); F.normalize's strided reduction is slow on the CPU
        return x * torch.rsqrt(x.square().sum(1, keepdim=True).clamp_min_(1e-24)) * (self.scale * g)


class ResidualBlock:
    """norm, SiLU, 3x3x3 causal conv, norm, SiLU, 3x3x3 causal conv; 1x1x1 shortcut if widths differ."""

    def __init__(self, wts: VaeWeights, name: str, cin: int, cout: int) -> None:
        self.norm1, self.norm2 = RMSNorm(wts, cin), RMSNorm(wts, cout)
        self.conv1 = CausalConv3d(wts, f"{name}.conv1", cin, cout)
        self.conv2 = CausalConv3d(wts, f"{name}.conv2", cout, cout, gain=0.5 * _SILU_GAIN)
        self.shortcut = CausalConv3d(wts, f"{name}.shortcut", cin, cout, (1, 1, 1), gain=1.0) if cin != cout else None

    def convs(self) -> list[CausalConv3d]:
        return [self.conv1, self.conv2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class AttentionBlock:
    """Single-head self-attention over the pixels of each frame (Wan's middle ``AttentionBlock``)."""

    def __init__(self, wts: VaeWeights, name: str, dim: int) -> None:
        self.norm = RMSNorm(wts, dim)
        self.qkv_w, self.qkv_b = wts.conv(f"{name}.qkv", (3 * dim, dim, 1, 1), gain=1.0)
        self.proj_w, self.proj_b = wts.conv(f"{name}.proj", (dim, dim, 1, 1), gain=0.5)

    def convs(self) -> list[CausalConv3d]:
        return []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = to_frames(x)
        n, c, h, w = y.shape
        qkv = F.conv2d(self.norm(y), self.qkv_w, self.qkv_b)  # [n, 3c, h, w]
        q, k, v = qkv.reshape(n, 3, c, h * w).permute(1, 0, 3, 2).unsqueeze(2).unbind(0)  # [n, 1, hw, c] each
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return x + from_frames(F.conv2d(a, self.proj_w, self.proj_b), b)


class Resample:
    """Wan's ``Resample``: x2 up (nearest + 3x3 conv; Wan: to dim/2) or x2 down (stride-2 3x3 conv), spatial
    per frame; the ``3d`` modes also resample time with a causal (3,1,1) conv.

    Time, as in Wan: ``upsample3d`` doubles every frame (a conv to 2*dim channels, interleaved) except
    the very first frame after a reset, which stays one frame (the causal start: 1 latent frame -> 1
    video frame). ``downsample3d`` halves time with a stride-2 conv over [previous frame, frames]; on a
    causal start the first frame is kept alone.
    """

    def __init__(self, wts: VaeWeights, name: str, dim: int, cout: int, mode: str) -> None:
        self.mode = mode
        self.fmt2 = wts.memory_format(4)
        self.w, self.b = wts.conv(f"{name}.resample", (cout, dim, 3, 3), gain=1.0)
        self.time_conv: CausalConv3d | None = None  # upsample3d: causal (3,1,1) conv to 2*dim channels
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(wts, f"{name}.time_conv", dim, 2 * dim, (3, 1, 1), gain=1.0)
        if mode == "downsample3d":  # (3,1,1) conv, stride 2 in time, over [previous frame, frames]
            self.down_w, self.down_b = wts.conv(f"{name}.time_conv", (cout, cout, 3, 1, 1), gain=1.0)
        self.fmt3 = wts.memory_format(5)
        self.started = False  # a frame has been seen since the last reset
        self.last: torch.Tensor | None = None  # downsample3d: the last input frame of the previous call

    def convs(self) -> list[CausalConv3d]:
        return [self.time_conv] if self.time_conv is not None else []

    def reset(self) -> None:
        self.started, self.last = False, None

    def _upsample_time(self, x: torch.Tensor) -> torch.Tensor:
        assert self.time_conv is not None
        head = None
        if not self.started:
            self.started = True
            self.time_conv.reset()
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            x = y if head is None else torch.cat([head, y], dim=2)
        elif head is not None:
            x = head
        return x.contiguous(memory_format=self.fmt3)

    def _downsample_time(self, x: torch.Tensor, causal_start: bool) -> torch.Tensor:
        head = None
        if causal_start and not self.started:
            head, prev = x[:, :, :1], x[:, :, :1]
            x = x[:, :, 1:]
        else:
            prev = self.last if self.last is not None else torch.zeros_like(x[:, :, :1])
        self.started = True
        if x.shape[2]:
            self.last = x[:, :, -1:].clone()
            y = torch.cat([prev, x], dim=2).contiguous(memory_format=self.fmt3)
            y = F.conv3d(y, self.down_w, self.down_b, stride=(2, 1, 1))
            return y if head is None else torch.cat([head, y], dim=2).contiguous(memory_format=self.fmt3)
        self.last = head
        return head  # type: ignore[return-value]

    def __call__(self, x: torch.Tensor, causal_start: bool = True) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x)
        b = x.shape[0]
        y = to_frames(x)
        if self.mode.startswith("up"):
            y = F.interpolate(y, scale_factor=2.0, mode="nearest-exact").contiguous(memory_format=self.fmt2)
            y = F.conv2d(y, self.w, self.b, padding=1)
        else:
            y = F.conv2d(F.pad(y, (0, 1, 0, 1)), self.w, self.b, stride=2)
        x = from_frames(y, b)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, causal_start)
        return x
