"""The PP and TP channels over torch.distributed (the transport's first implementation).

PP channel: front <-> leader on the pair groups (envelopes, results, READY). TP channel: leader ->
workers on the mesh groups (headers broadcast). A message is its frame header + metadata on the CPU
(gloo) group, then the tensors it announced on the device group, in order (``wire``). Every send is
preflighted first (LocalProtocolError: nothing was sent). One owner per channel (the front's comms
thread, the leader's or a worker's loop): there is no lock on purpose.

Any failed or timed-out wait poisons the channel: every later call raises ChannelPoisoned without
touching the groups (a gloo wait that timed out closed the pair for good; a frame that does not decode
leaves the stream out of step). The owner must crash, never retry. No protocol decisions here: the
machines make them (the PING exchanges, what a timeout means, which rank is to blame).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pp1.adapters.transport import wire
from pp1.adapters.transport.runtime import ChannelPoisoned, DistributedRuntime, PeerLost, device_timeout
from pp1.protocol.codec import encode
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, ReadyV1, TPHeaderV1
from pp1.protocol.preflight import (
    preflight_envelope,
    preflight_ready,
    preflight_result,
    preflight_tp_header,
    validate_ready,
    validate_result,
)
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.transport.channels")

T = TypeVar("T")


def _left(until: float | None) -> float | None:
    return None if until is None else max(until - time.monotonic(), 0.001)


class _Channel:
    """What both channels share: the poison guard around every wire call."""

    name = "?"

    def __init__(self, rt: DistributedRuntime, geometry: ChunkGeometry, groups: wire.ChannelGroups) -> None:
        self.rt = rt
        self.geometry = geometry
        self.groups = groups
        self.poisoned: str | None = None

    def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a wire call; a broken, timed-out or undecodable wait poisons the channel."""
        if self.poisoned is not None:
            raise ChannelPoisoned(self.name, f"channel already poisoned: {self.poisoned}")
        try:
            return fn(*args, **kwargs)
        except (PeerLost, RemoteProtocolError) as exc:
            self._poison(exc)
            raise

    def _poison(self, exc: BaseException) -> None:
        if self.poisoned is None:
            self.poisoned = str(exc)
            log.error("%s %s channel poisoned: %s", self.rt.ids, self.name.upper(), exc)

    def _expect(self, msg: Any, kind: type[T], where: str) -> T:
        """A message of the wrong kind leaves the stream out of step: poison."""
        if not isinstance(msg, kind):
            err = RemoteProtocolError(where, f"expected {kind.__name__}, got {type(msg).__name__}", "unexpected_kind")
            self._poison(err)
            raise err
        return msg

    def _device_probe(self) -> torch.Tensor:
        return torch.ones(1, device=self.rt.tensor_device(self.groups.dev_group))


class PPChannel(_Channel):
    """One side (front or leader) of the PP channel."""

    name = "pp"
    overlaps = True  # send returns while the mesh computes: decode k overlaps k+1

    def __init__(self, rt: DistributedRuntime, geometry: ChunkGeometry, send_timeout_s: float | None = None) -> None:
        if rt.pair_ranks is None or rt.rank not in rt.pair_ranks:
            raise LocalProtocolError("pp_channel", f"{rt.ids} is not on the PP pair", "not_a_member")
        super().__init__(rt, geometry, wire.ChannelGroups(rt.groups.pair_cpu, rt.groups.pair_dev, "pp_header",
                                                          "pp_tensors"))
        self.is_front = rt.rank == rt.front_rank
        self.peer = rt.leader_rank if self.is_front else rt.front_rank
        self.send_timeout_s = send_timeout_s  # bound on a whole message send (the peer must post its recv)
        self.last_call_id: int | None = None  # last envelope sent (front)
        self._posted: wire.PostedTensors | None = None  # the last envelope's tensor receives, in flight (leader)
        self.last_infer_epoch: int | None = None

    # -- front -------------------------------------------------------------------------------------
    def send_envelope(self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], timeout_s: float | None = None,
                      preflight: bool = True) -> None:
        """Preflight, encode, then send within ``timeout_s`` (default: the channel's send bound).
        LocalProtocolError before the first frame: nothing sent. ``preflight=False`` only for fault
        injection (the leader must then reject the envelope)."""
        if preflight:
            last_epoch = self.last_infer_epoch if env.action is Action.INFER else None
            frames = preflight_envelope(env, tensors, self.geometry, self.last_call_id, last_cache_epoch=last_epoch)
        else:
            frames = encode(env, tensors)
        bound = self.send_timeout_s if timeout_s is None else timeout_s
        self._io(wire.send_p2p, self.rt, frames, self.groups, self.peer, bound)
        self.last_call_id = env.call_id
        if env.action is Action.INFER:
            self.last_infer_epoch = env.cache_epoch

    def recv_result(self, until: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        """The next result, waiting at most until ``until``; a missed bound raises WaitExpired. A result
        breaking the rules raises RemoteProtocolError after its announced tensors were received."""
        _, msg = self._io(wire.recv_control, self.rt, self.groups, self.peer, True, _left(until))
        res = self._expect(msg, PPResultV1, "result")
        tensors = self._io(wire.recv_tensors, self.rt, res.tensors, self.groups, self.peer, True, _left(until))
        validate_result(res, self.geometry)
        return res, tensors

    def recv_ready(self, until: float | None) -> ReadyV1:
        _, msg = self._io(wire.recv_control, self.rt, self.groups, self.peer, True, _left(until))
        ready = self._expect(msg, ReadyV1, "ready")
        validate_ready(ready)
        return ready

    # -- leader ------------------------------------------------------------------------------------
    def recv_envelope(self, until: float | None) -> PPEnvelopeV1:
        """The next envelope's header and metadata. Not validated here: the leader's relay machine does that,
        and answers ok=False. The tensors it announced always follow it (``wire``), so their receives are
        posted at once and the machine's validation overlaps their transfer; :meth:`recv_tensors` waits."""
        left = _left(until)
        _, msg = self._io(wire.recv_control, self.rt, self.groups, self.peer, True, left, left)
        env = self._expect(msg, PPEnvelopeV1, "envelope")
        self._posted = self._io(wire.post_tensors, self.rt, env.tensors, self.groups, self.peer) if env.tensors else None
        return env

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        """The tensors of the envelope just received (posted by :meth:`recv_envelope`), waited for in order."""
        posted, self._posted = self._posted, None
        if posted is None or posted.specs != tuple(specs):
            raise LocalProtocolError("pp_channel.recv_tensors", f"no receives posted for {list(specs)}", "not_posted")
        return self._io(wire.finish_tensors, self.rt, posted, timeout_s)

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor] = ()) -> None:
        frames = preflight_result(result, tensors, self.geometry)
        self._io(wire.send_p2p, self.rt, frames, self.groups, self.peer, self.send_timeout_s)

    def send_ready(self, ready: ReadyV1) -> None:
        self._io(wire.send_p2p, self.rt, preflight_ready(ready), self.groups, self.peer, self.send_timeout_s)

    # -- warm-up -----------------------------------------------------------------------------------
    def warm_pair(self, timeout_s: float) -> None:
        """One tensor round trip on the pair device group (NCCL sets up a pair lazily on its first
        send/recv): the front sends first, the leader receives first."""
        rt, dev_group = self.rt, self.groups.dev_group
        probe = self._device_probe()
        bound = device_timeout(probe.device, timeout_s)
        ops = (rt.send, rt.recv) if self.is_front else (rt.recv, rt.send)
        for op in ops:
            self._io(op, probe, self.peer, dev_group, "pp_tensors", bound)


class TPChannel(_Channel):
    """The leader's or a worker's end of the TP channel: headers broadcast on the mesh CPU group, their
    tensors on the mesh device group after the header announced them. Headers are decoded here and
    validated by the worker's machine."""

    name = "tp"

    def __init__(self, rt: DistributedRuntime, geometry: ChunkGeometry, send_timeout_s: float | None = None) -> None:
        if not rt.is_mesh_member:
            raise LocalProtocolError("tp_channel", f"{rt.ids} is not in the mesh", "not_a_member")
        super().__init__(rt, geometry, wire.ChannelGroups(rt.groups.mesh_cpu, rt.groups.mesh_dev, "tp_header",
                                                          "tp_tensors"))
        self.send_timeout_s = send_timeout_s  # workers post their receive at once: a short bound
        self.headers = 0

    # -- leader ------------------------------------------------------------------------------------
    def send_header(self, header: TPHeaderV1, tensors: Sequence[torch.Tensor] = (), with_tensors: bool = True,
                    preflight: bool = True) -> None:
        """Preflight (LocalProtocolError: nothing sent), then header + meta (+ tensors when
        ``with_tensors``) to every worker. ``preflight=False``: a header relaying an envelope validated one
        step before is only encoded (the codec's checks; ``preflight_tp_header`` says why)."""
        if self.rt.mesh_size == 1:
            return
        frames = preflight_tp_header(header, tensors, self.geometry) if preflight else encode(header, tensors)
        if not with_tensors:
            frames.tensors = []
        self._io(wire.send_broadcast, self.rt, frames, self.groups, self.send_timeout_s)
        self.headers += 1

    # -- worker ------------------------------------------------------------------------------------
    def recv_header(self, until: float | None) -> TPHeaderV1:
        """The next header, waiting at most until ``until`` (WaitExpired after)."""
        _, msg = self._io(wire.recv_control, self.rt, self.groups, self.rt.leader_rank, False, _left(until))
        header = self._expect(msg, TPHeaderV1, "tp_header")
        self.headers += 1
        return header

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        return self._io(wire.recv_tensors, self.rt, specs, self.groups, self.rt.leader_rank, False, timeout_s)

    # -- warm-up -----------------------------------------------------------------------------------
    def warm_mesh(self, timeout_s: float) -> None:
        """One all-reduce on the mesh device group (its lazy connections)."""
        probe = self._device_probe()
        self._io(self.rt.all_reduce, probe, dist.ReduceOp.SUM, self.groups.dev_group, "warm_mesh_dev",
                 device_timeout(probe.device, timeout_s))
        if int(probe.item()) != self.rt.mesh_size:
            err = RemoteProtocolError("warm_mesh_dev", f"all-reduce gave {probe.item()}, expected "
                                      f"{self.rt.mesh_size}", "warm_failed")
            self._poison(err)
            raise err
