"""3D rotary position embedding over (latent frame, height, width), as in Wan 2.1.

The head dimension's complex pairs are split between the three axes: ``c - 2*(c//3)`` pairs for
the frame axis and ``c//3`` each for height and width (``c = head_dim // 2``; Wan's
``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)`` features). The caller picks the frame positions: the
reference uses the cache's timeline, Krea positions relative to the KV window (context frames at
0..n-1, the chunk after them). Keys stored in the KV cache keep their rotation, so attention only
sees relative offsets either way.
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
    """cos and signed sin per element, each ``[frames*gh*gw, head_dim]`` float32, token order (frame, h, w)."""
    gh, gw = grid
    pf, ph, pw = axis_pairs(head_dim)
    f = torch.arange(frame_start, frame_start + frames, dtype=torch.float64)
    h = torch.arange(gh, dtype=torch.float64)
    w = torch.arange(gw, dtype=torch.float64)
    af = torch.outer(f, _inv_freq(pf, theta))[:, None, None, :].expand(frames, gh, gw, pf)
    ah = torch.outer(h, _inv_freq(ph, theta))[None, :, None, :].expand(frames, gh, gw, ph)
    aw = torch.outer(w, _inv_freq(pw, theta))[None, None, :, :].expand(frames, gh, gw, pw)
    angles = torch.cat([af, ah, aw], dim=-1).reshape(frames * gh * gw, pf + ph + pw)
    cos, sin = angles.cos(), angles.sin()
    # per element of a pair (x0, x1): cos for both; -sin for x0, +sin for x1 (see apply_rope)
    cos2 = cos.repeat_interleave(2, dim=-1)
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)
    return cos2.float().to(device), sin2.float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``[tokens, heads, head_dim]`` by the tables of ``rope_tables``:
    (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), written as ``x * cos + swap_pairs(x) * sin`` (one
    multiply-add per element, no interleaving stack: it fuses into one pass). Float32."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return xf * cos[:, None, :] + swapped * sin[:, None, :]
