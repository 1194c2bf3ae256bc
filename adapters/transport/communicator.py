"""The generator's collectives over the mesh device group (what ``pipelines.comm.Communicator`` asks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pp1.adapters.transport.runtime import DistributedRuntime


class MeshCommunicator:
    """The generator's only collective: a sum all-reduce over the mesh device group."""

    def __init__(self, rt: DistributedRuntime) -> None:
        assert rt.mesh_rank is not None
        self.rt = rt
        self.rank = rt.mesh_rank
        self.size = rt.mesh_size

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        if self.size == 1:
            return
        self.rt.all_reduce(t, dist.ReduceOp.SUM, group=self.rt.groups.mesh_dev, purpose="tp_all_reduce")
