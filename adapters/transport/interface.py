"""The transport the role executors perform their machines' intents over: one interface per channel
end, three implementations.

- torch.distributed (``channels.py``): the PP channel on the front-leader pair groups, the TP channel
  on the mesh groups (headers on gloo CPU groups, tensors on the device groups);
- in-process (``inprocess.py``): pure TP's rank 0, where the front and the leader share a process
  (the front's send runs the leader's whole call);
- in-memory (``pp1.testing.memory``): every rank's ends joined by queues, for tests, with virtual
  time; an operation that cannot complete yet raises :class:`WouldBlock` before it consumes anything,
  so an executor can be stepped one intent at a time by a test.

Errors every implementation raises (the executor turns them into the machine's events): a bounded wait
that ran out (``WaitExpired``), a lost peer or a broken channel (``PeerLost``), a message that breaks the
protocol (``RemoteProtocolError``), a send refused before its first byte (``LocalProtocolError``).
Times are ``time.monotonic`` seconds (virtual ones for the in-memory transport); ``until=None``: no bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from pp1.protocol.messages import PPEnvelopeV1, PPResultV1, ReadyV1, TPHeaderV1
from pp1.protocol.tensors import TensorSpec


class WouldBlock(Exception):  # noqa: N818 - a signal to the stepper, not an error
    """The operation cannot complete yet (in-memory transport only); nothing was consumed."""


class StartupCollectives(Protocol):
    """The collectives of startup (pp1.md §2), in the order every rank calls them."""

    def init_world(self) -> None: ...

    def gather_configs(self, config: dict[str, Any]) -> list[dict[str, Any]]: ...

    def init_groups(self) -> None: ...

    def vote(self, vote: int, cause: str | None) -> tuple[int, list[str | None]]:
        """All-reduce MIN of ``vote``; when it is 0, every rank's ``cause`` (all-gathered)."""
        ...

    def gather_fingerprints(self, fingerprint: str) -> list[str]: ...

    def barrier(self, verdict: int) -> int:
        """All-reduce MIN of ``verdict`` over every rank."""
        ...


class FrontEnd(Protocol):
    """The front's end of the PP channel."""

    overlaps: bool  # True: send returns while the mesh computes (decode k overlaps k+1)

    def send_envelope(self, env: PPEnvelopeV1, tensors: Sequence[torch.Tensor], timeout_s: float | None,
                      preflight: bool = True) -> None: ...

    def recv_result(self, until: float | None) -> tuple[PPResultV1, list[torch.Tensor]]: ...

    def recv_ready(self, until: float | None) -> ReadyV1: ...

    def warm_pair(self, timeout_s: float) -> None: ...


class LeaderEnd(Protocol):
    """The leader's end of the PP channel."""

    def recv_envelope(self, until: float | None) -> PPEnvelopeV1: ...

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]: ...

    def send_result(self, result: PPResultV1, tensors: Sequence[torch.Tensor] = ()) -> None: ...

    def send_ready(self, ready: ReadyV1) -> None: ...

    def warm_pair(self, timeout_s: float) -> None: ...


class MeshEnd(Protocol):
    """A mesh rank's end of the TP channel (the leader sends, workers receive)."""

    def send_header(self, header: TPHeaderV1, tensors: Sequence[torch.Tensor] = (), with_tensors: bool = True,
                    preflight: bool = True) -> None: ...

    def recv_header(self, until: float | None) -> TPHeaderV1: ...

    def recv_tensors(self, specs: Sequence[TensorSpec], timeout_s: float | None) -> list[torch.Tensor]: ...

    def warm_mesh(self, timeout_s: float) -> None: ...
