"""One Wan 2.1 / Krea attention block, one tensor-parallel shard, loaded from the checkpoint.

    x += gate_msa * o(SelfAttn(LN(x) * (1 + scale_msa) + shift_msa))     all-reduce 1 (after o)
    x += o(CrossAttn(norm3(x), text))                                     all-reduce 2 (after o)
    x += gate_mlp * ffn.2(gelu_tanh(ffn.0(LN(x) * (1 + scale_mlp) + shift_mlp)))   all-reduce 3

Megatron split: q/k/v (fused per rank) and ffn.0 are column-parallel (this rank's heads / FFN
columns: rows of the weight), o and ffn.2 are row-parallel (columns of the weight: partial sums,
all-reduced, the bias added once after the sum). QK-norms are RMSNorm over ALL heads (Wan's
``WanRMSNorm(dim)``): one small extra all-reduce of sums of squares for self-attention q and k
together, one for the cross-attention q (and one per prompt for the cross-attention k).

The residual stream, the norms and the modulation run in float32; matmuls and attention in the
model dtype. ``modulation + e0`` is per frame group (``e0`` ``[G, 6, dim]``; the chunk's frames
share one timestep, the block-causal oracle gives each frame its own).

What a faster block (issue 10) must keep: the across-heads QK RMSNorm with its sum-of-squares
all-reduce, the pluggable attention (``AttnFn``: KV cache writes, the KV attention bias mask, the
block-causal recompute mask), window-relative RoPE tables passed in, per-group modulation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..comm import Communicator
from ..reference.sharding import ShardPlan
from .attention import attend
from .checkpoint import ShardReader
from .config import KreaModelConfig
from .layers import apply_rope, rms_norm_across_heads

# (block index, q, k, v) -> attention output [N, heads*head_dim]; q/k roped, all [N, heads, head_dim]
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.view(groups, -1, x.shape[-1])


class KreaBlockShard:
    def __init__(self, cfg: KreaModelConfig, plan: ShardPlan, reader: ShardReader, index: int) -> None:
        self.index, self.cfg = index, cfg
        self.heads = plan.local_heads
        a0, a1 = plan.head_features
        c0, c1 = plan.ffn_cols
        p = f"blocks.{index}."
        r = reader
        self.modulation = r.full(p + "modulation").float().view(6, cfg.dim)
        self.w_qkv = torch.cat([r.rows(p + f"self_attn.{n}.weight", a0, a1) for n in "qkv"])
        self.b_qkv = torch.cat([r.rows(p + f"self_attn.{n}.bias", a0, a1) for n in "qkv"])
        self.norm_q = r.rows(p + "self_attn.norm_q.weight", a0, a1)
        self.norm_k = r.rows(p + "self_attn.norm_k.weight", a0, a1)
        self.w_o = r.cols(p + "self_attn.o.weight", a0, a1)
        self.b_o = r.full(p + "self_attn.o.bias").float()
        self.norm3_w = r.full(p + "norm3.weight").float()
        self.norm3_b = r.full(p + "norm3.bias").float()
        self.w_cq = r.rows(p + "cross_attn.q.weight", a0, a1)
        self.b_cq = r.rows(p + "cross_attn.q.bias", a0, a1)
        self.w_ckv = torch.cat([r.rows(p + f"cross_attn.{n}.weight", a0, a1) for n in "kv"])
        self.b_ckv = torch.cat([r.rows(p + f"cross_attn.{n}.bias", a0, a1) for n in "kv"])
        self.cnorm_q = r.rows(p + "cross_attn.norm_q.weight", a0, a1)
        self.cnorm_k = r.rows(p + "cross_attn.norm_k.weight", a0, a1)
        self.w_co = r.cols(p + "cross_attn.o.weight", a0, a1)
        self.b_co = r.full(p + "cross_attn.o.bias").float()
        self.w_up = r.rows(p + "ffn.0.weight", c0, c1)
        self.b_up = r.rows(p + "ffn.0.bias", c0, c1)
        self.w_down = r.cols(p + "ffn.2.weight", c0, c1)
        self.b_down = r.full(p + "ffn.2.bias").float()

    @property
    def local_features(self) -> int:
        return self.heads * self.cfg.head_dim

    def cross_kv(self, text: torch.Tensor, comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's cross-attention keys / values ``[heads, L, head_dim]`` for embedded text ``[L, dim]``."""
        cfg, n = self.cfg, text.shape[0]
        k, v = F.linear(text, self.w_ckv, self.b_ckv).split(self.local_features, dim=-1)
        (k,) = rms_norm_across_heads([k], [self.cnorm_k], cfg.dim, cfg.eps, comm)
        shape = (n, self.heads, cfg.head_dim)
        return k.reshape(shape).transpose(0, 1).contiguous(), v.reshape(shape).transpose(0, 1).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttnFn,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        comm: Communicator,
    ) -> torch.Tensor:
        """``x`` ``[N, dim]`` float32 (the same on every rank); ``e0`` ``[G, 6, dim]`` float32."""
        cfg, dt = self.cfg, self.w_qkv.dtype
        d, hd, n, g = cfg.dim, cfg.head_dim, x.shape[0], e0.shape[0]
        mod = (self.modulation[None] + e0)[:, :, None, :]  # [G, 6, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)

        h = (_grouped(F.layer_norm(x, (d,), eps=cfg.eps), g) * (1 + scale_msa) + shift_msa).view(n, d).to(dt)
        q, k, v = F.linear(h, self.w_qkv, self.b_qkv).split(self.local_features, dim=-1)
        q, k = rms_norm_across_heads([q, k], [self.norm_q, self.norm_k], d, cfg.eps, comm)
        shape = (n, self.heads, hd)
        q = apply_rope(q.reshape(shape), *rope)
        k = apply_rope(k.reshape(shape), *rope)
        y = F.linear(attn(self.index, q, k, v.reshape(shape)), self.w_o)
        comm.all_reduce_sum_(y)
        x = x + (_grouped(y.float() + self.b_o, g) * gate_msa).view(n, d)

        h = F.layer_norm(x, (d,), self.norm3_w, self.norm3_b, cfg.eps).to(dt)
        (cq,) = rms_norm_across_heads([F.linear(h, self.w_cq, self.b_cq)], [self.cnorm_q], d, cfg.eps, comm)
        y = F.linear(attend(cq.reshape(shape), *text_kv), self.w_co)
        comm.all_reduce_sum_(y)
        x = x + (y.float() + self.b_co)

        h = (_grouped(F.layer_norm(x, (d,), eps=cfg.eps), g) * (1 + scale_mlp) + shift_mlp).view(n, d).to(dt)
        h = F.gelu(F.linear(h, self.w_up, self.b_up), approximate="tanh")
        y = F.linear(h, self.w_down)
        comm.all_reduce_sum_(y)
        return x + (_grouped(y.float() + self.b_down, g) * gate_mlp).view(n, d)
