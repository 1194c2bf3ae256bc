"""3D rotary position embedding over (latent frame, height, width), as in Wan 2.1.

The head dimension's complex pairs are split between the three axes: ``c - 2*(c//3)`` pairs for
the frame axis and ``c//3`` each for height and width (``c = head_dim // 2``). Frame positions are
absolute latent-frame indices on the cache's timeline, so keys stored in the KV cache keep their
rotation and attention only sees relative offsets.
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(pairs: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(pairs, dtype=torch.float64) * 2 / (2 * pairs)))


def rope_tables(
    frame_start: int,
    frames: int,
    grid: tuple[int, int],
    head_dim: int,
    device: torch.device,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each ``[frames*gh*gw, head_dim//2]`` float32, token order (frame, h, w)."""
    gh, gw = grid
    pf, ph, pw = axis_pairs(head_dim)
    f = torch.arange(frame_start, frame_start + frames, dtype=torch.float64)
    h = torch.arange(gh, dtype=torch.float64)
    w = torch.arange(gw, dtype=torch.float64)
    af = torch.outer(f, _inv_freq(pf, theta))[:, None, None, :].expand(frames, gh, gw, pf)
    ah = torch.outer(h, _inv_freq(ph, theta))[None, :, None, :].expand(frames, gh, gw, ph)
    aw = torch.outer(w, _inv_freq(pw, theta))[None, None, :, :].expand(frames, gh, gw, pw)
    angles = torch.cat([af, ah, aw], dim=-1).reshape(frames * gh * gw, pf + ph + pw)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``[tokens, heads, head_dim]`` (computed in float32)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)
