"""How one encoded message travels: the fixed-size frame header and the metadata on a CPU (gloo)
group, then the announced tensors on the device group, in order. Point-to-point (PP channel) or
broadcast (TP channel). No protocol decisions here: the channels and the machines make them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pp1.adapters.transport.runtime import DistributedRuntime, Posted, device_timeout
from pp1.protocol.codec import HEADER_SIZE, FrameHeader, Frames, alloc_tensors, decode_header, decode_meta
from pp1.protocol.messages import Message
from pp1.protocol.tensors import TensorSpec


@dataclass(frozen=True)
class PostedTensors:
    """Tensor receives in flight: the specs they were posted for, their buffers and their ops."""

    specs: tuple[TensorSpec, ...]
    tensors: list[torch.Tensor]
    works: list[Posted]


@dataclass(frozen=True)
class ChannelGroups:
    """Where a channel's frames travel: the CPU group for control, the device group for tensors."""

    cpu_group: Any
    dev_group: Any
    cpu_purpose: str
    dev_purpose: str


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


def _left(end: float | None) -> float | None:
    return None if end is None else max(end - time.monotonic(), 0.001)


def _device_end(device: Any, end: float | None) -> float | None:
    """The end of a wait on ``device``'s group: ``end`` on gloo, none on NCCL (a timed-out NCCL wait aborts
    the communicator)."""
    return end if device_timeout(device, end) is not None else None


def _parts(rt: DistributedRuntime, frames: Frames, route: ChannelGroups,
           end: float | None) -> list[tuple[torch.Tensor, Any, str, float | None]]:
    """A message's parts in travel order: (tensor, group, purpose, the end of its wait): header and meta on the
    CPU group, then the tensors on the device group."""
    dev = rt.tensor_device(route.dev_group)
    dev_end = _device_end(dev, end)
    parts = [(_bytes_tensor(part), route.cpu_group, route.cpu_purpose, end) for part in (frames.header, frames.meta)]
    return parts + [(t.to(dev).contiguous(), route.dev_group, route.dev_purpose, dev_end) for t in frames.tensors]


def send_p2p(rt: DistributedRuntime, frames: Frames, route: ChannelGroups, dst: int, timeout_s: float | None = None) -> None:
    """Header, meta (CPU group), then tensors (device group) to ``dst``: every part posted at once, then
    waited for in order. A gloo send completes only once the peer posted its receive, so ``timeout_s``
    bounds the whole message (poisoning after)."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    posted = [(rt.post_send(t, dst, group, purpose), bound) for t, group, purpose, bound in _parts(rt, frames, route, end)]
    for p, bound in posted:
        rt.finish(p, _left(bound))


def send_broadcast(rt: DistributedRuntime, frames: Frames, route: ChannelGroups, timeout_s: float | None = None) -> None:
    """Header, meta (CPU group), then tensors (device group) from this rank to the whole group."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    for t, group, purpose, bound in _parts(rt, frames, route, end):
        rt.broadcast(t, src=rt.rank, group=group, purpose=purpose, timeout_s=_left(bound))


def _recv_into(
    rt: DistributedRuntime, t: torch.Tensor, src: int, group: Any, purpose: str, p2p: bool, timeout_s: float | None
) -> torch.Tensor:
    if p2p:
        return rt.recv(t, src=src, group=group, purpose=purpose, timeout_s=timeout_s)
    return rt.broadcast(t, src=src, group=group, purpose=purpose, timeout_s=timeout_s)


def recv_control(
    rt: DistributedRuntime,
    route: ChannelGroups,
    src: int,
    p2p: bool,
    header_timeout_s: float | None,
    meta_timeout_s: float | None = None,
) -> tuple[FrameHeader, Message]:
    """Wait for the next frame header (bounded by ``header_timeout_s``), then its metadata.

    A header or metadata that does not decode raises RemoteProtocolError: the stream is out of step
    (the count of tensors that follow is unknown), so the caller must treat the channel as poisoned.
    """
    hbuf = torch.empty(HEADER_SIZE, dtype=torch.uint8)
    _recv_into(rt, hbuf, src, route.cpu_group, route.cpu_purpose, p2p, header_timeout_s)
    header = decode_header(hbuf.numpy().tobytes())
    mbuf = torch.empty(header.meta_len, dtype=torch.uint8)
    if header.meta_len:
        mt = header_timeout_s if meta_timeout_s is None else meta_timeout_s
        _recv_into(rt, mbuf, src, route.cpu_group, route.cpu_purpose, p2p, mt)
    msg = decode_meta(header, mbuf.numpy().tobytes())
    return header, msg


def post_tensors(rt: DistributedRuntime, specs: Sequence[TensorSpec], route: ChannelGroups, src: int) -> PostedTensors:
    """Post the receives of the tensors a header announced, all at once (point-to-point); :func:`finish_tensors`
    waits for them."""
    dev = rt.tensor_device(route.dev_group)
    bufs = alloc_tensors(specs, device=dev)
    return PostedTensors(tuple(specs), bufs, [rt.post_recv(t, src, route.dev_group, route.dev_purpose) for t in bufs])


def finish_tensors(rt: DistributedRuntime, posted: PostedTensors, timeout_s: float | None) -> list[torch.Tensor]:
    """Wait for posted tensor receives, in order. ``timeout_s`` applies on gloo device groups only (below)."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    bounded = _device_end(posted.tensors[0].device, end) if posted.tensors else None
    for p in posted.works:
        rt.finish(p, _left(bounded))
    return posted.tensors


def recv_tensors(
    rt: DistributedRuntime,
    specs: Sequence[TensorSpec],
    route: ChannelGroups,
    src: int,
    p2p: bool,
    timeout_s: float | None,
) -> list[torch.Tensor]:
    """Receive the tensors a header announced, in order. ``timeout_s`` applies on gloo device groups
    only: a timed-out NCCL wait aborts the communicator, and a header already committed the peer."""
    if p2p:
        return finish_tensors(rt, post_tensors(rt, specs, route, src), timeout_s)
    dev = rt.tensor_device(route.dev_group)
    bufs = alloc_tensors(specs, device=dev)
    bounded = device_timeout(dev, timeout_s)
    for t in bufs:
        _recv_into(rt, t, src, route.dev_group, route.dev_purpose, p2p, bounded)
    return bufs
