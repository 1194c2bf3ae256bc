"""PPControlPlane: the front <-> leader channel (PP envelopes, results, READY) on the pair groups.

Frame header + metadata on the pair CPU (gloo) group, tensors on the pair device group after the
header announced them. Every send is preflighted first (LocalProtocolError: nothing was sent).
One owner: the front's comms thread, or the leader's loop; there is no lock on purpose.

Any failed or timed-out wait poisons the channel: every later call raises ChannelPoisoned without
touching the groups (a gloo wait that timed out closed the pair for good; a frame that does not
decode leaves the stream out of step). The owner must crash, never retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from pp1.adapters.transport import wire
from pp1.adapters.transport.runtime import ChannelPoisoned, DistributedRuntime, PeerLost
from pp1.protocol.codec import encode
from pp1.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, ReadyV1
from pp1.protocol.preflight import (
    preflight_envelope,
    preflight_ready,
    preflight_result,
    validate_ready,
    validate_result,
)
from pp1.protocol.tensors import TensorSpec

log = logging.getLogger("pp1.adapters.transport.pp_channel")

PING_CALL_ID = 0  # the warm-up round trip; the front's chunk machine starts at call_id 1


class PPControlPlane:
    """One side (front or leader) of the PP channel."""

    def __init__(
        self, rt: DistributedRuntime, geometry: ChunkGeometry, send_timeout_s: float | None = None
    ) -> None:
        if rt.pair_ranks is None or rt.rank not in rt.pair_ranks:
            raise LocalProtocolError("pp_channel", f"{rt.ids} is not on the PP pair", "not_a_member")
        self.rt = rt
        self.geometry = geometry
        self.side = "front" if rt.rank == rt.front_rank else "leader"
        self.peer = rt.leader_rank if self.side == "front" else rt.front_rank
        self.route = wire.Route(rt.groups.pair_cpu, rt.groups.pair_dev, "pp_header", "pp_tensors")
        self.send_timeout_s = send_timeout_s  # bound on a whole message send (the peer must post its recv)
        self.poisoned: str | None = None
        self.last_call_id: int | None = None  # last envelope sent (front)
        self.last_infer_epoch: int | None = None

    # -- poisoning ---------------------------------------------------------------------------------
    def _guard(self) -> None:
        if self.poisoned is not None:
            raise ChannelPoisoned("pp", f"channel already poisoned: {self.poisoned}")

    def _poison(self, exc: BaseException) -> None:
        if self.poisoned is None:
            self.poisoned = str(exc)
            log.error("%s PP channel poisoned: %s", self.rt.ids, exc)

    def _io(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Run a wire call; a broken or undecodable wait poisons the channel."""
        self._guard()
        try:
            return fn(*args, **kwargs)
        except (PeerLost, RemoteProtocolError) as exc:
            self._poison(exc)
            raise

    def _expect(self, msg, kind, where):  # type: ignore[no-untyped-def]
        """A message of the wrong kind leaves the stream out of step: poison."""
        if not isinstance(msg, kind):
            err = RemoteProtocolError(where, f"expected {kind.__name__}, got {type(msg).__name__}", "unexpected_kind")
            self._poison(err)
            raise err
        return msg

    # -- front -------------------------------------------------------------------------------------
    def send_envelope(
        self,
        env: PPEnvelopeV1,
        tensors: Sequence[torch.Tensor],
        preflight: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        """Preflight, encode, then send within ``timeout_s`` (default: the channel's send bound).
        LocalProtocolError before the first frame: nothing sent. ``preflight=False`` only for fault
        injection (the leader must then reject the envelope)."""
        self._guard()
        if preflight:
            last_epoch = self.last_infer_epoch if env.action is Action.INFER else None
            preflight_envelope(env, tensors, self.geometry, self.last_call_id, last_cache_epoch=last_epoch)
        frames = encode(env, tensors)
        bound = self.send_timeout_s if timeout_s is None else timeout_s
        self._io(wire.send_p2p, self.rt, frames, self.route, self.peer, bound)
        self.last_call_id = env.call_id
        if env.action is Action.INFER:
            self.last_infer_epoch = env.cache_epoch

    def recv_result(self, deadline_at: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        """The next result, waiting at most until ``deadline_at`` (time.monotonic); a missed
        deadline raises ChannelPoisoned. A result breaking the rules raises RemoteProtocolError
        after its announced tensors were received (the stream stays in step, the caller decides)."""
        _, msg = self._io(wire.recv_control, self.rt, self.route, self.peer, True, _left(deadline_at))
        msg = self._expect(msg, PPResultV1, "result")
        tensors = self._io(wire.recv_tensors, self.rt, msg.tensors, self.route, self.peer, True, _left(deadline_at))
        validate_result(msg, self.geometry)
        return msg, tensors

    def recv_ready(self, timeout_s: float | None) -> ReadyV1:
        _, msg = self._io(wire.recv_control, self.rt, self.route, self.peer, True, timeout_s)
        msg = self._expect(msg, ReadyV1, "ready")
        validate_ready(msg)
        return msg

    # -- leader ------------------------------------------------------------------------------------
    def recv_envelope(self, timeout_s: float | None) -> PPEnvelopeV1:
        """The next envelope's header and metadata (its tensors: :meth:`recv_tensors`). Not
        validated here: the leader's relay machine does that, and answers ok=False."""
        _, msg = self._io(wire.recv_control, self.rt, self.route, self.peer, True, timeout_s, timeout_s)
        return self._expect(msg, PPEnvelopeV1, "envelope")

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        return self._io(wire.recv_tensors, self.rt, specs, self.route, self.peer, True, timeout_s)

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor] = ()) -> None:
        self._guard()
        preflight_result(result, tensors, self.geometry)
        self._io(wire.send_p2p, self.rt, encode(result, tensors), self.route, self.peer, self.send_timeout_s)

    def send_ready(self, ready: ReadyV1) -> None:
        self._guard()
        preflight_ready(ready)
        self._io(wire.send_p2p, self.rt, encode(ready), self.route, self.peer, self.send_timeout_s)

    # -- warm-up -----------------------------------------------------------------------------------
    def warm(self, timeout_s: float) -> float:
        """One PING round trip on the pair CPU group and one tensor round trip on the pair device
        group (NCCL sets up a pair's connection lazily on its first send/recv). Returns ms."""
        t0 = time.perf_counter()
        rt, dev = self.rt, self.rt.tensor_device(self.route.dev_group)
        probe = torch.ones(1, device=dev)
        if self.side == "front":
            self.send_envelope(PPEnvelopeV1(action=Action.PING, call_id=PING_CALL_ID), (), timeout_s=timeout_s)
            res, _ = self.recv_result(time.monotonic() + timeout_s)
            if res.action is not Action.PING or res.call_id != PING_CALL_ID or not res.ok:
                err = RemoteProtocolError("result", f"bad PING answer {res.action.value} call_id={res.call_id}",
                                          "id_mismatch")
                self._poison(err)
                raise err
            self._io(rt.send, probe, self.peer, self.route.dev_group, "pp_tensors", _dev_timeout(dev, timeout_s))
            self._io(rt.recv, probe, self.peer, self.route.dev_group, "pp_tensors", _dev_timeout(dev, timeout_s))
        else:
            env = self.recv_envelope(timeout_s)
            if env.action is not Action.PING:
                err = RemoteProtocolError("envelope.action", f"expected PING first, got {env.action.value}",
                                          "bad_action")
                self._poison(err)
                raise err
            self.send_result(PPResultV1(action=Action.PING, ok=True, call_id=env.call_id))
            self._io(rt.recv, probe, self.peer, self.route.dev_group, "pp_tensors", _dev_timeout(dev, timeout_s))
            self._io(rt.send, probe, self.peer, self.route.dev_group, "pp_tensors", _dev_timeout(dev, timeout_s))
        return (time.perf_counter() - t0) * 1000


def _left(deadline_at: float | None) -> float | None:
    if deadline_at is None:
        return None
    return max(deadline_at - time.monotonic(), 0.001)


def _dev_timeout(dev: torch.device, timeout_s: float) -> float | None:
    return timeout_s if dev.type == "cpu" else None


def is_channel_error(exc: BaseException) -> bool:
    """Errors after which the channel must not be touched again."""
    return isinstance(exc, (PeerLost, RemoteProtocolError)) and not isinstance(exc, LocalProtocolError)


__all__ = ["PPControlPlane", "PING_CALL_ID", "is_channel_error", "ProtocolError"]
