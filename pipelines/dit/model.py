"""The causal DiT (Wan 2.1 / Krea Realtime Video structure), one tensor-parallel shard.

Replicated on every rank (small): patch embedding (Conv3d 1x2x2 as one matmul), text embedding
(Linear-GELU-Linear), time embedding + projection, the head. Sharded: the blocks' heads and FFN
columns (``block.py``). One ``forward`` is one generator call: it counts itself.

The blocks run as segments (``segments.py``) through ``self.kernels``: the plain functions, or, after
``compile_segments()``, their compiled versions (one graph per segment for all blocks and calls,
compiled before the first call by ``precompile``, which needs no collective). Which segments a shard
runs: ``FUSED`` (TP=1, or the per-head QK-norm) or ``SPLIT`` (the QK-norm over all heads on a mesh).

A forward writes its tokens' K/V into the cache slots after the committed window and attends to the
window and itself; the caller decides whether to ``cache.commit`` them, the RoPE positions
(``frame_start``) and the additive mask over the attended rows (a KV bias, a block-causal mask).
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.nn.functional as F

from ..comm import Communicator, SoloCommunicator
from ..compiling import SegmentCompiler
from . import segments as seg
from .block import BlockShard, Pending, ShardSource
from .config import PATCH, DiTConfig
from .kv_cache import RollingKVCache
from .rope import rope_tables
from .sharding import ShardPlan

TextKV = list[tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's ``sinusoidal_embedding_1d``: ``[cos(t*f), sin(t*f)]`` with f = 10000^(-i/half), in float64;
    ``t`` [G] -> [G, dim] float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[C, T, h, w]`` -> tokens ``[T*(h/2)*(w/2), C*1*2*2]`` in (frame, h, w) order, features in
    (c, kt, kh, kw) order: the order of the Conv3d patch embedding's flattened weight."""
    c, t, h, w = latents.shape
    _, ph, pw = PATCH
    x = latents.reshape(c, t, h // ph, ph, w // pw, pw).permute(1, 2, 4, 0, 3, 5)
    return x.reshape(t * (h // ph) * (w // pw), c * ph * pw)


def unpatchify(tokens: torch.Tensor, c: int, t: int, h: int, w: int) -> torch.Tensor:
    """The head's output ``[T*gh*gw, 1*2*2*C]`` -> ``[C, T, h, w]``: Wan's head orders features
    (kt, kh, kw, c) (``einsum('fhwpqrc->cfphqwr')``)."""
    _, ph, pw = PATCH
    x = tokens.reshape(t, h // ph, w // pw, ph, pw, c).permute(5, 0, 1, 3, 2, 4)
    return x.reshape(c, t, h, w)


class DiTShard:
    def __init__(
        self,
        cfg: DiTConfig,
        plan: ShardPlan,
        src: ShardSource,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
        fp8_linears: bool = False,
    ) -> None:
        self.cfg, self.plan, self.comm = cfg, plan, comm
        self.device, self.dtype = torch.device(device), dtype
        d, pf = cfg.dim, cfg.patch_features
        self.w_patch = src.full("patch_embedding.weight", (d, pf))
        self.b_patch = src.full("patch_embedding.bias", (d,))
        self.w_text1 = src.full("text_embedding.0.weight", (d, cfg.text_dim))
        self.b_text1 = src.full("text_embedding.0.bias", (d,))
        self.w_text2 = src.full("text_embedding.2.weight", (d, d))
        self.b_text2 = src.full("text_embedding.2.bias", (d,))
        self.w_time1 = src.full("time_embedding.0.weight", (d, cfg.freq_dim)).float()
        self.b_time1 = src.full("time_embedding.0.bias", (d,)).float()
        self.w_time2 = src.full("time_embedding.2.weight", (d, d)).float()
        self.b_time2 = src.full("time_embedding.2.bias", (d,)).float()
        self.w_tproj = src.full("time_projection.1.weight", (6 * d, d)).float()
        self.b_tproj = src.full("time_projection.1.bias", (6 * d,)).float()
        # the QK-norm over all heads needs the other ranks' sums of squares: segments cut once more
        self.split_norm = cfg.qk_norm == "all" and plan.mesh_size > 1
        self.segments = seg.SPLIT if self.split_norm else seg.FUSED
        self.blocks = [BlockShard(cfg, plan, src, i, fp8_linears, self.split_norm) for i in range(cfg.num_blocks)]
        self.head_modulation = src.full("head.modulation", (2, d)).float()
        self.w_head = src.full("head.head.weight", (pf, d))
        self.b_head = src.full("head.head.bias", (pf,))
        self.cache = RollingKVCache(cfg.num_blocks, plan.local_heads, cfg.head_dim, cfg.tokens_per_frame,
                                    cfg.window_frames, cfg.chunk_frames, self.device, dtype)
        self.forward_calls = 0
        self.text_embeds = 0  # cross-attention K/V computations (one per new conditioning)
        self._rope: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.kernels = seg.Kernels()
        self.compiler: SegmentCompiler | None = None

    # --- compilation ------------------------------------------------------------------------------

    def compile_segments(self, name: str = "generator") -> SegmentCompiler:
        """Use compiled segments from now on (compiled lazily at their first call: ``precompile``)."""
        compiler = SegmentCompiler(name, max_tokens=max(self.token_counts()))
        kernels = {}
        for s in self.segments:
            fn, token_params = seg.SEGMENTS[s]
            params = list(inspect.signature(fn).parameters)
            kernels[s] = compiler.compile(fn, tuple(params.index(p) for p in token_params))
        self.kernels = seg.Kernels(**kernels)
        self.compiler = compiler
        return compiler

    def compile(self, name: str) -> float:
        """``compile_segments`` + ``precompile`` (the load step of ``--compile``); the seconds it took.
        Raises ``CompileError`` naming the segment that failed."""
        t0 = time.perf_counter()
        self.compile_segments(name)
        with torch.inference_mode():
            self.precompile()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def token_counts(self) -> list[int]:
        """Every token count a call can bring: a chunk, or a recompute context of 1..window frames."""
        cfg = self.cfg
        frames = {cfg.chunk_frames, *range(1, cfg.window_frames + 1)}
        return sorted(f * cfg.tokens_per_frame for f in frames)

    def precompile(self) -> None:
        """Run every segment once per possible token count on one block with stand-in inputs (no
        collective: a solo communicator), so that every graph exists before the first real call;
        then leave the cache empty. Raises ``CompileError`` naming the segment that failed."""
        cfg, dev = self.cfg, self.device
        g = torch.Generator(device=dev).manual_seed(0)
        blk = self.blocks[0]
        solo = SoloCommunicator()
        text = torch.randn(cfg.text_len, cfg.dim, generator=g, device=dev).to(self.dtype)
        text_kv = blk.cross_kv(text, solo)
        e0 = 0.1 * torch.randn(1, 6, cfg.dim, generator=g, device=dev)
        e = 0.1 * torch.randn(1, cfg.dim, generator=g, device=dev)
        for n in self.token_counts():
            frames = n // cfg.tokens_per_frame
            x = torch.randn(n, cfg.dim, generator=g, device=dev)
            rope = rope_tables(0, frames, cfg.grid, cfg.head_dim, dev)
            self.cache.reset()
            slots, used = self.cache.plan(frames)
            x, pending = blk.forward(x, self.no_pending(x), e0, rope, self.cache, slots, used, text_kv, solo,
                                     self.kernels)
            self.kernels.head(x, *pending, e0, self.head_modulation, e, self.w_head, self.b_head, eps=cfg.eps)
        self.cache.reset()
        if self.compiler is not None:
            self.compiler.freeze()

    # --- pieces -------------------------------------------------------------------------------------

    def no_pending(self, x: torch.Tensor) -> Pending:
        """Block 0 has no residual pending: zeros (distinct tensors, as the segments expect)."""
        d = self.cfg.dim
        return (torch.zeros(x.shape[0], d, device=self.device, dtype=self.dtype),
                torch.zeros(d, device=self.device), torch.zeros(6, d, device=self.device))

    def embed_text(self, conditioning: torch.Tensor) -> TextKV:
        """Per-block cross-attention K/V of one conditioning ``[text_len, text_dim]`` (computed once per
        prompt; with the QK-norm over all heads, one small all-reduce per block)."""
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
            self._rope[key] = rope_tables(frame_start, frames, self.cfg.grid, self.cfg.head_dim, self.device)
        return self._rope[key]

    def forward(
        self,
        latents: torch.Tensor,
        t: float | torch.Tensor,
        frame_start: int,
        text_kv: TextKV,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow prediction ``[C, F, h, w]`` (float32) for ``latents`` at timestep ``t`` (one for all frames,
        or a tensor of one per frame group) at RoPE frame positions ``frame_start ..``; ``mask``: additive
        over the attended cache rows (``BlockShard.forward``)."""
        self.forward_calls += 1
        cfg = self.cfg
        c, frames, h, w = latents.shape
        x = F.linear(patchify(latents.to(self.device, self.dtype)), self.w_patch, self.b_patch).float()
        e, e0 = self.time_embedding(torch.as_tensor(t, dtype=torch.float64).reshape(-1))
        rope = self.rope(frame_start, frames)
        slots, used = self.cache.plan(frames)
        pending = self.no_pending(x)
        for block, kv in zip(self.blocks, text_kv, strict=True):
            x, pending = block.forward(x, pending, e0, rope, self.cache, slots, used, kv, self.comm, self.kernels,
                                       mask)
        out = self.kernels.head(x, *pending, e0, self.head_modulation, e, self.w_head, self.b_head, eps=cfg.eps)
        return unpatchify(out, c, frames, h, w)
