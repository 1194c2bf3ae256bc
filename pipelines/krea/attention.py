"""Attention of the Krea generator: plain SDPA, with an additive mask when one is needed.

- The chunk's denoising steps attend to the cached window plus the chunk itself, with Scope's KV
  attention bias: ``log(bias)`` added to the scores of the cached frames other than the first one
  (the anchor) and other than the chunk (Scope's ``score_mod``: kv_idx in
  ``[frame_seqlen, cache_len - chunk_tokens)``). Here it is an additive ``[1, M]`` mask to SDPA (CPU
  and GPU alike; a flex_attention score_mod is the faster GPU form of the same rule).
- The recompute pass attends block-causally over the context frames (blocks of ``chunk_frames``
  from frame 0: a query sees every key before the end of its own block), at t = 0, without bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[N, H, d]``; k, v ``[H, M, d]``; ``mask``: additive, broadcastable to ``[N, M]`` -> ``[N, H*d]``."""
    m = None if mask is None else mask.to(q.dtype)[None, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=m)
    return out[0].transpose(0, 1).flatten(1)


def kv_bias_mask(
    keys: int, tokens_per_frame: int, chunk_tokens: int, bias: float, device: torch.device
) -> torch.Tensor | None:
    """``[1, keys]`` float32: ``log(bias)`` on keys ``[tokens_per_frame, keys - chunk_tokens)``, 0 elsewhere;
    None when nothing is biased (bias 1, or no past frame but the first)."""
    lo, hi = tokens_per_frame, keys - chunk_tokens
    if bias == 1.0 or hi <= lo:
        return None
    mask = torch.zeros(1, keys, device=device)
    mask[:, lo:hi] = math.log(bias)
    return mask


def block_causal_mask(frames: int, tokens_per_frame: int, frames_per_block: int, device: torch.device) -> torch.Tensor:
    """Additive ``[N, N]`` (N = frames * tokens_per_frame): 0 where the key lies before the end of the
    query's block (blocks of ``frames_per_block`` frames from frame 0), -inf elsewhere. Scope's
    ``_prepare_blockwise_causal_attn_mask(local_attn_size=-1)``."""
    n = frames * tokens_per_frame
    block = frames_per_block * tokens_per_frame
    idx = torch.arange(n, device=device)
    ends = torch.clamp((idx // block + 1) * block, max=n)
    allowed = idx[None, :] < ends[:, None]
    return torch.zeros(n, n, device=device).masked_fill_(~allowed, float("-inf"))
