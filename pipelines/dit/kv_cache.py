"""The generator's rolling KV cache: a ring of latent-frame slots per block (this shard's heads only).

Capacity is ``window + chunk`` frames. The cache keeps at most ``window`` committed past frames; a
chunk's frames are written into the next ``chunk`` slots (fresh ones, or those of the oldest frames,
which fall out of the window) and attend to everything occupied. Softmax attention does not care
about key order and keys carry their RoPE rotation, so the ring needs no copies and the occupied
slots are always a prefix of the buffer (or all of it).

Writes of a denoising step go to the chunk's slots without committing; ``commit`` keeps what the
last write left there (the K/V of the last denoising step). ``reset`` empties it; a KV recompute
is ``reset`` + a write of the context frames + ``commit``.

Layout: token-major ``[capacity tokens, heads, head_dim]`` per block, so a chunk's K/V rows are
written where the qkv projection computes them (``plan`` gives the rows as an index tensor: the
compiled block writes them with ``index_copy_``, no Python ints that would specialise a graph) and
attention reads ``views`` ``[heads, tokens, head_dim]`` (strided, no copy).

``past_bias``: an additive per-key row over the slots a chunk attends (Krea / Scope's KV attention
bias: ``log(bias)`` on the cached frames other than the oldest one in the window, nothing on the
chunk itself), built from the slot layout, so the ring's order does not matter.
"""

from __future__ import annotations

import torch


class RollingKVCache:
    def __init__(
        self,
        num_blocks: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        window_frames: int,
        chunk_frames: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.tokens_per_frame = tokens_per_frame
        self.window_frames = window_frames
        self.slots = window_frames + chunk_frames
        cap = self.slots * tokens_per_frame
        self.device = torch.device(device)
        self.k = [torch.zeros(cap, heads, head_dim, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.v = [torch.zeros(cap, heads, head_dim, device=device, dtype=dtype) for _ in range(num_blocks)]
        self._rows: dict[tuple[int, int], torch.Tensor] = {}  # (next_slot, frames) -> write rows
        self._bias: dict[tuple, torch.Tensor] = {}  # (next_slot, cached, frames, value, dtype) -> past_bias
        self.reset()

    def reset(self) -> None:
        self.written = 0  # frames committed since the last reset
        self.next_slot = 0  # slot the next chunk's first frame goes to
        self.end_frame = 0  # timeline position just after the last committed frame

    @property
    def cached_frames(self) -> int:
        return min(self.written, self.window_frames)

    @property
    def empty(self) -> bool:
        return self.written == 0

    def _slot_runs(self, frames: int) -> list[tuple[int, int, int]]:
        """(src frame offset, dst slot, length) runs for ``frames`` frames from ``next_slot``."""
        if frames > self.slots:
            raise ValueError(f"{frames} frames do not fit a cache of {self.slots} slots")
        first = min(frames, self.slots - self.next_slot)
        runs = [(0, self.next_slot, first)]
        if first < frames:
            runs.append((first, 0, frames - first))
        return runs

    def plan(self, frames: int) -> tuple[torch.Tensor, int]:
        """Where a chunk of ``frames`` frames goes: (its cache rows, int64 ``[frames * tokens_per_frame]``
        on the cache's device, in token order; rows to attend: the cached window plus the chunk)."""
        key = (self.next_slot, frames)
        rows = self._rows.get(key)
        if rows is None:
            tpf = self.tokens_per_frame
            parts = [torch.arange(dst * tpf, (dst + n) * tpf) for _src, dst, n in self._slot_runs(frames)]
            rows = self._rows[key] = torch.cat(parts).to(self.device)
        return rows, min(self.written + frames, self.slots) * self.tokens_per_frame

    def past_bias(self, frames: int, value: float, dtype: torch.dtype) -> torch.Tensor | None:
        """``[1, used]`` additive bias for a chunk of ``frames`` frames about to be written (``plan``):
        ``value`` on the rows of the cached frames but the oldest, 0 on the oldest and on the chunk;
        None when nothing would be biased (``value`` 0, or at most one cached frame)."""
        cached = self.cached_frames
        if value == 0.0 or cached <= 1:
            return None
        key = (self.next_slot, cached, frames, value, dtype)
        bias = self._bias.get(key)
        if bias is None:
            _rows, used = self.plan(frames)
            per_slot = torch.zeros(used // self.tokens_per_frame)
            for i in range(1, cached):  # slot of the i-th oldest cached frame (the ring's order)
                per_slot[(self.next_slot - cached + i) % self.slots] = value
            bias = per_slot.repeat_interleave(self.tokens_per_frame)[None].to(self.device, dtype)
            self._bias[key] = bias
        return bias

    def views(self, block: int, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``used`` rows of ``block``, ``[heads, used, head_dim]`` (views)."""
        return self.k[block][:used].transpose(0, 1), self.v[block][:used].transpose(0, 1)

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's ``k, v`` ``[tokens, heads, head_dim]``; return the keys/values to attend to.

        The result is a view of the occupied slots ``[heads, n, head_dim]``: the cached window plus
        the chunk itself. (The block does the same inside its fused segment: ``plan`` + ``index_copy_``.)
        """
        rows, used = self.plan(k.shape[0] // self.tokens_per_frame)
        self.k[block].index_copy_(0, rows, k)
        self.v[block].index_copy_(0, rows, v)
        return self.views(block, used)

    def commit(self, frames: int, end_frame: int) -> None:
        """Keep the last write of ``frames`` frames; the window drops the oldest beyond it."""
        self.written += frames
        self.next_slot = (self.next_slot + frames) % self.slots
        self.end_frame = end_frame
