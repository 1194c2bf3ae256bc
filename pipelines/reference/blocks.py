"""One causal DiT block (Wan 2.1 structure), tensor-parallel shard.

    x += gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)     all-reduce 1 (after o-proj)
    x += CrossAttn(LN_affine(x), text)                                 all-reduce 2 (after o-proj)
    x += gate_mlp * FFN(LN(x) * (1 + scale_mlp) + shift_mlp)           all-reduce 3 (after down-proj)

Megatron-style: q/k/v and FFN-up are column-parallel (this rank's heads / FFN columns), o and
FFN-down are row-parallel (partial sums, all-reduced; the bias is added once, after the sum).
Cross-attention heads are sharded too, which costs the third all-reduce per block (Wan's
sequential self-attn -> cross-attn -> FFN needs the full residual before each norm).
QK-norm is RMSNorm per head (Wan normalises over all heads, which under TP would need one more
small all-reduce of the squared sums); see specs/tensor-parallel.md.
The residual stream and the norms run in float32; matmuls and attention in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..comm import Communicator
from .kv_cache import RollingKVCache
from .presets import ReferenceConfig
from .rope import apply_rope
from .sharding import ShardPlan
from .weights import WeightSource

# Random weights give the text little say; this gain makes a new prompt visibly change the video.
CROSS_ATTN_GAIN = 3.0


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q ``[N, H, d]``, k/v ``[H, M, d]`` -> ``[N, H*d]`` (full attention, no mask)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None])
    return out[0].transpose(0, 1).flatten(1)


class BlockShard:
    """Weights and forward of one block for one mesh rank."""

    def __init__(self, cfg: ReferenceConfig, plan: ShardPlan, src: WeightSource, index: int) -> None:
        self.index = index
        self.cfg = cfg
        self.heads = plan.local_heads
        d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
        a0, a1 = plan.head_features
        c0, c1 = plan.ffn_cols
        s_in, s_ffn = d**-0.5, f**-0.5
        s_res = (2 * cfg.num_blocks) ** -0.5  # keep the residual stream bounded over many blocks
        p = f"blocks.{index}."
        self.modulation = src.replicated(p + "modulation", (6, d), d**-0.5).float()
        # self-attention: fused column-parallel qkv for this rank's heads
        self.w_qkv = torch.cat([src.rows(p + f"self_attn.{n}.weight", (d, d), s_in, a0, a1) for n in "qkv"])
        self.b_qkv = torch.cat([src.rows(p + f"self_attn.{n}.bias", (d,), 0.02, a0, a1) for n in "qkv"])
        self.norm_q = src.replicated(p + "self_attn.norm_q.weight", (hd,), 0.1, mean=1.0)
        self.norm_k = src.replicated(p + "self_attn.norm_k.weight", (hd,), 0.1, mean=1.0)
        self.w_o = src.cols(p + "self_attn.o.weight", (d, d), s_in * s_res, a0, a1)
        self.b_o = src.replicated(p + "self_attn.o.bias", (d,), 0.02).float()
        # cross-attention to the text
        self.norm3_w = src.replicated(p + "norm3.weight", (d,), 0.1, mean=1.0).float()
        self.norm3_b = src.replicated(p + "norm3.bias", (d,), 0.02).float()
        self.w_cq = src.rows(p + "cross_attn.q.weight", (d, d), s_in, a0, a1)
        self.b_cq = src.rows(p + "cross_attn.q.bias", (d,), 0.02, a0, a1)
        self.w_ckv = torch.cat([src.rows(p + f"cross_attn.{n}.weight", (d, d), s_in, a0, a1) for n in "kv"])
        self.b_ckv = torch.cat([src.rows(p + f"cross_attn.{n}.bias", (d,), 0.02, a0, a1) for n in "kv"])
        self.cnorm_q = src.replicated(p + "cross_attn.norm_q.weight", (hd,), 0.1, mean=1.0)
        self.cnorm_k = src.replicated(p + "cross_attn.norm_k.weight", (hd,), 0.1, mean=1.0)
        self.w_co = src.cols(p + "cross_attn.o.weight", (d, d), s_in * CROSS_ATTN_GAIN, a0, a1)
        self.b_co = src.replicated(p + "cross_attn.o.bias", (d,), 0.02).float()
        # FFN: column-parallel up, row-parallel down
        self.w_up = src.rows(p + "ffn.0.weight", (f, d), s_in, c0, c1)
        self.b_up = src.rows(p + "ffn.0.bias", (f,), 0.02, c0, c1)
        self.w_down = src.cols(p + "ffn.2.weight", (d, f), s_ffn * s_res, c0, c1)
        self.b_down = src.replicated(p + "ffn.2.bias", (d,), 0.02).float()

    def _qk_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), w.float(), self.cfg.eps).to(x.dtype)

    def cross_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's cross-attention keys/values ``[H, L, d]`` for embedded text ``[L, dim]``."""
        kv = F.linear(text, self.w_ckv, self.b_ckv).unflatten(-1, (2, self.heads, self.cfg.head_dim))
        k, v = kv.unbind(1)
        k = self._qk_norm(k, self.cnorm_k)
        return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: RollingKVCache,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        comm: Communicator,
    ) -> torch.Tensor:
        """x ``[N, dim]`` float32 (full, same on every rank); e0 ``[6, dim]`` time projection."""
        cfg, dt = self.cfg, self.w_qkv.dtype
        d, hd, n = cfg.dim, cfg.head_dim, x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation + e0).unbind(0)

        h = (F.layer_norm(x, (d,), eps=cfg.eps) * (1 + scale_msa) + shift_msa).to(dt)
        q, k, v = F.linear(h, self.w_qkv, self.b_qkv).view(n, 3, self.heads, hd).unbind(1)
        q = apply_rope(self._qk_norm(q, self.norm_q), *rope)
        k = apply_rope(self._qk_norm(k, self.norm_k), *rope)
        keys, values = cache.write(self.index, k, v)
        y = F.linear(_attend(q, keys, values), self.w_o)
        comm.all_reduce_sum_(y)
        x = x + (y.float() + self.b_o) * gate_msa

        h = F.layer_norm(x, (d,), self.norm3_w, self.norm3_b, cfg.eps).to(dt)
        q = self._qk_norm(F.linear(h, self.w_cq, self.b_cq).view(n, self.heads, hd), self.cnorm_q)
        y = F.linear(_attend(q, *text_kv), self.w_co)
        comm.all_reduce_sum_(y)
        x = x + (y.float() + self.b_co)

        h = (F.layer_norm(x, (d,), eps=cfg.eps) * (1 + scale_mlp) + shift_mlp).to(dt)
        h = F.gelu(F.linear(h, self.w_up, self.b_up), approximate="tanh")
        y = F.linear(h, self.w_down)
        comm.all_reduce_sum_(y)
        return x + (y.float() + self.b_down) * gate_mlp
