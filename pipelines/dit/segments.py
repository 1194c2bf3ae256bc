"""One causal DiT block (Wan 2.1 structure), tensor-parallel shard, as pure tensor functions ("segments").

    x += gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)     all-reduce 1 (after o-proj)
    x += CrossAttn(LN_affine(x), text)                                 all-reduce 2 (after o-proj)
    x += gate_mlp * FFN(LN(x) * (1 + scale_mlp) + shift_mlp)           all-reduce 3 (after down-proj)

Megatron-style: q/k/v and FFN-up are column-parallel (this rank's heads / FFN columns), o and
FFN-down are row-parallel (partial sums, all-reduced; the bias is added once, after the sum).
The residual stream, norms and modulation run in float32; matmuls and attention in the model dtype.

**Segments.** The block's work is cut at the all-reduces (the only points where a rank waits for
the others) into pure functions of tensors, the unit that ``torch.compile`` fuses
(``pipelines/compiling.py``); the same functions run eagerly without ``--compile``:

    attn_in   x += pending; h = LN-mod(x); q,k,v = h Wqkv; q,k = rope(norm(q), norm(k));
              cache[slots] = k, v                                                      -> x, q
    (eager)   o = attention(q, the cache's occupied slots, an optional additive mask)
    attn_out  y = o Wo                                                                 -> y   all-reduce 1
    cross     x += (y + b_o) gate_msa; h = LN3(x); q = norm(h Wcq); y = attn(q, text) Wco -> x, y all-reduce 2
    ffn       x += y + b_co; h = LN-mod(x); y = gelu(h Wup) Wdown                     -> x, y   all-reduce 3
    pending = (y, b_down, modulation): the next block's attn_in (or the head) adds it to x first,
              so every residual add is fused with the norm that reads it.

**QK RMSNorm over all heads under TP** (Wan's rule; ``qk_norm="all"`` on a mesh of 2+): the mean of
squares needs every rank's heads, so ``attn_in`` and ``cross`` are cut once more, after the q/k
projection: ``attn_qkv`` / ``cross_q`` return the local per-token sums of squares (float32,
``[tokens, 2]`` for q and k, ``[tokens, 1]`` for the cross-attention q), the caller all-reduces them
(a few bytes per token), and ``attn_rope`` / ``cross_out`` normalise with the global sums. At TP=1, or
with the per-head norm (``qk_norm="head"``), ``attn_in`` / ``cross`` normalise inside (``all_heads``
says over which width).

**Modulation per frame group**: ``e0`` is ``[G, 6, dim]`` and the tokens are G equal groups of frames
(G = 1 for a call at one timestep; the block-causal oracle gives every frame its own timestep).

Every weight, the modulation, the RoPE tables, the KV cache buffers and the write slots are
arguments, and the token count is the only shape that changes between calls: one compiled graph
per segment serves all blocks, the first chunk, later chunks and a recompute of any length. Static
configuration (heads, head_dim, eps, ...) is keyword-only. Self-attention over the cache stays outside
(its key count and mask change with the cache fill; it is one kernel anyway).
``linear`` takes an optional per-output-channel FP8 scale (``fp8_linears``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .rope import apply_rope

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


# --- linears -----------------------------------------------------------------------------------------


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] -> (float8 e4m3 weights, float32 scale [1, out]): one scale per output row."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w.float() / scale).to(FP8), scale.t().contiguous()


def check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """FP8 linears need a CUDA device with FP8 matrix units (compute capability 8.9+) and a 16-bit run dtype."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_linears needs a bfloat16 or float16 run, not {str(dtype).removeprefix('torch.')}")
    if device.type != "cuda":
        raise ValueError(f"fp8_linears needs a CUDA device (torch._scaled_mm), not {device.type}")
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"fp8_linears needs compute capability 8.9+ (Ada, Hopper), this GPU has "
                         f"{torch.cuda.get_device_capability(device)}")


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


# --- the pure pieces -----------------------------------------------------------------------------------


def _mod(mod: torch.Tensor, e0: torch.Tensor, i: int) -> torch.Tensor:
    """Modulation row ``i`` per frame group: ``[G, 1, dim]`` (``mod`` [6, dim], ``e0`` [G, 6, dim])."""
    return (mod[i] + e0[:, i])[:, None, :]


def _grouped(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, dim]`` as ``[G, N/G, dim]`` (G = ``m.shape[0]``)."""
    return x.view(m.shape[0], -1, x.shape[-1])


def _ln_mod(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    h = _grouped(F.layer_norm(x, (x.shape[-1],), eps=eps), shift) * (1 + scale) + shift
    return h.view(x.shape)


def _gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` with the gate per frame group."""
    return x + (_grouped(y, gate) * gate).view(x.shape)


def add_pending(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, prev_mod: torch.Tensor,
                e0: torch.Tensor) -> torch.Tensor:
    """The residual a block left pending: ``x + (y + b) * gate_mlp`` (float32)."""
    return _gated(x, y.float() + b, _mod(prev_mod, e0, 5))


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-token sum of squares in float32, ``[tokens, 1]``: this rank's part of an RMS over all heads."""
    return x.float().pow(2).sum(-1, keepdim=True)


def rms_scale(x: torch.Tensor, sq: torch.Tensor, w: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """RMSNorm of this rank's features ``x`` ``[tokens, f]`` of a ``dim``-wide vector whose squares sum to
    ``sq`` ``[tokens, 1]`` (all ranks), times this rank's weight slice; float32."""
    return x.float() * torch.rsqrt(sq / dim + eps) * w.float()


def _qk_norm(x: torch.Tensor, w: torch.Tensor, heads: int, head_dim: int, eps: float,
             all_heads: bool) -> torch.Tensor:
    """``x`` ``[tokens, heads*head_dim]`` -> RMS-normalised ``[tokens, heads, head_dim]`` float32: over all
    of ``x`` (``w`` [heads*head_dim]; TP=1) or per head (``w`` [head_dim])."""
    if all_heads:
        return F.rms_norm(x.float(), (heads * head_dim,), w.float(), eps).view(-1, heads, head_dim)
    return F.rms_norm(x.float().view(-1, heads, head_dim), (head_dim,), w.float(), eps)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[N, H, d]``, k/v ``[H, M, d]`` -> ``[N, H*d]``; ``mask``: additive, in q's dtype, broadcastable
    to ``[N, M]`` (a per-key bias ``[1, M]``, or a full ``[N, M]`` mask)."""
    m = None if mask is None else mask[None, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=m)
    return out[0].transpose(0, 1).flatten(1)


def _write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slots: torch.Tensor) -> None:
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def attn_in(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, prev_mod: torch.Tensor, e0: torch.Tensor,
    mod: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, s_qkv: torch.Tensor | None,
    norm_q: torch.Tensor, norm_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, *, heads: int, head_dim: int, eps: float,
    all_heads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pending residual, modulated norm, fused qkv, QK-norm, RoPE, K/V into the cache rows ``slots``."""
    dt = k_cache.dtype
    x = add_pending(x, y, b, prev_mod, e0)
    h = _ln_mod(x, _mod(mod, e0, 0), _mod(mod, e0, 1), eps).to(dt)
    q, k, v = linear(h, w_qkv, b_qkv, s_qkv).view(-1, 3, heads * head_dim).unbind(1)
    q = apply_rope(_qk_norm(q, norm_q, heads, head_dim, eps, all_heads), cos, sin).to(dt)
    k = apply_rope(_qk_norm(k, norm_k, heads, head_dim, eps, all_heads), cos, sin).to(dt)
    _write_kv(k, v.view(-1, heads, head_dim), k_cache, v_cache, slots)
    return x, q


def attn_qkv(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, prev_mod: torch.Tensor, e0: torch.Tensor,
    mod: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, s_qkv: torch.Tensor | None, *, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn_in`` up to the projection: x, qkv ``[N, 3f]`` and the local sums of squares of q, k ``[N, 2]``."""
    x = add_pending(x, y, b, prev_mod, e0)
    h = _ln_mod(x, _mod(mod, e0, 0), _mod(mod, e0, 1), eps).to(b_qkv.dtype)  # the model dtype
    qkv = linear(h, w_qkv, b_qkv, s_qkv)
    q, k, _ = qkv.unflatten(-1, (3, -1)).unbind(1)
    return x, qkv, torch.cat([sum_squares(q), sum_squares(k)], dim=-1)


def attn_rope(
    qkv: torch.Tensor, sq: torch.Tensor, norm_q: torch.Tensor, norm_k: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, *, heads: int,
    head_dim: int, dim: int, eps: float,
) -> torch.Tensor:
    """``attn_in`` after the all-reduce of ``sq``: normalise q, k over all heads, RoPE, K/V into the cache."""
    dt = k_cache.dtype
    q, k, v = qkv.view(-1, 3, heads * head_dim).unbind(1)
    q = apply_rope(rms_scale(q, sq[:, 0:1], norm_q, dim, eps).view(-1, heads, head_dim), cos, sin).to(dt)
    k = apply_rope(rms_scale(k, sq[:, 1:2], norm_k, dim, eps).view(-1, heads, head_dim), cos, sin).to(dt)
    _write_kv(k, v.view(-1, heads, head_dim), k_cache, v_cache, slots)
    return q


def attn_out(o: torch.Tensor, w_o: torch.Tensor, s_o: torch.Tensor | None) -> torch.Tensor:
    """Self-attention output projection (row-parallel: a partial sum, all-reduced by the caller)."""
    return linear(o, w_o, None, s_o)


def cross(
    x: torch.Tensor, y: torch.Tensor, b_o: torch.Tensor, e0: torch.Tensor, mod: torch.Tensor,
    norm3_w: torch.Tensor, norm3_b: torch.Tensor, w_cq: torch.Tensor, b_cq: torch.Tensor, s_cq: torch.Tensor | None,
    cnorm_q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, w_co: torch.Tensor, s_co: torch.Tensor | None,
    *, heads: int, head_dim: int, eps: float, all_heads: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention residual, affine LN3, cross-attention to the text, its output projection."""
    dt = text_k.dtype
    x = _gated(x, y.float() + b_o, _mod(mod, e0, 2))
    h = F.layer_norm(x, (x.shape[-1],), norm3_w, norm3_b, eps).to(dt)
    q = _qk_norm(linear(h, w_cq, b_cq, s_cq), cnorm_q, heads, head_dim, eps, all_heads).to(dt)
    return x, linear(attend(q, text_k, text_v), w_co, None, s_co)


def cross_q(
    x: torch.Tensor, y: torch.Tensor, b_o: torch.Tensor, e0: torch.Tensor, mod: torch.Tensor,
    norm3_w: torch.Tensor, norm3_b: torch.Tensor, w_cq: torch.Tensor, b_cq: torch.Tensor, s_cq: torch.Tensor | None,
    *, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cross`` up to the q projection: x, q ``[N, f]`` and its local sum of squares ``[N, 1]``."""
    x = _gated(x, y.float() + b_o, _mod(mod, e0, 2))
    h = F.layer_norm(x, (x.shape[-1],), norm3_w, norm3_b, eps).to(b_cq.dtype)
    q = linear(h, w_cq, b_cq, s_cq)
    return x, q, sum_squares(q)


def cross_out(
    q: torch.Tensor, sq: torch.Tensor, cnorm_q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor,
    w_co: torch.Tensor, s_co: torch.Tensor | None, *, heads: int, head_dim: int, dim: int, eps: float,
) -> torch.Tensor:
    """``cross`` after the all-reduce of ``sq``: normalise q over all heads, attend to the text, project."""
    qn = rms_scale(q, sq, cnorm_q, dim, eps).view(-1, heads, head_dim).to(text_k.dtype)
    return linear(attend(qn, text_k, text_v), w_co, None, s_co)


def ffn(
    x: torch.Tensor, y: torch.Tensor, b_co: torch.Tensor, e0: torch.Tensor, mod: torch.Tensor,
    w_up: torch.Tensor, b_up: torch.Tensor, s_up: torch.Tensor | None, w_down: torch.Tensor,
    s_down: torch.Tensor | None, *, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention residual, modulated norm, GELU-tanh FFN (column- then row-parallel)."""
    dt = y.dtype
    x = x + (y.float() + b_co)
    h = _ln_mod(x, _mod(mod, e0, 3), _mod(mod, e0, 4), eps).to(dt)
    return x, linear(linear_gelu(h, w_up, b_up, s_up), w_down, None, s_down)


def head(
    x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, prev_mod: torch.Tensor, e0: torch.Tensor,
    head_mod: torch.Tensor, e: torch.Tensor, w_head: torch.Tensor, b_head: torch.Tensor, *, eps: float,
) -> torch.Tensor:
    """The last block's pending residual, the head's modulated norm (``e`` [G, dim]) and projection (float32)."""
    x = add_pending(x, y, b, prev_mod, e0)
    shift, scale = (head_mod[0] + e)[:, None, :], (head_mod[1] + e)[:, None, :]
    h = _ln_mod(x, shift, scale, eps).to(w_head.dtype)
    return F.linear(h, w_head, b_head).float()


# Segment name -> (function, the parameters whose dim 0 is the token count).
SEGMENTS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "attn_in": (attn_in, ("x", "y", "cos", "sin", "slots")),
    "attn_qkv": (attn_qkv, ("x", "y")),
    "attn_rope": (attn_rope, ("qkv", "sq", "cos", "sin", "slots")),
    "attn_out": (attn_out, ("o",)),
    "cross": (cross, ("x", "y")),
    "cross_q": (cross_q, ("x", "y")),
    "cross_out": (cross_out, ("q", "sq")),
    "ffn": (ffn, ("x", "y")),
    "head": (head, ("x", "y")),
}
FUSED = ("attn_in", "attn_out", "cross", "ffn", "head")  # TP=1, or the per-head QK-norm
SPLIT = ("attn_qkv", "attn_rope", "attn_out", "cross_q", "cross_out", "ffn", "head")  # all-heads QK-norm, TP>1


@dataclass
class Kernels:
    """The segment callables a model runs: the plain functions (eager) or their compiled versions."""

    attn_in: Any = attn_in
    attn_qkv: Any = attn_qkv
    attn_rope: Any = attn_rope
    attn_out: Any = attn_out
    cross: Any = cross
    cross_q: Any = cross_q
    cross_out: Any = cross_out
    ffn: Any = ffn
    head: Any = head
