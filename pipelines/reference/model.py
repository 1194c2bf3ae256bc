"""The causal DiT (Wan 2.1 / Krea Realtime Video structure), one tensor-parallel shard.

Replicated on every rank (small): patch embedding (Conv3d 1x2x2 as a linear), text embedding,
time embedding + projection, output head. Sharded: the blocks' heads and FFN columns.
One ``forward`` is one generator call: it counts itself.

The blocks run as segments (``blocks.py``) through ``self.kernels``: the plain functions, or, after
``compile_segments()``, their compiled versions (one graph per segment for all blocks and calls,
compiled before the first call by ``precompile``, which needs no collective).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..comm import Communicator, SoloCommunicator
from ..compiling import SegmentCompiler
from .blocks import SEGMENTS, BlockShard, Kernels, Pending
from .kv_cache import RollingKVCache
from .presets import PATCH, ReferenceConfig
from .rope import rope_tables
from .sharding import ShardPlan
from .weights import WeightSource


def sinusoidal_embedding(t: float, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: ``[cos(t*f), sin(t*f)]``, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    angles = t * freqs
    return torch.cat([angles.cos(), angles.sin()]).float()


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[C, T, h, w]`` -> tokens ``[T*gh*gw, C*2*2]`` in (frame, h, w) order."""
    c, t, h, w = latents.shape
    _, ph, pw = PATCH
    x = latents.view(c, t, h // ph, ph, w // pw, pw).permute(1, 2, 4, 0, 3, 5)
    return x.reshape(t * (h // ph) * (w // pw), c * ph * pw)


def unpatchify(tokens: torch.Tensor, c: int, t: int, h: int, w: int) -> torch.Tensor:
    _, ph, pw = PATCH
    x = tokens.view(t, h // ph, w // pw, c, ph, pw).permute(3, 0, 1, 4, 2, 5)
    return x.reshape(c, t, h, w)


class CausalDiTShard:
    def __init__(
        self,
        cfg: ReferenceConfig,
        plan: ShardPlan,
        comm: Communicator,
        device: torch.device,
        dtype: torch.dtype,
        fp8_linears: bool = False,
    ) -> None:
        self.cfg, self.plan, self.comm = cfg, plan, comm
        self.device, self.dtype = device, dtype
        d = cfg.dim
        src = WeightSource(cfg.weight_seed, device, dtype)
        pf = cfg.patch_features
        self.w_patch = src.replicated("patch_embedding.weight", (d, pf), pf**-0.5)
        self.b_patch = src.replicated("patch_embedding.bias", (d,), 0.02)
        self.w_text1 = src.replicated("text_embedding.0.weight", (d, cfg.text_dim), cfg.text_dim**-0.5)
        self.b_text1 = src.replicated("text_embedding.0.bias", (d,), 0.02)
        self.w_text2 = src.replicated("text_embedding.2.weight", (d, d), d**-0.5)
        self.b_text2 = src.replicated("text_embedding.2.bias", (d,), 0.02)
        self.w_time1 = src.replicated("time_embedding.0.weight", (d, cfg.freq_dim), cfg.freq_dim**-0.5).float()
        self.b_time1 = src.replicated("time_embedding.0.bias", (d,), 0.02).float()
        self.w_time2 = src.replicated("time_embedding.2.weight", (d, d), d**-0.5).float()
        self.b_time2 = src.replicated("time_embedding.2.bias", (d,), 0.02).float()
        self.w_tproj = src.replicated("time_projection.1.weight", (6 * d, d), d**-0.5).float()
        self.b_tproj = src.replicated("time_projection.1.bias", (6 * d,), 0.02).float()
        self.blocks = [BlockShard(cfg, plan, src, i, fp8_linears) for i in range(cfg.num_blocks)]
        self.head_modulation = src.replicated("head.modulation", (2, d), d**-0.5).float()
        self.w_head = src.replicated("head.head.weight", (pf, d), d**-0.5)
        self.b_head = src.replicated("head.head.bias", (pf,), 0.02)
        self.full_digest, self.shard_digest = src.digests()
        self.cache = RollingKVCache(
            cfg.num_blocks, plan.local_heads, cfg.head_dim, cfg.tokens_per_frame,
            cfg.kv_window_frames, cfg.latent_frames, device, dtype,
        )
        self.forward_calls = 0
        self._rope_key: tuple[int, int] | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kernels = Kernels()
        self.compiler: SegmentCompiler | None = None

    # --- compilation ------------------------------------------------------------------------------

    def compile_segments(self, name: str = "generator") -> SegmentCompiler:
        """Use compiled segments from now on (compiled lazily at their first call: ``precompile``)."""
        compiler = SegmentCompiler(name, max_tokens=max(self.token_counts()))
        kernels = {}
        for seg, (fn, token_params) in SEGMENTS.items():
            params = list(inspect.signature(fn).parameters)
            kernels[seg] = compiler.compile(fn, tuple(params.index(p) for p in token_params))
        self.kernels = Kernels(**kernels)
        self.compiler = compiler
        return compiler

    def token_counts(self) -> list[int]:
        """Every token count a call can bring: a chunk, or a recompute context of 1..window frames."""
        cfg = self.cfg
        frames = {cfg.latent_frames, *range(1, cfg.kv_window_frames + 1)}
        return sorted(f * cfg.tokens_per_frame for f in frames)

    def precompile(self) -> None:
        """Run every segment once per possible token count on one block with stand-in inputs (no
        collective: a solo communicator), so that every graph exists before the first real call;
        then leave the cache empty. Raises ``CompileError`` naming the segment that failed."""
        cfg, dev = self.cfg, self.device
        g = torch.Generator(device=dev).manual_seed(0)
        blk = self.blocks[0]
        text = torch.randn(cfg.text_len, cfg.dim, generator=g, device=dev).to(self.dtype)
        text_kv = blk.cross_kv(text)
        e0 = 0.1 * torch.randn(6, cfg.dim, generator=g, device=dev)
        e = 0.1 * torch.randn(cfg.dim, generator=g, device=dev)
        solo = SoloCommunicator()
        for n in self.token_counts():
            frames = n // cfg.tokens_per_frame
            x = torch.randn(n, cfg.dim, generator=g, device=dev)
            rope = rope_tables(0, frames, cfg.grid, cfg.head_dim, dev)
            self.cache.reset()
            slots, used = self.cache.plan(frames)
            x, pending = blk.forward(x, self._no_pending(x), e0, rope, self.cache, slots, used, text_kv, solo,
                                     self.kernels)
            self.kernels.head(x, *pending, e0, self.head_modulation, e, self.w_head, self.b_head, eps=cfg.eps)
        self.cache.reset()
        if self.compiler is not None:
            self.compiler.freeze()

    def _no_pending(self, x: torch.Tensor) -> Pending:
        """Block 0 has no residual pending: zeros (distinct tensors, as the segments expect)."""
        d = self.cfg.dim
        return (torch.zeros(x.shape[0], d, device=self.device, dtype=self.dtype),
                torch.zeros(d, device=self.device), torch.zeros(6, d, device=self.device))

    def embed_text(self, conditioning: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-block cross-attention K/V of one conditioning (computed once per prompt)."""
        x = conditioning.to(self.device, self.dtype)
        x = F.gelu(F.linear(x, self.w_text1, self.b_text1), approximate="tanh")
        x = F.linear(x, self.w_text2, self.b_text2)
        return [b.cross_kv(x) for b in self.blocks]

    def _time(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = sinusoidal_embedding(t, self.cfg.freq_dim).to(self.device)
        e = F.linear(F.silu(F.linear(s, self.w_time1, self.b_time1)), self.w_time2, self.b_time2)
        e0 = F.linear(F.silu(e), self.w_tproj, self.b_tproj).view(6, self.cfg.dim)
        return e, e0

    def _rope_for(self, frame_start: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_key != (frame_start, frames) or self._rope is None:
            self._rope = rope_tables(frame_start, frames, self.cfg.grid, self.cfg.head_dim, self.device)
            self._rope_key = (frame_start, frames)
        return self._rope

    def forward(
        self,
        latents: torch.Tensor,
        t: float,
        frame_start: int,
        text_kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Flow prediction for ``latents`` ``[C, T, h, w]`` at timestep ``t`` (0..1000).

        The chunk's K/V are written into the cache slots after the committed window and attend to
        it; the caller decides whether to ``cache.commit`` them.
        """
        self.forward_calls += 1
        cfg = self.cfg
        c, frames, h, w = latents.shape
        x = F.linear(patchify(latents.to(self.device, self.dtype)), self.w_patch, self.b_patch).float()
        e, e0 = self._time(float(t))
        rope = self._rope_for(frame_start, frames)
        slots, used = self.cache.plan(frames)
        pending = self._no_pending(x)
        for block, kv in zip(self.blocks, text_kv, strict=True):
            x, pending = block.forward(x, pending, e0, rope, self.cache, slots, used, kv, self.comm, self.kernels)
        out = self.kernels.head(x, *pending, e0, self.head_modulation, e, self.w_head, self.b_head, eps=cfg.eps)
        return unpatchify(out, c, frames, h, w)


def flow_sigma(t: float, shift: float) -> float:
    """Wan's shifted flow-matching noise level for timestep ``t`` in [0, 1000]."""
    s = t / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s) if s > 0 else 0.0
