"""Seeded random weights: every full weight is a pure function of (weight seed, its name, device type).

Each rank generates the FULL weight of one layer at a time (on its device), takes its slice and
frees the rest, so TP=1 and TP=N hold the same full model and no rank ever holds more than one
unsharded layer. Every full weight is also checksummed (exactly, on integers) as it is generated:
the fingerprint is a digest of the full model, equal on every rank of a consistent mesh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHECKSUM_SLICE = 1 << 24  # elements per checksum slice: bounds the int64 temporaries


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any mix of ints and strings (same on every machine and run)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seeded_randn(
    shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal values from a generator seeded with ``seed`` on ``device``."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def bits_checksum(t: torch.Tensor) -> list[torch.Tensor]:
    """Exact, order-independent checksum terms of a tensor's bits (device scalars, int64).

    Sum of the bit patterns and a position-weighted sum; integer sums cannot depend on the
    reduction order, so equal tensors give equal checksums on any device.
    """
    flat = t.detach().contiguous().view(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    out = []
    for start in range(0, bits.numel(), _CHECKSUM_SLICE):
        part = bits[start : start + _CHECKSUM_SLICE].to(torch.int64)
        weight = (torch.arange(start, start + part.numel(), device=part.device) % 127) + 1
        out.append(part.sum())
        out.append((part * weight).sum())
    return out


# Random init of the reference's weights, by name: biases N(0, 0.02), norm weights N(1, 0.1), every
# other weight N(0, 1/fan_in) (fan_in = the last dim) times a gain: the residual branches' outputs
# are scaled down to keep the residual stream bounded over many blocks, and the cross-attention
# output up (random weights give the text little say; this gain makes a new prompt visibly change
# the video).
CROSS_ATTN_GAIN = 3.0
NORM_WEIGHTS = ("norm_q.weight", "norm_k.weight", "norm3.weight")


def init_rule(num_blocks: int) -> Callable[[str, tuple[int, ...]], tuple[float, float]]:
    """name, full shape -> (std, mean) of the seeded random weight."""
    residual = (2 * num_blocks) ** -0.5
    gains = {"self_attn.o.weight": residual, "ffn.2.weight": residual, "cross_attn.o.weight": CROSS_ATTN_GAIN}

    def rule(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
        if name.endswith(".bias"):
            return 0.02, 0.0
        if name.endswith(NORM_WEIGHTS):
            return 0.1, 1.0
        gain = next((g for suffix, g in gains.items() if name.endswith(suffix)), None)
        std = shape[-1] ** -0.5
        return (std if gain is None else std * gain), 0.0

    return rule


class WeightSource:
    """Hands out the shards of seeded full weights and keeps their checksums (a ``dit.block.ShardSource``:
    ``init`` gives each weight's std and mean from its name and full shape)."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype,
                 init: Callable[[str, tuple[int, ...]], tuple[float, float]]) -> None:
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.init = init
        self._full_sums: list[torch.Tensor] = []
        self._shard_sums: list[torch.Tensor] = []
        self.names: list[str] = []

    def _full(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        std, mean = self.init(name, shape)
        w = seeded_randn(shape, mix_seed(self.seed, name), self.device)
        if std != 1.0:
            w.mul_(std)
        if mean:
            w.add_(mean)
        w = w.to(self.dtype)
        self._full_sums.extend(bits_checksum(w))
        self.names.append(name)
        return w

    def _keep(self, shard: torch.Tensor) -> torch.Tensor:
        shard = shard.contiguous().clone()
        self._shard_sums.extend(bits_checksum(shard))
        return shard

    def full(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A weight every rank holds whole."""
        return self._keep(self._full(name, shape))

    def rows(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the full weight (column-parallel linear, or a bias slice)."""
        return self._keep(self._full(name, shape)[start:stop])

    def cols(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Columns ``[start, stop)`` of the full weight (row-parallel linear)."""
        return self._keep(self._full(name, shape)[:, start:stop])

    def digests(self) -> tuple[str, str]:
        """(digest of the full weights generated, digest of this shard's weights)."""
        full = torch.stack(self._full_sums).tolist() if self._full_sums else []
        shard = torch.stack(self._shard_sums).tolist() if self._shard_sums else []
        f = hashlib.sha256(repr((self.names, full)).encode()).hexdigest()[:16]
        s = hashlib.sha256(repr(shard).encode()).hexdigest()[:16]
        return f, s
