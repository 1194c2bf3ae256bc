"""TPControlPlane: leader -> workers. TP headers are broadcast on the mesh CPU (gloo) group (frame
header, then metadata), their tensors on the mesh device group after the header announced them.

WARMUP headers travel without tensors: every mesh rank makes them from ``header.seed``
(:func:`pp1.adapters.roles.shard.warmup_tensors`), so warmup needs no front. Workers wait for the next
header with the watchdog as the bound; a timed-out wait poisons the channel (orphan exit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from pp1.adapters.transport import wire
from pp1.adapters.transport.runtime import ChannelPoisoned, DistributedRuntime, PeerLost
from pp1.protocol.codec import encode
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, TPHeaderV1
from pp1.protocol.preflight import preflight_tp_header, validate_tp_header
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.transport.tp_channel")

PING_CALL_ID = 0


class TPControlPlane:
    """The leader's or a worker's end of the TP channel. One owner per rank (its main loop)."""

    def __init__(
        self, rt: DistributedRuntime, geometry: ChunkGeometry, send_timeout_s: float | None = None
    ) -> None:
        if not rt.is_mesh_member:
            raise LocalProtocolError("tp_channel", f"{rt.ids} is not in the mesh", "not_a_member")
        self.rt = rt
        self.geometry = geometry
        self.is_leader = rt.rank == rt.leader_rank
        self.route = wire.Route(rt.groups.mesh_cpu, rt.groups.mesh_dev, "tp_header", "tp_tensors")
        self.send_timeout_s = send_timeout_s  # workers post their receive at once: a short bound
        self.poisoned: str | None = None
        self.headers = 0

    def _guard(self) -> None:
        if self.poisoned is not None:
            raise ChannelPoisoned("tp", f"channel already poisoned: {self.poisoned}")

    def _io(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._guard()
        try:
            return fn(*args, **kwargs)
        except (PeerLost, RemoteProtocolError) as exc:
            if self.poisoned is None:
                self.poisoned = str(exc)
                log.error("%s TP channel poisoned: %s", self.rt.ids, exc)
            raise

    # -- leader ------------------------------------------------------------------------------------
    def send(self, header: TPHeaderV1, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Preflight (LocalProtocolError: nothing sent), then header + meta + tensors to every worker.
        For WARMUP pass the tensors made from the seed: they are checked, not sent."""
        self._guard()
        if self.rt.mesh_size == 1:
            return
        preflight_tp_header(header, tensors, self.geometry)
        frames = encode(header, tensors)
        if header.action is Action.WARMUP:
            frames.tensors = []
        self._io(wire.send_broadcast, self.rt, frames, self.route, self.send_timeout_s)
        self.headers += 1

    # -- worker ------------------------------------------------------------------------------------
    def recv_header(self, timeout_s: float | None) -> TPHeaderV1:
        """The next header (validated), waiting at most ``timeout_s`` (ChannelPoisoned after)."""
        _, msg = self._io(wire.recv_control, self.rt, self.route, self.rt.leader_rank, False, timeout_s)
        if not isinstance(msg, TPHeaderV1):
            err = RemoteProtocolError("tp_header", f"expected TPHeaderV1, got {type(msg).__name__}", "unexpected_kind")
            self.poisoned = str(err)
            raise err
        validate_tp_header(msg, self.geometry)
        self.headers += 1
        return msg

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        return self._io(wire.recv_tensors, self.rt, specs, self.route, self.rt.leader_rank, False, timeout_s)

    # -- warm-up -----------------------------------------------------------------------------------
    def warm(self, timeout_s: float) -> float:
        """One PING header on the mesh CPU group, one all-reduce on the mesh device group. ms."""
        t0 = time.perf_counter()
        if self.rt.mesh_size > 1:
            if self.is_leader:
                self.send(TPHeaderV1(action=Action.PING, call_id=PING_CALL_ID))
            else:
                h = self.recv_header(timeout_s)
                if h.action is not Action.PING:
                    raise RemoteProtocolError("tp_header.action", f"expected PING first, got {h.action.value}",
                                              "bad_action")
        probe = torch.ones(1, device=self.rt.tensor_device(self.route.dev_group))
        dev_timeout = timeout_s if probe.device.type == "cpu" else None
        self._io(self.rt.all_reduce, probe, dist.ReduceOp.SUM, self.route.dev_group, "warm_mesh_dev", dev_timeout)
        if int(probe.item()) != self.rt.mesh_size:
            raise RemoteProtocolError("warm_mesh_dev", f"all-reduce gave {probe.item()}, expected {self.rt.mesh_size}",
                                      "warm_failed")
        return (time.perf_counter() - t0) * 1000
