"""How heads and FFN columns are split over a tensor-parallel mesh (uneven splits allowed).

``split_sizes(40, 3) == (14, 13, 13)``: the first ``n % parts`` shards get one more. Every rank
computes the same table, so shard offsets need no communication.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_sizes(n: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``parts`` contiguous shards of ``n`` items, as even as possible, larger first."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def shard_offsets(n: int, parts: int) -> tuple[int, ...]:
    """Start index of every shard (exclusive prefix sum of ``split_sizes``)."""
    out, acc = [], 0
    for s in split_sizes(n, parts):
        out.append(acc)
        acc += s
    return tuple(out)


def shard_range(n: int, parts: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of shard ``rank``."""
    if not 0 <= rank < parts:
        raise ValueError(f"rank {rank} outside mesh of size {parts}")
    start = shard_offsets(n, parts)[rank]
    return start, start + split_sizes(n, parts)[rank]


@dataclass(frozen=True)
class ShardPlan:
    """What one mesh rank owns: a contiguous run of attention heads and of FFN columns."""

    mesh_rank: int
    mesh_size: int
    num_heads: int
    head_dim: int
    ffn_dim: int

    @property
    def heads(self) -> tuple[int, int]:
        return shard_range(self.num_heads, self.mesh_size, self.mesh_rank)

    @property
    def local_heads(self) -> int:
        start, stop = self.heads
        return stop - start

    @property
    def ffn_cols(self) -> tuple[int, int]:
        return shard_range(self.ffn_dim, self.mesh_size, self.mesh_rank)

    @property
    def local_ffn(self) -> int:
        start, stop = self.ffn_cols
        return stop - start

    @property
    def head_features(self) -> tuple[int, int]:
        """Rows of a [dim, dim] q/k/v weight (or columns of the output projection) this rank owns."""
        start, stop = self.heads
        return start * self.head_dim, stop * self.head_dim

    def describe(self) -> str:
        h0, h1 = self.heads
        f0, f1 = self.ffn_cols
        return f"tp rank {self.mesh_rank}/{self.mesh_size}: heads [{h0},{h1}) ffn [{f0},{f1})"
