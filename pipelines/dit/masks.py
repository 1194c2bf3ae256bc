"""Additive attention masks over a forward's own tokens (the recompute pass: the cache was just reset,
so the context frames sit in the first slots in timeline order)."""

from __future__ import annotations

import torch


def block_causal_mask(frames: int, tokens_per_frame: int, frames_per_block: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Additive ``[N, N]`` (N = frames * tokens_per_frame): 0 where the key lies before the end of the
    query's block (blocks of ``frames_per_block`` frames from frame 0), -inf elsewhere (Scope's
    ``_prepare_blockwise_causal_attn_mask(local_attn_size=-1)``). None when it is one block (full
    attention: no mask, the fast kernels)."""
    if frames <= frames_per_block:
        return None
    n = frames * tokens_per_frame
    block = frames_per_block * tokens_per_frame
    idx = torch.arange(n, device=device)
    ends = torch.clamp((idx // block + 1) * block, max=n)
    allowed = idx[None, :] < ends[:, None]
    return torch.zeros(n, n, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
