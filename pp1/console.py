"""What the CLI prints of a job: one line per interesting event of the ranks."""

from __future__ import annotations

import sys
from typing import Any

from pp1.fsm.lifecycle import STARTUP_ORDER


def _fmt(v: Any, unit: str = "ms", width: int = 7) -> str:
    return f"{v:{width}.1f} {unit}" if isinstance(v, (int, float)) else f"{'-':>{width}} {unit}"


class EventPrinter:
    """One line per interesting PP1-EVENT of the ranks (startup phases, ready, chunks, prompt changes, failures,
    the summary, the server's URL)."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self.seen: set[tuple[int, str]] = set()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        rank, role = ev.get("rank"), ev.get("role")
        if kind == "phase" and ev.get("phase") in STARTUP_ORDER:
            key = (int(rank or 0), str(ev.get("phase")))
            if key not in self.seen:
                self.seen.add(key)
                self.p(f"[startup] rank {rank} {role}: {ev.get('phase')}")
        elif kind == "compiled":
            self.p(f"[compiled] rank {rank} {role}: generator compiled in {ev.get('compile_s') or 0:.1f} s "
                   f"(load {ev.get('load_s') or 0:.1f} s)")
        elif kind == "ready":
            self.p(f"[ready] mesh of {ev.get('mesh_size')} ready after {ev.get('startup_s', 0):.2f} s "
                   f"(warmup {', '.join(f'{x:.0f}' for x in ev.get('warmup_ms', []))} ms)")
        elif kind == "chunk" and not ev.get("shown", True):
            self.p(f"chunk {ev.get('chunk_index'):3d} epoch {ev.get('cache_epoch')}  (stale) dropped by the epoch "
                   f"fence, never decoded or shown  mesh {_fmt(ev.get('mesh_ms'))}  round trip "
                   f"{_fmt(ev.get('round_trip_ms'))}{'  recompute' if ev.get('recompute') else ''}")
        elif kind == "chunk":
            self.p(f"chunk {ev.get('chunk_index'):3d} epoch {ev.get('cache_epoch')}  period {_fmt(ev.get('period_ms'))}"
                   f"  mesh {_fmt(ev.get('mesh_ms'))}  decode {_fmt(ev.get('decode_ms'))}"
                   f"  pp overhead {_fmt(ev.get('pp_overhead_ms'))}  round trip {_fmt(ev.get('round_trip_ms'))}"
                   f"{'  recompute' if ev.get('recompute') else ''}")
        elif kind == "prompt":
            self.p(f"[prompt] epoch {ev.get('cache_epoch')}: {ev.get('prompt')!r}")
        elif kind == "refused":
            self.p(f"[refused] chunk {ev.get('chunk_index')}: {ev.get('reason')}")
        elif kind == "serving":
            self.p(f"[serving] viewer at {ev.get('url')}  (API: {ev.get('url')}docs)")
        elif kind == "fault_unfired":
            self.p(f"[fault] rank {rank}: planned faults that never fired: {', '.join(ev.get('faults', []))}")
        elif kind == "failed":
            self.p(f"[failed] rank {rank} {role}: {ev.get('reason')}")
        elif kind == "summary":
            fps = ev.get("video_fps")
            ttff = ev.get("time_to_first_frame_s")
            stale = int(ev.get("stale") or 0)
            epochs = int(ev.get("epochs") or 1)
            chunks = f"{ev.get('chunks')} chunks" + (f" in {epochs} epochs" if epochs > 1 else "")
            dropped = f", {stale} stale result{'' if stale == 1 else 's'} dropped" if stale else ""
            video = f", {ev.get('frames')} frames, video {fps:.2f} fps" if isinstance(fps, (int, float)) else ""
            self.p(f"summary: {chunks}{video}{dropped}")
            self.p(f"         period p50 {_fmt(ev.get('period_p50_ms'), width=1)}, p99 "
                   f"{_fmt(ev.get('period_p99_ms'), width=1)}, time to first frame "
                   f"{f'{ttff:.3f} s' if isinstance(ttff, (int, float)) else '-'}")

    def p(self, s: str) -> None:
        print(s, file=self.out, flush=True)
