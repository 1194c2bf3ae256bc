"""The only collective a generator shard may call: a sum all-reduce over its mesh.

Model code never imports torch.distributed; the runtime hands a Communicator in.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Communicator(Protocol):
    rank: int  # mesh rank
    size: int  # mesh size

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the mesh, in place."""
        ...


class SoloCommunicator:
    """TP=1: the all-reduce is the identity."""

    rank = 0
    size = 1

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        return None
