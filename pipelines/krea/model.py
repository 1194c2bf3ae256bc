"""The causal DiT of Krea Realtime Video (Wan 2.1 T2V structure), one tensor-parallel shard.

Replicated on every rank: patch embedding (Conv3d 1x2x2 as one matmul), text embedding, time
embedding + projection, the head. Sharded: the blocks (``block.py``). One ``forward`` is one
generator call (counted). How a forward attends is the caller's ``AttnFn`` (the three below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..comm import Communicator
from ..reference.sharding import ShardPlan
from .attention import attend, block_causal_mask, kv_bias_mask
from .block import AttnFn, KreaBlockShard
from .checkpoint import ShardReader
from .config import KreaRun
from .kv_cache import KreaKVCache
from .layers import patchify, rope_tables, sinusoidal_embedding, unpatchify

TextKV = list[tuple[torch.Tensor, torch.Tensor]]


class KreaDiTShard:
    def __init__(self, run: KreaRun, plan: ShardPlan, reader: ShardReader, comm: Communicator) -> None:
        self.run, self.cfg, self.plan, self.comm = run, run.model, plan, comm
        self.device, self.dtype = reader.device, reader.dtype
        cfg, r, d = run.model, reader, run.model.dim
        self.w_patch = r.full("patch_embedding.weight").reshape(d, cfg.patch_features)
        self.b_patch = r.full("patch_embedding.bias")
        self.w_text1, self.b_text1 = r.full("text_embedding.0.weight"), r.full("text_embedding.0.bias")
        self.w_text2, self.b_text2 = r.full("text_embedding.2.weight"), r.full("text_embedding.2.bias")
        self.w_time1, self.b_time1 = r.full("time_embedding.0.weight").float(), r.full("time_embedding.0.bias").float()
        self.w_time2, self.b_time2 = r.full("time_embedding.2.weight").float(), r.full("time_embedding.2.bias").float()
        self.w_tproj = r.full("time_projection.1.weight").float()
        self.b_tproj = r.full("time_projection.1.bias").float()
        self.blocks = [KreaBlockShard(cfg, plan, r, i) for i in range(cfg.num_blocks)]
        self.head_modulation = r.full("head.modulation").float().view(2, d)
        self.w_head, self.b_head = r.full("head.head.weight"), r.full("head.head.bias")
        self.cache = KreaKVCache(cfg.num_blocks, plan.local_heads, cfg.head_dim, run.tokens_per_frame,
                                 cfg.context_frames, cfg.chunk_frames, self.device, self.dtype)
        self.forward_calls = 0
        self.text_embeds = 0  # cross-attention K/V computations (one per new conditioning)
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # --- pieces ---------------------------------------------------------------------------------------
    def embed_text(self, conditioning: torch.Tensor) -> TextKV:
        """Per-block cross-attention K/V of one conditioning ``[text_len, text_dim]`` (all-reduces inside)."""
        self.text_embeds += 1
        x = conditioning.to(self.device, self.dtype)
        x = F.gelu(F.linear(x, self.w_text1, self.b_text1), approximate="tanh")
        x = F.linear(x, self.w_text2, self.b_text2)
        return [b.cross_kv(x, self.comm) for b in self.blocks]

    def time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` [G] (timesteps 0..1000) -> e ``[G, dim]``, e0 ``[G, 6, dim]`` (float32)."""
        s = sinusoidal_embedding(t.to(self.device), self.cfg.freq_dim)
        e = F.linear(F.silu(F.linear(s, self.w_time1, self.b_time1)), self.w_time2, self.b_time2)
        e0 = F.linear(F.silu(e), self.w_tproj, self.b_tproj).view(-1, 6, self.cfg.dim)
        return e, e0

    def rope(self, frame_start: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (frame_start, frames)
        if key not in self._rope:
            if len(self._rope) > 16:
                self._rope.clear()
            self._rope[key] = rope_tables(frame_start, frames, self.run.grid, self.cfg.head_dim, self.device)
        return self._rope[key]

    def forward(
        self, latents: torch.Tensor, t: float | torch.Tensor, frame_start: int, text_kv: TextKV, attn: AttnFn
    ) -> torch.Tensor:
        """Flow prediction ``[C, F, h, w]`` (float32) for ``latents`` at timestep ``t`` (one for all frames,
        or a tensor of one per frame) at window-relative frame positions ``frame_start ..``."""
        self.forward_calls += 1
        cfg = self.cfg
        c, frames, h, w = latents.shape
        x = F.linear(patchify(latents.to(self.device, self.dtype)), self.w_patch, self.b_patch).float()
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        e, e0 = self.time_embedding(tt)
        rope = self.rope(frame_start, frames)
        for block, kv in zip(self.blocks, text_kv, strict=True):
            x = block.forward(x, e0, rope, attn, kv, self.comm)
        g = e.shape[0]
        shift, scale = (self.head_modulation[None] + e[:, None, :])[:, :, None, :].unbind(1)
        x = (F.layer_norm(x, (cfg.dim,), eps=cfg.eps).view(g, -1, cfg.dim) * (1 + scale) + shift)
        out = F.linear(x.view(-1, cfg.dim).to(self.dtype), self.w_head, self.b_head).float()
        return unpatchify(out, c, frames, h, w)

    # --- how a forward attends -----------------------------------------------------------------------
    def cached_attention(self, chunk_tokens: int, kv_bias: float) -> AttnFn:
        """Denoising: the chunk attends to the committed window + itself (writes its K/V after the
        window), with the KV attention bias on past frames but the first."""
        cache = self.cache
        keys = cache.frames * cache.tpf + chunk_tokens
        mask = kv_bias_mask(keys, cache.tpf, chunk_tokens, kv_bias, self.device)

        def fn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kk, vv = cache.write_chunk(i, k, v)
            return attend(q, kk, vv, mask)

        return fn

    def recompute_attention(self, frames: int) -> AttnFn:
        """The recompute pass: block-causal attention over the context frames, K/V into the cache."""
        cache = self.cache
        mask = block_causal_mask(frames, cache.tpf, self.cfg.chunk_frames, self.device)
        if bool((mask == 0).all()):
            mask = None  # one block: full attention

        def fn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write_context(i, k, v)
            return attend(q, k.transpose(0, 1), v.transpose(0, 1), mask)

        return fn


def dense_attention(mask: torch.Tensor | None = None) -> AttnFn:
    """Attention over this forward's own tokens only (an additive ``[N, N]`` mask or none): no cache."""

    def fn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k.transpose(0, 1), v.transpose(0, 1), mask)

    return fn


__all__ = ["KreaDiTShard", "TextKV", "dense_attention", "KreaKVCache"]
