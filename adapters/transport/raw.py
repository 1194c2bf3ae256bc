"""The floor the PP channel is measured against (``pp1 bench --hop``): the same bytes, on the same groups,
with plain torch.distributed send/recv and nothing else. No frame is built, decoded or checked, and the
receive buffers are allocated before the round trip: what it costs when the transport does all of the work.

One round trip, as the PP channel makes it: the front sends the control parts (frame header, metadata)
on the pair CPU group, then the tensors on the pair device group; the leader receives them in order, then
sends its reply the same way. On GPUs the device is synchronised at the end of each round trip (the
PP channel's measure does the same), so a round trip is complete when it is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pp1.adapters.transport.runtime import DistributedRuntime, device_timeout
from pp1.protocol.codec import Frames


@dataclass
class RawMessage:
    """One message as raw parts: control bytes (CPU group) and tensors (device group), in travel order."""

    control: list[torch.Tensor]
    tensors: list[torch.Tensor]

    @classmethod
    def of(cls, frames: Frames, device: torch.device) -> RawMessage:
        """The exact bytes ``frames`` puts on the wire: header, metadata, then its tensors on ``device``."""
        control = [torch.frombuffer(bytearray(part), dtype=torch.uint8) for part in (frames.header, frames.meta)
                   if part]
        return cls(control, [t.to(device).contiguous() for t in frames.tensors])

    def empty_like(self) -> RawMessage:
        """Receive buffers of the same sizes."""
        return RawMessage([torch.empty_like(t) for t in self.control], [torch.empty_like(t) for t in self.tensors])

    @property
    def nbytes(self) -> tuple[int, int]:
        """(control bytes, tensor bytes)."""
        return (sum(t.numel() for t in self.control),
                sum(t.numel() * t.element_size() for t in self.tensors))


Op = Callable[[torch.Tensor, int, object], None]  # (tensor, peer, group)


def _send(msg: RawMessage, peer: int, cpu: object, dev: object, send: Op) -> None:
    for t in msg.control:
        send(t, peer, cpu)
    for t in msg.tensors:
        send(t, peer, dev)


def _recv(msg: RawMessage, peer: int, cpu: object, dev: object, recv: Op) -> None:
    for t in msg.control:
        recv(t, peer, cpu)
    for t in msg.tensors:
        recv(t, peer, dev)


def _plain_ops() -> tuple[Op, Op]:
    """torch.distributed itself."""
    return (lambda t, peer, g: dist.send(t, dst=peer, group=g)), (lambda t, peer, g: dist.recv(t, src=peer, group=g))


def _runtime_ops(rt: DistributedRuntime, timeout_s: float) -> tuple[Op, Op]:
    """The runtime's send / recv as the PP channel calls them (group checks, device-wait bookkeeping, a
    bound on each wait), without the protocol."""
    def purpose(g: object) -> str:
        return "pp_header" if rt.is_cpu_group(g) else "pp_tensors"

    def send(t: torch.Tensor, peer: int, g: object) -> None:
        rt.send(t, peer, g, purpose(g), timeout_s if rt.is_cpu_group(g) else device_timeout(rt.device, timeout_s))

    def recv(t: torch.Tensor, peer: int, g: object) -> None:
        rt.recv(t, peer, g, purpose(g), timeout_s if rt.is_cpu_group(g) else device_timeout(rt.device, timeout_s))

    return send, recv


def sync(device: torch.device) -> None:
    """Wait for the device (a round trip is counted once its tensors are there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_round_trip(rt: DistributedRuntime, out: RawMessage, into: RawMessage, is_front: bool,
                   via_runtime: float | None = None) -> float:
    """One round trip on the pair groups: the front sends ``out`` (an envelope's bytes) and receives into
    ``into`` (buffers shaped like the result); the leader receives first, then sends. Returns its seconds.
    ``via_runtime`` (a wait bound, seconds): through the runtime's send / recv instead of torch.distributed's
    (what the runtime's wrapping costs, apart from the protocol)."""
    groups = rt.groups
    peer = rt.leader_rank if is_front else rt.front_rank
    assert peer is not None and groups.pair_cpu is not None, "the raw round trip runs on the PP pair"
    cpu, dev = groups.pair_cpu, groups.pair_dev
    send, recv = _plain_ops() if via_runtime is None else _runtime_ops(rt, via_runtime)
    t0 = time.perf_counter()
    if is_front:
        _send(out, peer, cpu, dev, send)
        _recv(into, peer, cpu, dev, recv)
    else:
        _recv(into, peer, cpu, dev, recv)
        _send(out, peer, cpu, dev, send)
    sync(rt.device)
    return time.perf_counter() - t0
