"""What every generator on the shared DiT does alike (the reference, Krea): the mesh-size check, the
compile step of the load, the Generator interface around ``_run`` (call checks, inference mode, a
normal tensor back), the cache's continuity rule, cross-attention K/V reused while the conditioning is
unchanged, and the weights as held (the runtime's weight tripwire checksums them). A pipeline subclasses it, builds its ``DiTShard`` and writes ``_run`` (its sampler, its
positions and masks).
"""

from __future__ import annotations

import logging
import time

import torch

from pp1.protocol.geometry import ChunkGeometry

from ..checksum import held_tensors
from ..comm import Communicator
from ..contract import InvalidChunkCall, check_call
from ..interface import ChunkCall, ChunkOutput
from .model import DiTShard, TextKV
from .sharding import ShardPlan


def check_mesh_heads(what: str, heads: int, mesh_size: int) -> None:
    """A factory's ``check_mesh_size``: heads are split over the mesh (unevenly is fine), every rank needs
    at least one (``what`` names the preset in the message)."""
    if not 1 <= mesh_size <= heads:
        raise ValueError(f"{what} has {heads} attention heads: a mesh of {mesh_size} ranks cannot shard it "
                         f"(1..{heads})")


class DiTGenerator:
    """Base of the DiT generators. A subclass calls ``_setup`` first, sets ``self.model``, then
    ``_compile``; it writes ``fingerprint()`` and ``_run``."""

    NAME = "dit"
    model: DiTShard
    geometry: ChunkGeometry
    device: torch.device
    dtype: torch.dtype

    def _setup(self, num_heads: int, head_dim: int, ffn_dim: int, mesh_rank: int, mesh_size: int,
               comm: Communicator, too_large: str) -> None:
        """The communicator must be this shard's; the plan must give every rank a head and FFN columns
        (``too_large``: the message when not)."""
        if comm.size != mesh_size or comm.rank != mesh_rank:
            raise ValueError(f"communicator is rank {comm.rank}/{comm.size}, expected {mesh_rank}/{mesh_size}")
        self.plan = ShardPlan(mesh_rank, mesh_size, num_heads, head_dim, ffn_dim)
        if self.plan.local_heads < 1 or self.plan.local_ffn < 1:
            raise ValueError(too_large)
        self._epoch: int | None = None
        self._text_src: torch.Tensor | None = None
        self._text_kv: TextKV | None = None

    def _compile(self, compile: bool, log: logging.Logger) -> None:
        """``--compile``: the segments compiled and precompiled now, in the load step (a failure raises)."""
        self.compiled = compile
        self.compile_s: float | None = None
        self.compile_graphs = 0
        if compile:
            label = f"{self.NAME} tp rank {self.plan.mesh_rank}/{self.plan.mesh_size}"
            self.compile_s = self.model.compile(label)
            assert self.model.compiler is not None
            self.compile_graphs = self.model.compiler.graphs
            log.info("%s generator %s: %d graphs compiled in %.1f s (inductor %.1f s)", self.NAME,
                     self.plan.describe(), self.compile_graphs, self.compile_s, self.model.compiler.compile_s)

    # --- Generator interface ------------------------------------------------------------------------
    def held_weights(self) -> list[torch.Tensor]:
        """The weights this shard holds now (the runtime's weight tripwire checksums them)."""
        return held_tensors(self.model)

    @property
    def late_compiles(self) -> int:
        """Compilations after the precompile (a shape it did not cover); 0 when all is well."""
        return self.model.compiler.late_graphs if self.model.compiler is not None else 0

    def reset(self) -> None:
        self.model.cache.reset()
        self._epoch = None

    def run(self, call: ChunkCall) -> ChunkOutput:
        check_call(call, self.geometry)
        self._check_continuity(call)
        with torch.inference_mode():
            out = self._run(call)
        out.latents = out.latents.clone()  # a normal tensor: callers may update it in place
        return out

    def _run(self, call: ChunkCall) -> ChunkOutput:  # pragma: no cover - every pipeline writes it
        raise NotImplementedError

    # --- shared internals ---------------------------------------------------------------------------
    def _check_continuity(self, call: ChunkCall) -> None:
        """A call that neither starts an epoch nor recomputes must continue the cache: same epoch, its chunk
        starting where the cache ends."""
        cache = self.model.cache
        if call.init_cache or call.reset_cache or call.do_kv_recompute:
            return
        if cache.empty:
            raise InvalidChunkCall("call", f"chunk {call.chunk_index} (call {call.call_id}): the KV cache is empty "
                                   "but neither init_cache, reset_cache nor do_kv_recompute is set", "cache_empty")
        if call.cache_epoch != self._epoch:
            raise InvalidChunkCall("call.cache_epoch", f"epoch {call.cache_epoch} but the cache holds epoch "
                                   f"{self._epoch}; a new epoch needs init_cache or reset_cache", "epoch_mismatch")
        start = call.chunk_index * self.geometry.latent_frames
        if start != cache.end_frame:
            raise InvalidChunkCall("call.chunk_index", f"chunk {call.chunk_index} starts at latent frame {start} "
                                   f"but the cache ends at {cache.end_frame}", "not_contiguous")

    def _cached_text_kv(self, cond: torch.Tensor) -> TextKV:
        """Cross-attention K/V of ``cond`` (on the device, in the pipeline's dtype), recomputed only when the
        conditioning changes (every rank gets the same one, so every rank decides alike)."""
        if self._text_kv is None or self._text_src is None or not torch.equal(cond, self._text_src):
            self._text_kv = self.model.embed_text(cond)
            self._text_src = cond.clone()
        return self._text_kv

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
