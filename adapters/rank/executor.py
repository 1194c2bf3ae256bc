"""The executor: performs one machine's intents over the transport, in order, and feeds each outcome
back as an event (the contract of ``fsm/base.py``). One subclass per role; tests and production wire
every machine the same way.

- ``perform(intent)`` does the I/O of one intent and returns the event it produced (or None).
- Transport errors become the machine's events: a bounded wait that ran out -> ``TimedOut``; a lost
  peer or a broken channel -> ``PeerGone``; a message breaking the rules -> ``BadMessage``; a send
  refused before its first byte -> ``LocalError``. The machine decides what each means.
- An event's intents are performed before the rest of the list (depth first); ``Exit`` ends the run.
- Requests from other threads (:meth:`post`: a drain, a stop, a hard cut) are fed in between steps
  only: just before an intent marked ``BETWEEN_STEPS`` (the waits, ``NextStep``). They change the
  machine's state and the next step sees it. While the machine waits in ``Idle`` the executor wakes
  for them; ``NextStep`` is answered by ``Woke``.
- :meth:`step` performs one intent; an in-memory transport may raise ``WouldBlock`` before consuming
  anything, leaving the intent at the head (a test steps every rank's executor this way).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from pp1.adapters.transport.interface import WouldBlock
from pp1.adapters.transport.runtime import PeerLost, WaitExpired
from pp1.fsm.base import Event, Intent, ProtocolMachine
from pp1.fsm.events import BadMessage, LocalError, PeerGone, TimedOut, Woke
from pp1.fsm.intents import Exit, NextStep, describe
from pp1.protocol.errors import LocalProtocolError, RemoteProtocolError

log = logging.getLogger("pp1.adapters.rank.executor")


class Executor:
    """Performs ``machine``'s intents (subclasses implement :meth:`perform`)."""

    def __init__(self, machine: ProtocolMachine, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[Executor, float], None] | None = None) -> None:
        """``clock``: monotonic seconds (a test's virtual clock); ``wait``: how an idle wait blocks until a
        time or a request (default: a real wait; a stepped test raises WouldBlock instead)."""
        self.machine = machine
        self.clock = clock
        self._wait_hook = wait
        self.pending: deque[Intent] = deque()
        self._requests: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake = threading.Event()

    # -- other threads ------------------------------------------------------------------------------
    def post(self, event: Event) -> None:
        """A request from another thread, fed to the machine between steps."""
        self._requests.put(event)
        self._wake.set()

    def has_requests(self) -> bool:
        return not self._requests.empty()

    @property
    def woken(self) -> bool:
        """A request was posted since the last wait ended (it may have been applied already)."""
        return self._wake.is_set()

    def wait_for_request(self, until: float) -> None:
        """Block until ``until`` (the executor's clock) or until a request is posted."""
        if self._wait_hook is not None:
            self._wait_hook(self, until)  # returns at ``until`` or once ``woken``; a stepped test may raise WouldBlock
            self._wake.clear()
            return
        left = until - self.clock()
        if left > 0 and self._requests.empty():
            self._wake.wait(timeout=left)
        self._wake.clear()

    # -- the loop -----------------------------------------------------------------------------------
    def begin(self, intents: Iterable[Intent]) -> None:
        self.pending = deque(intents)

    def run(self, intents: Iterable[Intent] | None = None) -> Exit:
        """Perform until the machine asks to exit."""
        if intents is not None:
            self.begin(intents)
        while True:
            ex = self.step()
            if ex is not None:
                return ex

    def drain(self) -> Exit | None:
        """Perform until nothing is left to do or the machine exits (a call driven in process)."""
        while self.pending:
            ex = self.step()
            if ex is not None:
                return ex
        return None

    def step(self) -> Exit | None:
        """Perform the next intent (raises WouldBlock, consuming nothing, on an in-memory transport)."""
        if self.pending and self.pending[0].BETWEEN_STEPS:
            self._apply_requests()
        if not self.pending:
            raise LocalProtocolError(f"{self.machine.NAME}.executor", "the machine asked for no next step "
                                     f"in state {self.machine.state}", "no_next_step")
        it = self.pending[0]
        if isinstance(it, Exit):
            self.pending.popleft()
            return it
        try:
            event = Woke(self.clock()) if isinstance(it, NextStep) else self.perform(it)
        except WouldBlock:
            raise
        except WaitExpired:
            event = TimedOut(self.clock())
        except PeerLost as exc:
            event = PeerGone(str(exc), self.peer_of(it))
        except LocalProtocolError as exc:
            event = LocalError(str(exc))
        except RemoteProtocolError as exc:
            event = BadMessage(str(exc))
        self.pending.popleft()
        if event is not None:
            self.feed(event)
        return None

    def feed(self, event: Event) -> None:
        """Feed one event; its intents go first."""
        out = self.machine.handle(event)
        if out and log.isEnabledFor(logging.DEBUG):  # describe() is not free: only when it is logged
            log.debug("%s rank=%d %s -> %s", self.machine.NAME, self.machine.rank, type(event).__name__,
                      describe(out))
        self.pending.extendleft(reversed(out))

    def _apply_requests(self) -> None:
        while True:
            try:
                event = self._requests.get_nowait()
            except queue.Empty:
                return
            self.pending.extendleft(reversed(self.machine.handle(event)))

    def perform(self, intent: Intent) -> Event | None:  # pragma: no cover - every role implements it
        raise NotImplementedError

    def peer_of(self, intent: Intent) -> int | None:
        """The global rank at the other end of the channel ``intent`` uses (None: unknown or several)."""
        return None
