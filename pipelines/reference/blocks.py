"""One causal DiT block (Wan 2.1 structure), tensor-parallel shard, written as fused segments.

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

**Segments.** The block's work is cut at the all-reduces (the only points where a rank waits for
the others) into pure functions of tensors, the unit that ``torch.compile`` fuses
(``pipelines/compiling.py``); the same functions run eagerly without ``--compile``:

    attn_in   x += pending; h = LN-mod(x); q,k,v = h Wqkv; q,k = rope(norm(q), norm(k));
              cache[slots] = k, v                                                      -> x, q
    (eager)   o = attention(q, the cache's occupied slots)
    attn_out  y = o Wo                                                                 -> y   all-reduce 1
    cross     x += (y + b_o) gate_msa; h = LN3(x); q = norm(h Wcq); y = attn(q, text) Wco -> x, y all-reduce 2
    ffn       x += y + b_co; h = LN-mod(x); y = gelu(h Wup) Wdown                     -> x, y   all-reduce 3
    pending = (y, b_down, modulation): the next block's attn_in (or the head) adds it to x first,
              so every residual add is fused with the norm that reads it.

Every weight, the modulation, the RoPE tables, the KV cache buffers and the write slots are
arguments, and the token count is the only shape that changes between calls: one compiled graph
per segment serves all blocks, the first chunk, later chunks and a recompute of any length. Static
configuration (heads, head_dim, eps) is keyword-only. Self-attention over the cache stays outside
(its key count changes with the cache fill; it is one kernel anyway).

**Seams for other models of this family** (e.g. the Krea pipeline): ``linear`` takes an optional
per-output-channel FP8 scale (``--pipeline-option fp8_linears=true``); ``self_attention`` takes an
additive ``key_bias`` (a KV attention bias on past frames); RoPE tables are inputs, so positions
relative to the window need no new graph; an RMS QK-norm over all heads under TP would split
``attn_in`` after the qkv matmul (local sum of squares -> all-reduce -> normalise, rope, write).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


# --- the pure pieces -----------------------------------------------------------------------------


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] -> (float8 e4m3 weights, float32 scale [1, out]): one scale per output row."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale).to(FP8), scale.t().contiguous()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_scale: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + b``; with ``w_scale`` the weight is float8 (rows scaled by ``w_scale`` [1, out]) and
    ``x`` is quantised per token on the fly (``torch._scaled_mm``, row-wise scales); result in x's dtype."""
    if w_scale is None:
        return F.linear(x, w, b)
    x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    x8 = (x.float() / x_scale).to(FP8)
    y = torch._scaled_mm(x8, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
    return y if b is None else y + b


GELU_EPILOGUE = True  # CUDA, 16-bit weights: FFN-up's bias + GELU-tanh in the matmul's epilogue (cuBLASLt)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    """``gelu_tanh(x @ w.T + b)``: on CUDA one cuBLASLt matmul with a bias+GELU epilogue (tanh form, as
    ``approximate="tanh"``), no separate pass over the [tokens, ffn] activation; elsewhere two steps."""
    if w_scale is None and x.is_cuda and GELU_EPILOGUE:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return F.gelu(linear(x, w, b, w_scale), approximate="tanh")


def _ln_mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm of ``[tokens, heads, head_dim]`` in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[N, H, d]``, k/v ``[H, M, d]`` -> ``[N, H*d]`` (full attention; ``bias``: additive, per key)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=bias)
    return out[0].transpose(0, 1).flatten(1)


def self_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk's queries over the cached window + the chunk (views of the cache, any length)."""
    return _attend(q, keys, values, key_bias)


def attn_in(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, prev_mod: torch.Tensor, e0: torch.Tensor,
    mod: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, s_qkv: torch.Tensor | None,
    norm_q: torch.Tensor, norm_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, *, heads: int, head_dim: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pending residual, modulated norm, fused qkv, QK-norm, RoPE, K/V into the cache rows ``slots``."""
    dt = k_cache.dtype
    x = x + (y.float() + b) * (prev_mod[5] + e0[5])
    h = _ln_mod(x, mod[0] + e0[0], mod[1] + e0[1], eps).to(dt)
    q, k, v = linear(h, w_qkv, b_qkv, s_qkv).view(-1, 3, heads, head_dim).unbind(1)
    q = apply_rope(_rms(q, norm_q, eps), cos, sin).to(dt)
    k = apply_rope(_rms(k, norm_k, eps), cos, sin).to(dt)
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)
    return x, q


def attn_out(o: torch.Tensor, w_o: torch.Tensor, s_o: torch.Tensor | None) -> torch.Tensor:
    """Self-attention output projection (row-parallel: a partial sum, all-reduced by the caller)."""
    return linear(o, w_o, None, s_o)


def cross(
    x: torch.Tensor, y: torch.Tensor, b_o: torch.Tensor, e0: torch.Tensor, mod: torch.Tensor,
    norm3_w: torch.Tensor, norm3_b: torch.Tensor, w_cq: torch.Tensor, b_cq: torch.Tensor, s_cq: torch.Tensor | None,
    cnorm_q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, w_co: torch.Tensor, s_co: torch.Tensor | None,
    *, heads: int, head_dim: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention residual, affine LN3, cross-attention to the text, its output projection."""
    dt = text_k.dtype
    x = x + (y.float() + b_o) * (mod[2] + e0[2])
    h = F.layer_norm(x, (x.shape[-1],), norm3_w, norm3_b, eps).to(dt)
    q = _rms(linear(h, w_cq, b_cq, s_cq).view(-1, heads, head_dim), cnorm_q, eps).to(dt)
    return x, linear(_attend(q, text_k, text_v), w_co, None, s_co)


def ffn(
    x: torch.Tensor, y: torch.Tensor, b_co: torch.Tensor, e0: torch.Tensor, mod: torch.Tensor,
    w_up: torch.Tensor, b_up: torch.Tensor, s_up: torch.Tensor | None, w_down: torch.Tensor,
    s_down: torch.Tensor | None, *, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention residual, modulated norm, GELU-tanh FFN (column- then row-parallel)."""
    dt = y.dtype
    x = x + (y.float() + b_co)
    h = _ln_mod(x, mod[3] + e0[3], mod[4] + e0[4], eps).to(dt)
    return x, linear(linear_gelu(h, w_up, b_up, s_up), w_down, None, s_down)


def head(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, prev_mod: torch.Tensor, e0: torch.Tensor,
    head_mod: torch.Tensor, e: torch.Tensor, w_head: torch.Tensor, b_head: torch.Tensor, *, eps: float,
) -> torch.Tensor:
    """The last block's pending residual, the head's modulated norm and projection (float32 out)."""
    x = x + (y.float() + b) * (prev_mod[5] + e0[5])
    h = _ln_mod(x, head_mod[0] + e, head_mod[1] + e, eps).to(w_head.dtype)
    return F.linear(h, w_head, b_head).float()


# Segment name -> (function, the parameters whose dim 0 is the token count).
SEGMENTS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "attn_in": (attn_in, ("x", "y", "cos", "sin", "slots")),
    "attn_out": (attn_out, ("o",)),
    "cross": (cross, ("x", "y")),
    "ffn": (ffn, ("x", "y")),
    "head": (head, ("x", "y")),
}


@dataclass
class Kernels:
    """The segment callables a model runs: the plain functions (eager) or their compiled versions."""

    attn_in: Any = attn_in
    attn_out: Any = attn_out
    cross: Any = cross
    ffn: Any = ffn
    head: Any = head


Pending = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (partial-sum output y, its bias, modulation [6, dim])


class BlockShard:
    """Weights and forward of one block for one mesh rank."""

    def __init__(self, cfg: ReferenceConfig, plan: ShardPlan, src: WeightSource, index: int,
                 fp8_linears: bool = False) -> None:
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
        # FP8 mode: the six large linears as float8 weights + a scale per output row (cross-attention
        # K/V over the text run once per prompt and stay in the model dtype)
        self.fp8 = fp8_linears
        self.s_qkv = self.s_o = self.s_cq = self.s_co = self.s_up = self.s_down = None
        if fp8_linears:
            self.w_qkv, self.s_qkv = quantize_fp8_rows(self.w_qkv)
            self.w_o, self.s_o = quantize_fp8_rows(self.w_o)
            self.w_cq, self.s_cq = quantize_fp8_rows(self.w_cq)
            self.w_co, self.s_co = quantize_fp8_rows(self.w_co)
            self.w_up, self.s_up = quantize_fp8_rows(self.w_up)
            self.w_down, self.s_down = quantize_fp8_rows(self.w_down)
        self.static = {"heads": self.heads, "head_dim": hd, "eps": cfg.eps}

    def cross_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's cross-attention keys/values ``[H, L, d]`` for embedded text ``[L, dim]``."""
        hd = self.cfg.head_dim
        kv = F.linear(text, self.w_ckv, self.b_ckv).unflatten(-1, (2, self.heads, hd))
        k, v = kv.unbind(1)
        k = _rms(k, self.cnorm_k, self.cfg.eps).to(k.dtype)
        return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()

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
        kernels: Kernels,
    ) -> tuple[torch.Tensor, Pending]:
        """x ``[N, dim]`` float32 (full, same on every rank) before the ``pending`` residual of the
        block before; e0 ``[6, dim]`` time projection; ``slots``: the cache rows of the chunk's
        tokens; ``used``: cache rows to attend (window + chunk). Returns x and this block's pending."""
        st = self.static
        y, b, prev_mod = pending
        x, q = kernels.attn_in(x, y, b, prev_mod, e0, self.modulation, self.w_qkv, self.b_qkv, self.s_qkv,
                               self.norm_q, self.norm_k, rope[0], rope[1], cache.k[self.index],
                               cache.v[self.index], slots, **st)
        keys, values = cache.views(self.index, used)
        y = kernels.attn_out(self_attention(q, keys, values), self.w_o, self.s_o)
        comm.all_reduce_sum_(y)
        x, y = kernels.cross(x, y, self.b_o, e0, self.modulation, self.norm3_w, self.norm3_b, self.w_cq,
                             self.b_cq, self.s_cq, self.cnorm_q, text_kv[0], text_kv[1], self.w_co, self.s_co, **st)
        comm.all_reduce_sum_(y)
        x, y = kernels.ffn(x, y, self.b_co, e0, self.modulation, self.w_up, self.b_up, self.s_up, self.w_down,
                           self.s_down, eps=st["eps"])
        comm.all_reduce_sum_(y)
        return x, (y, self.b_down, self.modulation)
