"""What every protocol machine shares, and the one contract between machines and I/O.

**Rule 1** (as h11's ``_state.py`` says it): everything that decides the protocol lives here, in
``pp1.fsm`` (or in ``pp1.protocol``): which message goes next, what a message or a timeout means,
when to recompute, when to cut, when to give up, which rank is to blame. Adapters do I/O only: they
feed events into a machine and perform the intents it returns, in order, or fail the rank. No
adapter compares a machine's state to a string, writes a machine's fields or patches its methods;
tests and production wire every machine the same way.

**The contract.** A machine is driven through :meth:`ProtocolMachine.handle`: the adapter hands it
an :class:`Event` (a message received, a deadline passed, an operation done, a request from another
thread) and gets back a list of :class:`Intent` to perform, in order. An intent whose outcome the
machine needs (a receive, a send that may be refused, a shard run) is answered by the adapter with
the next event; the intents that event returns are performed before the rest of the list (depth
first). ``Exit`` ends the list and the rank. Observers (logging, progress) subscribe with
:meth:`ProtocolMachine.watch`; they never drive the machine.

Each machine is one module with its states and transitions written as data at the top (a
`transitions` machine with ``queued=True``, ``auto_transitions=False``): an event outside the table
is an error that changes nothing (:class:`InvalidEvent`); ``failed`` is a state that records its
cause (:class:`FailureCause`: rank, phase, reason, local or remote).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from transitions import Machine, MachineError

from pp1.protocol.errors import LocalProtocolError

log = logging.getLogger("pp1.fsm")

ErrorKind = Literal["local", "remote"]

FAILED = "failed"
FAIL = "fail"  # the event that leads to FAILED from every non-terminal state


@dataclass(frozen=True)
class FailureCause:
    """Why a machine failed: which rank, in which state (phase), why, and whose fault. ``kind``: local
    (this rank broke the protocol or its own work failed) or remote (a peer did); ``blame``: the peer's
    global rank when remote and known (the leader a front lost, the front a leader's watchdog missed).
    ``lingered``: the rank was ended by a signal after another rank had failed (torchrun's teardown): it was
    still running, stuck or waiting on the failed peer; ``fsm.blame`` weighs it below every other local cause."""

    rank: int
    phase: str
    reason: str
    kind: ErrorKind
    blame: int | None = None
    lingered: bool = False

    def __str__(self) -> str:
        whose = f"remote: rank {self.blame}" if self.kind == "remote" and self.blame is not None else self.kind
        return f"rank {self.rank} failed in {self.phase} ({whose}): {self.reason}"

    @property
    def at_fault(self) -> int | None:
        """The rank this cause puts the fault on: itself when local, the blamed peer when remote (None:
        a peer, not known which)."""
        return self.rank if self.kind == "local" else self.blame


@dataclass(frozen=True)
class Intent:
    """What a machine asks its adapter to do next (base of every intent). ``BETWEEN_STEPS``: the adapter
    feeds requests from other threads (a drain, a stop, a hard cut) into the machine just before it
    performs such an intent, and at no other time (the waits, and the explicit ``NextStep``)."""

    BETWEEN_STEPS: ClassVar[bool] = False


@dataclass(frozen=True)
class Event:
    """What happened, fed into a machine with :meth:`ProtocolMachine.handle`. ``HANDLER`` names the
    machine's method that takes the event's fields as keyword arguments."""

    HANDLER: ClassVar[str]

    def arguments(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


Watcher = Callable[["ProtocolMachine", str, str], None]  # (machine, event name, new state)


class InvalidEvent(LocalProtocolError):
    """An event that the machine's table does not allow in the current state."""

    def __init__(self, machine: str, state: str, event: str) -> None:
        super().__init__(f"{machine}.{state}", f"event {event!r} is not allowed in state {state!r}", "invalid_event")
        self.machine = machine
        self.state = state
        self.event = event


class ProtocolMachine:
    """Base of every machine. Subclasses set the tables as class attributes:

    STATES: list of state names; TRANSITIONS: list of (event, source(s), dest) tuples where
    source may be a list of states or "*" (every non-terminal state); INITIAL; TERMINAL.
    Every machine gets ``fail`` from every non-terminal state to ``failed``.
    """

    NAME: ClassVar[str]
    STATES: ClassVar[list[str]]
    TRANSITIONS: ClassVar[list[tuple[str, str | list[str], str]]]
    INITIAL: ClassVar[str]
    TERMINAL: ClassVar[frozenset[str]]

    state: str  # maintained by transitions

    def __init__(self, rank: int, **ctx: Any) -> None:
        self.rank = rank
        self.ctx = ctx  # ids for logging (role, mesh_rank, ...)
        self.failure: FailureCause | None = None
        self._watchers: list[Watcher] = []
        self._machine = Machine(
            model=self,
            states=list(self.STATES),
            transitions=[dict(t) for t in self.transition_dicts()],
            initial=self.INITIAL,
            queued=True,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=True,
            after_state_change="_log_state",
        )

    # -- the table ---------------------------------------------------------------------------------
    @classmethod
    def non_terminal(cls) -> list[str]:
        return [s for s in cls.STATES if s not in cls.TERMINAL]

    @classmethod
    def transition_dicts(cls) -> list[dict[str, Any]]:
        """The table as `transitions` takes it (built once per class; tables are constants)."""
        cached = cls.__dict__.get("_table_cache")
        if cached is None:
            cached = cls._build_transition_dicts()
            cls._table_cache = cached
        return cached

    @classmethod
    def _build_transition_dicts(cls) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event, source, dest in cls.TRANSITIONS:
            src = cls.non_terminal() if source == "*" else source
            out.append({"trigger": event, "source": src, "dest": dest})
        if FAILED in cls.STATES:
            out.append({"trigger": FAIL, "source": cls.non_terminal(), "dest": FAILED})
        return out

    @classmethod
    def events(cls) -> list[str]:
        return sorted({t["trigger"] for t in cls.transition_dicts()})

    @classmethod
    def next_state(cls, state: str, event: str) -> str | None:
        """The table's answer for (state, event), or None when the event is not allowed."""
        lookup = cls.__dict__.get("_lookup_cache")
        if lookup is None:
            lookup = {}
            for t in cls.transition_dicts():
                for src in t["source"] if isinstance(t["source"], list) else [t["source"]]:
                    lookup.setdefault((src, t["trigger"]), t["dest"])  # the first row wins, as in transitions
            cls._lookup_cache = lookup
        return lookup.get((state, event))

    # -- the contract -------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Intent]:
        """Feed one event; returns the intents to perform, in order (see the module docstring)."""
        handler = getattr(self, event.HANDLER, None)
        if handler is None:
            raise InvalidEvent(self.NAME, self.state, type(event).__name__)
        out = handler(**event.arguments())
        return list(out) if isinstance(out, list) else []

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher(machine, event, state)`` after every state change (observers only)."""
        self._watchers.append(watcher)

    # -- firing -------------------------------------------------------------------------------------
    def can_fire(self, event: str) -> bool:
        return self.next_state(self.state, event) is not None

    def fire(self, event: str) -> str:
        """Apply ``event``; returns the new state. Raises InvalidEvent (state untouched) if the
        table has no such transition from the current state."""
        if not self.can_fire(event):
            raise InvalidEvent(self.NAME, self.state, event)
        try:
            self.trigger(event)  # type: ignore[attr-defined]  # added by transitions
        except MachineError as exc:  # pragma: no cover - guarded by can_fire
            raise InvalidEvent(self.NAME, self.state, event) from exc
        return self.state

    def fail_with(self, reason: str, kind: ErrorKind, blame: int | None = None) -> FailureCause:
        """Go to ``failed`` recording the cause; the first cause wins, later ones are logged."""
        cause = FailureCause(rank=self.rank, phase=self.state, reason=reason, kind=kind,
                             blame=blame if kind == "remote" else None)
        if self.is_terminal:
            log.warning("%s rank=%d already %s; ignoring later cause: %s", self.NAME, self.rank, self.state, cause)
            return self.failure or cause
        self.failure = cause
        self.fire(FAIL)
        return cause

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL

    def _log_state(self, event: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            ids = " ".join(f"{k}={v}" for k, v in self.ctx.items())
            log.debug("%s rank=%d %s event=%s -> state=%s", self.NAME, self.rank, ids, event.event.name, self.state)
        for watcher in self._watchers:
            watcher(self, event.event.name, self.state)
