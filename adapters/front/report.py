"""What the front reports about a run: one record per received chunk, the outcome, the summary (video fps,
period p50/p99, time to first frame, medians of mesh / decode / PP overhead), and the JSON report the
launcher and the bench read."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pp1.protocol.schedule import p99


@dataclass
class ChunkRecord:
    """Timings of one received chunk (ms unless noted; t_* are the front's monotonic seconds)."""

    chunk_index: int
    call_id: int
    cache_epoch: int
    frames: int
    recompute: bool
    t_sent: float
    t_result: float
    t_shown: float
    round_trip_ms: float
    mesh_ms: float
    leader_ms: float
    decode_ms: float
    pp_overhead_ms: float
    period_ms: float | None = None
    shown: bool = True


@dataclass
class EngineOutcome:
    ok: bool
    state: str
    reason: str = ""
    poisoned: bool = False
    records: list[ChunkRecord] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def summarise(records: Sequence[ChunkRecord], ready_at: float | None) -> dict[str, Any]:
    """chunks (shown), frames, stale (results dropped by the epoch fence), epochs (of the shown chunks),
    video fps (steady: after the first shown chunk), p50/p99 period, time to first frame."""
    shown = [r for r in records if r.shown]
    periods = [r.period_ms for r in shown if r.period_ms is not None]
    out: dict[str, Any] = {"chunks": len(shown), "frames": sum(r.frames for r in shown),
                           "stale": len(records) - len(shown), "epochs": len({r.cache_epoch for r in shown})}
    if len(shown) >= 2:
        span = shown[-1].t_shown - shown[0].t_shown
        out["video_fps"] = sum(r.frames for r in shown[1:]) / span if span > 0 else None
    elif shown:
        span = shown[0].t_shown - shown[0].t_sent
        out["video_fps"] = shown[0].frames / span if span > 0 else None
    else:
        out["video_fps"] = None
    out["period_p50_ms"] = statistics.median(periods) if periods else None
    out["period_p99_ms"] = p99(periods) if periods else None
    out["time_to_first_frame_s"] = (shown[0].t_shown - ready_at) if shown and ready_at is not None else None
    for key in ("mesh_ms", "decode_ms", "pp_overhead_ms", "round_trip_ms"):
        vals = [getattr(r, key) for r in shown]
        out[f"{key}_p50"] = statistics.median(vals) if vals else None
    return out


def write_report(path: str | None, outcome: EngineOutcome, *, config: dict[str, Any], started_at: float,
                 ready_at: float | None, warmup_ms: Sequence[float]) -> None:
    """The JSON the launcher (and the bench) read: per-chunk timings, summary, failure."""
    if not path:
        return
    report = {
        "ok": outcome.ok,
        "state": outcome.state,
        "reason": outcome.reason,
        "poisoned": outcome.poisoned,
        "config": config,
        "startup_s": (ready_at - started_at) if ready_at else None,
        "warmup_ms": list(warmup_ms),
        "chunks": [asdict(r) for r in outcome.records],
        "stats": outcome.stats,
        "summary": summarise(outcome.records, ready_at),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)
