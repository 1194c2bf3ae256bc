"""The generator's rolling KV cache: a ring of latent-frame slots per block (this shard's heads only).

Capacity is ``window + chunk`` frames. The cache keeps at most ``window`` committed past frames; a
chunk's frames are written into the next ``chunk`` slots (fresh ones, or those of the oldest frames,
which fall out of the window) and attend to everything occupied. Softmax attention does not care
about key order and keys carry their RoPE rotation, so the ring needs no copies and the occupied
slots are always a prefix of the buffer (or all of it).

Writes of a denoising step go to the chunk's slots without committing; ``commit`` keeps what the
last write left there (the K/V of the last denoising step). ``reset`` empties it; a KV recompute
is ``reset`` + a write of the context frames + ``commit``.
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
        self.k = [torch.zeros(heads, cap, head_dim, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.v = [torch.zeros(heads, cap, head_dim, device=device, dtype=dtype) for _ in range(num_blocks)]
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

    def write(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's ``k, v`` ``[tokens, heads, head_dim]``; return the keys/values to attend to.

        The result is a view of the occupied slots ``[heads, n, head_dim]``: the cached window plus
        the chunk itself.
        """
        tpf = self.tokens_per_frame
        frames = k.shape[0] // tpf
        kb, vb = self.k[block], self.v[block]
        for src, dst, n in self._slot_runs(frames):
            kb[:, dst * tpf : (dst + n) * tpf] = k[src * tpf : (src + n) * tpf].transpose(0, 1)
            vb[:, dst * tpf : (dst + n) * tpf] = v[src * tpf : (src + n) * tpf].transpose(0, 1)
        used = min(self.written + frames, self.slots) * tpf
        return kb[:, :used], vb[:, :used]

    def commit(self, frames: int, end_frame: int) -> None:
        """Keep the last write of ``frames`` frames; the window drops the oldest beyond it."""
        self.written += frames
        self.next_slot = (self.next_slot + frames) % self.slots
        self.end_frame = end_frame
