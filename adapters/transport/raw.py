"""The floor the PP channel is measured against (``pp1 bench --hop``): the same bytes, on the same groups,
with plain torch.distributed send/recv and nothing else. No frame is built, decoded or checked, and the
receive buffers are allocated before the round trip: what it costs when the transport does all of the work.

One round trip, as the PP channel makes it: the front sends the control parts (frame header, metadata)
on the pair CPU group and the tensors on the pair device group, all posted at once; the leader receives
the header, the metadata, then the tensors (posted together), and sends its reply the same way. A second
series waits for each part before starting the next (the transport used one call at a time). On GPUs the
device is synchronised at the end of each round trip (the PP channel's measure does the same), so a round
trip is complete when it is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


Post = Callable[[torch.Tensor, int, object], Any]  # (tensor, peer, group) -> a started op
Finish = Callable[[Any, object], None]  # (started op, group): wait for it


def _send(msg: RawMessage, peer: int, cpu: object, dev: object, post: Post, finish: Finish) -> None:
    """Every part posted at once, then waited for in order (as ``wire.send_p2p`` sends a message)."""
    parts = [(t, cpu) for t in msg.control] + [(t, dev) for t in msg.tensors]
    started = [(post(t, peer, g), g) for t, g in parts]
    for op, g in started:
        finish(op, g)


def _recv(msg: RawMessage, peer: int, cpu: object, dev: object, post: Post, finish: Finish) -> None:
    """The control parts one at a time, then the tensors posted together (as the wire receives: the header
    tells the metadata's length, the metadata the tensors)."""
    for t in msg.control:
        finish(post(t, peer, cpu), cpu)
    started = [post(t, peer, dev) for t in msg.tensors]
    for op in started:
        finish(op, dev)


def _send_each(msg: RawMessage, peer: int, cpu: object, dev: object, post: Post, finish: Finish) -> None:
    """One part at a time, each waited for before the next (the simplest use of the transport)."""
    for t, g in [(t, cpu) for t in msg.control] + [(t, dev) for t in msg.tensors]:
        finish(post(t, peer, g), g)


def _plain_ops(recv: bool) -> tuple[Post, Finish]:
    """torch.distributed itself."""
    if recv:
        return (lambda t, peer, g: dist.irecv(t, src=peer, group=g)), (lambda w, g: w.wait())
    return (lambda t, peer, g: dist.isend(t, dst=peer, group=g)), (lambda w, g: w.wait())


def _runtime_ops(rt: DistributedRuntime, timeout_s: float, recv: bool) -> tuple[Post, Finish]:
    """The runtime's post / finish as the wire calls them (group checks, device-wait bookkeeping, a bound on
    each wait), without the protocol."""
    def purpose(g: object) -> str:
        return "pp_header" if rt.is_cpu_group(g) else "pp_tensors"

    def post(t: torch.Tensor, peer: int, g: object) -> Any:
        return (rt.post_recv if recv else rt.post_send)(t, peer, g, purpose(g))

    def finish(op: Any, g: object) -> None:
        rt.finish(op, timeout_s if rt.is_cpu_group(g) else device_timeout(rt.device, timeout_s))

    return post, finish


def sync(device: torch.device) -> None:
    """Wait for the device (a round trip is counted once its tensors are there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_round_trip(rt: DistributedRuntime, out: RawMessage, into: RawMessage, is_front: bool,
                   via_runtime: float | None = None, one_at_a_time: bool = False) -> float:
    """One round trip on the pair groups: the front sends ``out`` (an envelope's bytes) and receives into
    ``into`` (buffers shaped like the result); the leader receives first, then sends. Returns its seconds.
    Parts are posted as the wire posts them (a message's parts sent together; received header, metadata,
    then the tensors together); ``one_at_a_time``: each part waited for before the next is started.
    ``via_runtime`` (a wait bound, seconds): through the runtime's post / finish instead of torch.distributed's
    (what the runtime's wrapping costs, apart from the protocol)."""
    groups = rt.groups
    peer = rt.leader_rank if is_front else rt.front_rank
    assert peer is not None and groups.pair_cpu is not None, "the raw round trip runs on the PP pair"
    cpu, dev = groups.pair_cpu, groups.pair_dev
    sends = _plain_ops(recv=False) if via_runtime is None else _runtime_ops(rt, via_runtime, recv=False)
    recvs = _plain_ops(recv=True) if via_runtime is None else _runtime_ops(rt, via_runtime, recv=True)
    send, recv = (_send_each, _send_each) if one_at_a_time else (_send, _recv)
    t0 = time.perf_counter()
    if is_front:
        send(out, peer, cpu, dev, *sends)
        recv(into, peer, cpu, dev, *recvs)
    else:
        recv(into, peer, cpu, dev, *recvs)
        send(out, peer, cpu, dev, *sends)
    sync(rt.device)
    return time.perf_counter() - t0
