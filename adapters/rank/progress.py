"""Every rank's progress (its lifecycle state, and its failure cause), shared through the job's key-value
store so that the front's server can show each rank's phase while the job loads, and its cause when it
fails, on one host or several.

Each rank publishes on a background thread (a slow or dead store never blocks a role's thread); the
front reads every rank's entry with :meth:`ProgressBoard.snapshot`. The store is the one torchrun's agent
hosts (``MASTER_ADDR:MASTER_PORT``; with ``TORCHELASTIC_USE_AGENT_STORE`` it is there from the start;
otherwise once this rank's process group is up). Keys carry the restart count, so a restarted job never
reads the state of the attempt before it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("pp1.adapters.rank.progress")

PREFIX = "pp1/progress"


def _key(attempt: str, rank: int) -> str:
    return f"{PREFIX}/{attempt}/rank{rank}"


class ProgressBoard:
    """This rank's progress, published to the job's store; every rank's, read by the front."""

    def __init__(self, rank: int, world_size: int, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.rank, self.world_size = rank, world_size
        self.host = env.get("MASTER_ADDR", "127.0.0.1")
        self.port = int(env.get("MASTER_PORT", "0") or 0)
        self.attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._store: Any = None
        self._lock = threading.Lock()
        self.latest: dict[str, Any] = {}
        self._written = threading.Event()  # the newest entry is in the store (nothing queued after it)
        self._thread = threading.Thread(target=self._publish_loop, name="pp1-progress", daemon=True)
        if self.port and env.get("PP1_PROGRESS", "1") != "0":
            self._thread.start()

    # -- this rank ------------------------------------------------------------------------------------
    def publish(self, **entry: Any) -> None:
        """Record this rank's progress (``role``, ``state``, ``cause``, ...); never blocks."""
        self.latest = {"rank": self.rank, "t": time.time(), **self.latest, **entry}
        self._written.clear()
        self._queue.put(dict(self.latest))

    def close(self) -> None:
        self._queue.put(None)

    def _publish_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            while True:  # only the newest entry matters
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    return
                item = nxt
            store = self._connect()
            if store is None:
                continue
            try:
                store.set(_key(self.attempt, self.rank), json.dumps(item, default=str))
            except Exception as exc:  # best effort: progress is for people, not for the protocol
                log.debug("progress not published: %s", exc)
            if self._queue.empty():
                self._written.set()

    def _connect(self) -> Any:
        if self._store is not None:
            return self._store
        import torch.distributed as dist

        if not self.agent_store and not dist.is_initialized():
            return None  # the store comes up with the process group
        with self._lock:
            if self._store is None:
                try:
                    self._store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                                timeout=datetime.timedelta(seconds=5))
                except Exception as exc:
                    log.debug("progress store not reachable: %s", exc)
                    return None
        return self._store

    # -- a drain asked of any rank reaches the front ------------------------------------------------
    def request_drain(self) -> None:
        """This rank was asked to drain (SIGTERM): the front drains the whole job once it reads it."""
        self.publish(drain=True)

    def failed_rank(self) -> int | None:
        """Another rank whose entry says it failed (None: none known), read now: a signal to a rank of a
        failed job fails it at once (``LifecycleMachine.signal_verdict``)."""
        for entry in self.snapshot():
            if entry and entry.get("state") == "failed" and int(entry.get("rank", -1)) != self.rank:
                return int(entry["rank"])
        return None

    def flush(self, timeout_s: float) -> bool:
        """Wait until what was published last is in the store (False: not within ``timeout_s``): a rank
        about to exit leaves its final state for the others to read."""
        return self._written.wait(timeout_s) if self._thread.is_alive() else False

    def drain_requested(self) -> int | None:
        """The rank of a drain request on the board (None: none), read by the front."""
        for entry in self.snapshot():
            if entry and entry.get("drain"):
                return int(entry["rank"])
        return None

    # -- every rank (the front) -------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any] | None]:
        """Every rank's latest entry, read now; raises when the store cannot be read (unlike
        :meth:`snapshot`, which shows what it could)."""
        store = self._connect()
        if store is None:
            raise ConnectionError("the job's store is not reachable yet")
        out: list[dict[str, Any] | None] = [None] * self.world_size
        out[self.rank] = dict(self.latest) if self.latest else None
        for r in range(self.world_size):
            key = _key(self.attempt, r)
            if r != self.rank and store.check([key]):
                out[r] = json.loads(store.get(key).decode())
        return out

    def snapshot(self) -> list[dict[str, Any] | None]:
        """Every rank's latest entry (None where none was published yet); this rank's from memory."""
        out: list[dict[str, Any] | None] = [None] * self.world_size
        out[self.rank] = dict(self.latest) if self.latest else None
        store = self._connect()
        if store is None:
            return out
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = _key(self.attempt, r)
            with contextlib.suppress(Exception):
                if store.check([key]):
                    out[r] = json.loads(store.get(key).decode())
        return out
