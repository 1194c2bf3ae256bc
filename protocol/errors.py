"""The two kinds of protocol error: this rank broke the rules (local) or a peer did (remote)."""

from __future__ import annotations


class ProtocolError(Exception):
    """A protocol rule was broken.

    ``field`` is the dotted path of the offending field ("envelope.tensors[1].shape"), ``reason``
    says what is wrong, ``code`` is a short stable identifier tests and logs can match on.
    """

    kind = "protocol"

    def __init__(self, field: str, reason: str, code: str = "invalid") -> None:
        self.field = field
        self.reason = reason
        self.code = code
        super().__init__(f"{self.kind} protocol error [{code}] at {field}: {reason}")


class LocalProtocolError(ProtocolError):
    """This rank was about to break the protocol; nothing was sent."""

    kind = "local"


class RemoteProtocolError(ProtocolError):
    """A peer broke the protocol: what it sent (or failed to send) is not acceptable."""

    kind = "remote"


def as_remote(err: ProtocolError) -> RemoteProtocolError:
    """The same finding, seen from the receiving side."""
    return RemoteProtocolError(err.field, err.reason, err.code)
