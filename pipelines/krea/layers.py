"""Small pieces of Wan 2.1's math, written once: timestep embedding, 3D RoPE, patchify / unpatchify,
and the QK RMSNorm over ALL heads computed exactly under tensor parallelism.

RMSNorm over all heads (Wan's ``WanRMSNorm(dim)`` on q and k): each rank holds the features of its
heads only, so the mean of squares needs every rank's sum: one small all-reduce of per-token sums
of squares (fp32, ``[tokens, n]`` for n tensors normalised together), then each rank scales its own
slice. Same result as the unsharded norm up to the order of one float sum.
"""

from __future__ import annotations

import torch

from ..comm import Communicator
from .config import PATCH


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's ``sinusoidal_embedding_1d``: ``[cos(t*f), sin(t*f)]`` with f = 10000^(-i/half), in float64;
    ``t`` [F] -> [F, dim] float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs of the head dimension given to (frame, height, width): Wan's
    ``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)`` features."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_tables(
    frame_start: int, frames: int, grid: tuple[int, int], head_dim: int, device: torch.device, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[frames*gh*gw, head_dim//2]`` (float32; angles in float64) for frame positions
    ``frame_start .. frame_start+frames-1``, token order (frame, h, w). Positions are relative to the
    KV window (Krea / Scope): context frames at 0..n-1, the chunk after them."""
    gh, gw = grid
    pf, ph, pw = axis_pairs(head_dim)

    def inv(p: int) -> torch.Tensor:
        return 1.0 / theta ** (torch.arange(p, dtype=torch.float64) * 2 / (2 * p))

    f = torch.arange(frame_start, frame_start + frames, dtype=torch.float64)
    af = torch.outer(f, inv(pf))[:, None, None, :].expand(frames, gh, gw, pf)
    ah = torch.outer(torch.arange(gh, dtype=torch.float64), inv(ph))[None, :, None, :].expand(frames, gh, gw, ph)
    aw = torch.outer(torch.arange(gw, dtype=torch.float64), inv(pw))[None, None, :, :].expand(frames, gh, gw, pw)
    angles = torch.cat([af, ah, aw], dim=-1).reshape(frames * gh * gw, pf + ph + pw)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``[tokens, heads, head_dim]`` (in float32; result in x's dtype)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[C, T, h, w]`` -> tokens ``[T*(h/2)*(w/2), C*1*2*2]``, features in (c, kt, kh, kw) order: the
    order of the Conv3d patch embedding's flattened weight, so the embedding is one matmul."""
    c, t, h, w = latents.shape
    _, ph, pw = PATCH
    x = latents.reshape(c, t, h // ph, ph, w // pw, pw).permute(1, 2, 4, 0, 3, 5)
    return x.reshape(t * (h // ph) * (w // pw), c * ph * pw)


def unpatchify(tokens: torch.Tensor, c: int, t: int, h: int, w: int) -> torch.Tensor:
    """The head's output ``[T*gh*gw, 1*2*2*C]`` -> ``[C, T, h, w]``: Wan's head orders features
    (kt, kh, kw, c) (``einsum('fhwpqrc->cfphqwr')``)."""
    _, ph, pw = PATCH
    x = tokens.reshape(t, h // ph, w // pw, ph, pw, c).permute(5, 0, 1, 3, 2, 4)
    return x.reshape(c, t, h, w)


def rms_norm_across_heads(
    xs: list[torch.Tensor], weights: list[torch.Tensor], full_dim: int, eps: float, comm: Communicator
) -> list[torch.Tensor]:
    """Wan's ``WanRMSNorm(dim)`` of each ``xs[i]`` (``[tokens, local_features]``, this rank's heads of a
    ``full_dim``-wide tensor), with ONE all-reduce of the per-token sums of squares of all of them.

    ``x.float() * rsqrt(mean(x^2 over full_dim) + eps)`` -> x's dtype, times the weight slice.
    """
    sums = torch.stack([x.float().pow(2).sum(-1) for x in xs], dim=-1)  # [tokens, n]
    comm.all_reduce_sum_(sums)
    scale = torch.rsqrt(sums / full_dim + eps)
    return [(x.float() * scale[:, i : i + 1]).to(x.dtype) * w for i, (x, w) in enumerate(zip(xs, weights, strict=True))]
