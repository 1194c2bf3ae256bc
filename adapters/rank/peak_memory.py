"""Peak memory of this rank, emitted once at exit as a ``peak_memory`` PP1-EVENT (read by ``pp1 bench``).

CPU: the process's max RSS (``resource.getrusage``). CUDA: also ``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` of the rank's device. Never raises: it runs on the exit path of every rank.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch

from pp1.adapters.rank.observe import emit_event

PEAK_EVENT = "peak_memory"


def max_rss_bytes() -> int:
    """This process's peak resident set size in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory(device: torch.device | str | None = None) -> dict[str, Any]:
    """``{"device", "max_rss_bytes"}`` plus ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes`` on CUDA."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out: dict[str, Any] = {"device": str(dev), "max_rss_bytes": max_rss_bytes()}
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
    return out


def emit_peak_memory(device: torch.device | str | None = None) -> None:
    """Emit this rank's peak memory as one event; best effort (the exit path must not fail here)."""
    with contextlib.suppress(Exception):
        emit_event(PEAK_EVENT, **peak_memory(device))


def peaks_by_rank(events: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The last ``peak_memory`` event of each rank, keyed by global rank."""
    out: dict[int, dict[str, Any]] = {}
    for ev in events:
        if ev.get("event") == PEAK_EVENT and isinstance(ev.get("rank"), int) and ev["rank"] >= 0:
            out[ev["rank"]] = {k: v for k, v in ev.items() if k not in ("event", "t")}
    return out


def peak_bytes(entry: dict[str, Any]) -> int | None:
    """The figure the bench reports for one rank: CUDA max allocated on GPU, max RSS on CPU."""
    v = entry.get("cuda_max_allocated_bytes", entry.get("max_rss_bytes"))
    return int(v) if isinstance(v, (int, float)) else None
