"""The in-process way between the front and the leader (the transport's second implementation): pure TP's
rank 0, where both live in one process. The front's ``send_envelope`` hands the envelope and its tensors
to the leader and runs its whole call (``deliver``: the leader's executor, set by the role), so nothing
overlaps; ``recv_result`` pops what the leader answered. The same local checks as on the wire run first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pp1.adapters.transport.runtime import PeerLost
from pp1.protocol.codec import check_tensors, encode
from pp1.protocol.errors import RemoteProtocolError
from pp1.protocol.geometry import ChunkGeometry
from pp1.protocol.messages import Action, PPEnvelopeV1, PPResultV1, ReadyV1
from pp1.protocol.preflight import preflight_envelope, validate_result
from pp1.protocol.tensors import TensorSpec

Deliver = Callable[[PPEnvelopeV1], str | None]  # runs the leader's call; returns why it exited, if it did


class InProcessChannel:
    """Both ends at once: the front's (``send_envelope`` / ``recv_result``) and the leader's
    (``recv_tensors`` / ``send_result`` / ``send_ready``)."""

    overlaps = False  # send runs the whole call: nothing to overlap

    def __init__(self, geometry: ChunkGeometry) -> None:
        self.geometry = geometry
        self.deliver: Deliver | None = None
        self.ready: ReadyV1 | None = None
        self.exited: str | None = None
        self.last_call_id: int | None = None
        self.last_infer_epoch: int | None = None
        self._tensors: list[torch.Tensor] = []
        self._results: list[tuple[PPResultV1, list[torch.Tensor]]] = []

    # -- the front's end ----------------------------------------------------------------------------
    def send_envelope(self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], timeout_s: float | None = None,
                      preflight: bool = True) -> None:
        if self.exited is not None:
            raise PeerLost("local", f"in-process leader exited: {self.exited}")
        if preflight:
            last_epoch = self.last_infer_epoch if env.action is Action.INFER else None
            preflight_envelope(env, tensors, self.geometry, self.last_call_id, last_cache_epoch=last_epoch)
        else:
            encode(env, tensors)  # the same local checks as on the wire (serialisable, tensors match)
        self.last_call_id = env.call_id
        if env.action is Action.INFER:
            self.last_infer_epoch = env.cache_epoch
        self._tensors = list(tensors)
        assert self.deliver is not None, "the role sets deliver before the front sends"
        self.exited = self.deliver(env)

    def recv_result(self, until: float | None) -> tuple[PPResultV1, list[torch.Tensor]]:
        if not self._results:
            raise PeerLost("local", f"no result from the in-process leader ({self.exited})")
        result, tensors = self._results.pop(0)
        validate_result(result, self.geometry)
        return result, tensors

    def recv_ready(self, until: float | None) -> ReadyV1:  # pragma: no cover - pure TP has no READY wait
        raise PeerLost("local", "pure TP: READY is handed over in process")

    def warm_pair(self, timeout_s: float) -> None:  # pragma: no cover - pure TP has no pair
        raise PeerLost("local", "pure TP has no front-leader pair")

    # -- the leader's end ---------------------------------------------------------------------------
    def recv_envelope(self, until: float | None) -> PPEnvelopeV1:  # pragma: no cover - envelopes are delivered
        raise PeerLost("local", "pure TP: envelopes are delivered in process")

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]:
        check_tensors(specs, self._tensors, RemoteProtocolError, "envelope")
        out, self._tensors = self._tensors, []
        return out

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor] = ()) -> None:
        encode(result, tensors)  # the codec's checks, as on the wire (the front's recv_result runs the rules)
        self._results.append((result, list(tensors)))

    def send_ready(self, ready: ReadyV1) -> None:
        self.ready = ready
