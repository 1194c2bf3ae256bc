"""One block of the shared DiT for one mesh rank: its weights (original Wan names, read as rows /
columns of a ``ShardSource``) and its forward through the segments (``segments.py``).

The shard table (rank r owns heads [h0, h1) = features [a0, a1) and FFN columns [c0, c1)):

    self_attn.{q,k,v}, cross_attn.{q,k,v} (+ biases)   rows [a0, a1)        column-parallel (q,k,v fused)
    {self,cross}_attn.norm_{q,k}                        rows [a0, a1) (qk_norm "all") or whole [head_dim]
    self_attn.o, cross_attn.o                           columns [a0, a1)     row-parallel, bias whole
    ffn.0 (+ bias)                                      rows [c0, c1)        column-parallel
    ffn.2                                               columns [c0, c1)     row-parallel, bias whole
    modulation, norm3                                   whole                replicated

Weights come in the run dtype; modulation, norm3 and the biases added after an all-reduce are kept
in float32 (the residual stream's dtype). ``fp8_linears``: the six large linears as float8 e4m3 with
a scale per output row (the cross-attention K/V over the text run once per prompt: model dtype).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..comm import Communicator
from . import segments as seg
from .config import DiTConfig
from .kv_cache import RollingKVCache


class ShardSource(Protocol):
    """Where a rank's weights come from (a checkpoint's slices, or seeded random full weights), by
    original name and full (logical) shape, in the run dtype."""

    def full(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole tensor, as ``shape``."""
        ...

    def rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (dim 0) of the ``shape``-d tensor."""
        ...

    def cols(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) (dim 1) of the ``shape``-d [out, in] tensor."""
        ...


class ShardPlanLike(Protocol):
    @property
    def local_heads(self) -> int: ...
    @property
    def head_features(self) -> tuple[int, int]: ...
    @property
    def ffn_cols(self) -> tuple[int, int]: ...


Pending = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (partial-sum output y, its bias, modulation [6, dim])


class BlockShard:
    """Weights and forward of one block for one mesh rank. ``split_norm``: the QK-norm over all heads
    is computed across ranks (one small all-reduce of sums of squares); else inside the segment."""

    def __init__(self, cfg: DiTConfig, plan: ShardPlanLike, src: ShardSource, index: int,
                 fp8_linears: bool = False, split_norm: bool = False) -> None:
        self.index, self.cfg = index, cfg
        self.heads = plan.local_heads
        d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
        a0, a1 = plan.head_features
        c0, c1 = plan.ffn_cols
        self.all_heads = cfg.qk_norm == "all"
        if split_norm and not self.all_heads:
            raise ValueError("split_norm needs the QK-norm over all heads (qk_norm='all')")
        self.split_norm = split_norm
        p = f"blocks.{index}."

        def qk_norm_weight(name: str) -> torch.Tensor:
            return src.rows(name, (d,), a0, a1) if self.all_heads else src.full(name, (hd,))

        self.modulation = src.full(p + "modulation", (6, d)).float()
        # self-attention: fused column-parallel qkv for this rank's heads
        self.w_qkv = torch.cat([src.rows(p + f"self_attn.{n}.weight", (d, d), a0, a1) for n in "qkv"])
        self.b_qkv = torch.cat([src.rows(p + f"self_attn.{n}.bias", (d,), a0, a1) for n in "qkv"])
        self.norm_q = qk_norm_weight(p + "self_attn.norm_q.weight")
        self.norm_k = qk_norm_weight(p + "self_attn.norm_k.weight")
        self.w_o = src.cols(p + "self_attn.o.weight", (d, d), a0, a1)
        self.b_o = src.full(p + "self_attn.o.bias", (d,)).float()
        # cross-attention to the text
        self.norm3_w = src.full(p + "norm3.weight", (d,)).float()
        self.norm3_b = src.full(p + "norm3.bias", (d,)).float()
        self.w_cq = src.rows(p + "cross_attn.q.weight", (d, d), a0, a1)
        self.b_cq = src.rows(p + "cross_attn.q.bias", (d,), a0, a1)
        self.w_ckv = torch.cat([src.rows(p + f"cross_attn.{n}.weight", (d, d), a0, a1) for n in "kv"])
        self.b_ckv = torch.cat([src.rows(p + f"cross_attn.{n}.bias", (d,), a0, a1) for n in "kv"])
        self.cnorm_q = qk_norm_weight(p + "cross_attn.norm_q.weight")
        self.cnorm_k = qk_norm_weight(p + "cross_attn.norm_k.weight")
        self.w_co = src.cols(p + "cross_attn.o.weight", (d, d), a0, a1)
        self.b_co = src.full(p + "cross_attn.o.bias", (d,)).float()
        # FFN: column-parallel up, row-parallel down
        self.w_up = src.rows(p + "ffn.0.weight", (f, d), c0, c1)
        self.b_up = src.rows(p + "ffn.0.bias", (f,), c0, c1)
        self.w_down = src.cols(p + "ffn.2.weight", (d, f), c0, c1)
        self.b_down = src.full(p + "ffn.2.bias", (d,)).float()
        self.fp8 = fp8_linears
        self.s_qkv = self.s_o = self.s_cq = self.s_co = self.s_up = self.s_down = None
        if fp8_linears:
            self.w_qkv, self.s_qkv = seg.quantize_fp8_rows(self.w_qkv)
            self.w_o, self.s_o = seg.quantize_fp8_rows(self.w_o)
            self.w_cq, self.s_cq = seg.quantize_fp8_rows(self.w_cq)
            self.w_co, self.s_co = seg.quantize_fp8_rows(self.w_co)
            self.w_up, self.s_up = seg.quantize_fp8_rows(self.w_up)
            self.w_down, self.s_down = seg.quantize_fp8_rows(self.w_down)
        # the static (keyword-only) arguments of the segments
        self.fused_static = {"heads": self.heads, "head_dim": hd, "eps": cfg.eps, "all_heads": self.all_heads}
        self.split_static = {"heads": self.heads, "head_dim": hd, "dim": d, "eps": cfg.eps}

    @property
    def local_features(self) -> int:
        return self.heads * self.cfg.head_dim

    def cross_kv(self, text: torch.Tensor, comm: Communicator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's cross-attention keys / values ``[heads, L, head_dim]`` for embedded text ``[L, dim]``
        (the k-norm over all heads: one ``[L, 1]`` all-reduce, once per conditioning)."""
        cfg, n, hd = self.cfg, text.shape[0], self.cfg.head_dim
        k, v = F.linear(text, self.w_ckv, self.b_ckv).unflatten(-1, (2, self.local_features)).unbind(1)
        if self.all_heads:
            sq = seg.sum_squares(k)
            comm.all_reduce_sum_(sq)
            kn = seg.rms_scale(k, sq, self.cnorm_k, cfg.dim, cfg.eps)
        else:
            kn = F.rms_norm(k.float().view(n, self.heads, hd), (hd,), self.cnorm_k.float(), cfg.eps)
        shape = (n, self.heads, hd)
        return (kn.to(k.dtype).reshape(shape).transpose(0, 1).contiguous(),
                v.reshape(shape).transpose(0, 1).contiguous())

    def forward(
        self,
        x: torch.Tensor,
        pending: Pending,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: RollingKVCache,
        slots: torch.Tensor,
        used: int,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        comm: Communicator,
        kernels: seg.Kernels,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Pending]:
        """x ``[N, dim]`` float32 (full, same on every rank) before the ``pending`` residual of the
        block before; e0 ``[G, 6, dim]`` time projection per frame group; ``slots``: the cache rows of
        the chunk's tokens; ``used``: cache rows to attend (window + chunk); ``mask``: additive, over
        those rows (``[1, used]`` or ``[N, used]``, model dtype) or None. Returns x and this block's pending."""
        y, b, prev_mod = pending
        kc, vc = cache.k[self.index], cache.v[self.index]
        mod = self.modulation
        if self.split_norm:
            x, qkv, sq = kernels.attn_qkv(x, y, b, prev_mod, e0, mod, self.w_qkv, self.b_qkv, self.s_qkv,
                                          eps=self.cfg.eps)
            comm.all_reduce_sum_(sq)
            q = kernels.attn_rope(qkv, sq, self.norm_q, self.norm_k, rope[0], rope[1], kc, vc, slots,
                                  **self.split_static)
        else:
            x, q = kernels.attn_in(x, y, b, prev_mod, e0, mod, self.w_qkv, self.b_qkv, self.s_qkv, self.norm_q,
                                   self.norm_k, rope[0], rope[1], kc, vc, slots, **self.fused_static)
        keys, values = cache.views(self.index, used)
        y = kernels.attn_out(seg.attend(q, keys, values, mask), self.w_o, self.s_o)
        comm.all_reduce_sum_(y)
        if self.split_norm:
            x, cq, sq = kernels.cross_q(x, y, self.b_o, e0, mod, self.norm3_w, self.norm3_b, self.w_cq, self.b_cq,
                                        self.s_cq, eps=self.cfg.eps)
            comm.all_reduce_sum_(sq)
            y = kernels.cross_out(cq, sq, self.cnorm_q, text_kv[0], text_kv[1], self.w_co, self.s_co,
                                   **self.split_static)
        else:
            x, y = kernels.cross(x, y, self.b_o, e0, mod, self.norm3_w, self.norm3_b, self.w_cq, self.b_cq,
                                 self.s_cq, self.cnorm_q, text_kv[0], text_kv[1], self.w_co, self.s_co,
                                 **self.fused_static)
        comm.all_reduce_sum_(y)
        x, y = kernels.ffn(x, y, self.b_co, e0, mod, self.w_up, self.b_up, self.s_up, self.w_down, self.s_down,
                           eps=self.cfg.eps)
        comm.all_reduce_sum_(y)
        return x, (y, self.b_down, mod)
