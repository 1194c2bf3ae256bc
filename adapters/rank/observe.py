"""Logging with ids and the machine-readable events the launcher reads.

Every log line carries ``rank``, ``role`` and the lifecycle ``state`` (a filter fills them in);
protocol steps add ``call_id``, ``chunk_index`` and ``cache_epoch`` in their message. Events
(progress, ready, chunk timings, failure) go to stdout as ``PP1-EVENT {json}`` lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

EVENT_PREFIX = "PP1-EVENT "
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)  # torchrun's restart of the job


class RankContext:
    """Mutable ids shown on every log line of this process."""

    rank: int = -1
    role: str = "?"
    state: str = "init"


CTX = RankContext()


class _IdsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = CTX.rank
        record.role = CTX.role
        record.state = CTX.state
        return True


def setup_logging(rank: int, role: str, level: str = "INFO") -> None:
    CTX.rank, CTX.role = rank, role
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_IdsFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s rank=%(rank)s role=%(role)s state=%(state)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("transitions").setLevel(logging.WARNING)


def set_state(state: str) -> None:
    CTX.state = state


def emit_event(event: str, **fields: Any) -> None:
    """One ``PP1-EVENT`` line on stdout (flushed), for the launcher."""
    payload = {"event": event, "rank": CTX.rank, "role": CTX.role, "t": time.time(), "pid": os.getpid(),
               "attempt": ATTEMPT, **fields}
    try:
        sys.stdout.write(EVENT_PREFIX + json.dumps(payload, default=str) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the launcher reading the events is gone (killed): the rank goes on
        _silence_stdout()  # to its drain or exit; no later event (nor the exit's flush) may raise instead


def _silence_stdout() -> None:
    """Point stdout at /dev/null (file descriptor and Python object) once its reader is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno() if not sys.stdout.closed else 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces the broken stream for the process's life


def parse_event(line: str) -> dict[str, Any] | None:
    """The event of a ``PP1-EVENT`` line (prefix may follow a torchrun ``[rank]:`` tag), or None."""
    i = line.find(EVENT_PREFIX)
    if i < 0:
        return None
    try:
        obj = json.loads(line[i + len(EVENT_PREFIX):])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
