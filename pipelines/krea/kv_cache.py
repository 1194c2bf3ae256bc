"""The generator's self-attention KV cache (this shard's heads): a window of latent frames per block.

Layout per block: ``[heads, (context + chunk) frames * tokens_per_frame, head_dim]``. The committed
frames sit at the front (oldest first); a chunk's denoising steps write its K/V right after them and
attend to everything written (the last step's K/V stay, ``commit_chunk``).

- Recompute (Krea, every chunk after the first): ``reset`` + ``write_context`` of the context
  frames' K/V at positions 0..n-1 + ``commit_context``; the chunk then sits at n..n+T-1.
- Without a recompute the chunk follows the committed frames; ``roll`` first drops the oldest frames
  beyond the window (keys keep their RoPE rotation, positions keep counting).

``next_position``: the window-relative RoPE position of the next chunk's first frame.
``end_frame``: the epoch timeline position after the last committed frame (continuity checks).
"""

from __future__ import annotations

import torch


class KreaKVCache:
    def __init__(
        self, num_blocks: int, heads: int, head_dim: int, tokens_per_frame: int, window_frames: int,
        chunk_frames: int, device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.tpf = tokens_per_frame
        self.window_frames = window_frames
        self.capacity = window_frames + chunk_frames
        cap = self.capacity * tokens_per_frame
        self.k = [torch.zeros(heads, cap, head_dim, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.v = [torch.zeros(heads, cap, head_dim, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.reset()

    def reset(self) -> None:
        self.frames = 0  # committed frames at the front of the buffer
        self.next_position = 0
        self.end_frame = 0

    @property
    def empty(self) -> bool:
        return self.frames == 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # --- recompute ----------------------------------------------------------------------------------
    def write_context(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The context frames' ``k, v`` ``[tokens, heads, head_dim]`` become the window's first frames."""
        n = k.shape[0]
        self.k[block][:, :n] = k.transpose(0, 1)
        self.v[block][:, :n] = v.transpose(0, 1)

    def commit_context(self, frames: int, end_frame: int) -> None:
        self.frames, self.next_position, self.end_frame = frames, frames, end_frame

    # --- a chunk ------------------------------------------------------------------------------------
    def roll(self) -> None:
        """Keep the newest ``window_frames`` committed frames (before a chunk without recompute)."""
        drop = self.frames - self.window_frames
        if drop <= 0:
            return
        a, n = drop * self.tpf, self.window_frames * self.tpf
        for buf in self.k + self.v:
            buf[:, :n] = buf[:, a : a + n].clone()
        self.frames = self.window_frames

    def write_chunk(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's ``k, v`` after the committed frames; return keys/values ``[heads, M, head_dim]``
        to attend to (committed frames + the chunk)."""
        start = self.frames * self.tpf
        end = start + k.shape[0]
        if end > self.k[block].shape[1]:
            raise ValueError(f"KV cache overflow: {self.frames} committed frames + {k.shape[0] // self.tpf}")
        self.k[block][:, start:end] = k.transpose(0, 1)
        self.v[block][:, start:end] = v.transpose(0, 1)
        return self.k[block][:, :end], self.v[block][:, :end]

    def commit_chunk(self, frames: int, end_frame: int) -> None:
        self.frames += frames
        self.next_position += frames
        self.end_frame = end_frame
