"""Unit tests of ``pp1 bench``'s metric computation, config lists and outputs, on synthetic reports
(no processes start)."""

from __future__ import annotations

import json
import threading

import pytest

from pp1.adapters.launch.bench import (
    BenchConfig,
    BenchOptions,
    compute_metrics,
    default_configs,
    markdown,
    parse_configs,
    percentile,
    run_bench,
)
from pp1.adapters.launch.launcher import LaunchOptions, RunReport
from pp1.adapters.rank.peak_memory import peak_bytes, peak_memory, peaks_by_rank

METRIC_KEYS = ("period_p50_ms", "period_p99_ms", "video_fps", "mesh_ms", "stage0_ms", "pp_overhead_ms",
               "overlap_score", "time_to_first_frame_s")


def chunk(i: int, period: float | None, mesh: float = 80.0, decode: float = 10.0, frames: int = 12,
          shown: bool = True) -> dict:
    return {"chunk_index": i, "frames": frames, "recompute": i > 0, "period_ms": period, "mesh_ms": mesh,
            "decode_ms": decode, "pp_overhead_ms": 2.0, "round_trip_ms": mesh + 3.0, "leader_ms": mesh + 1.0,
            "shown": shown}


def synthetic_report() -> dict:
    chunks = [chunk(0, None, mesh=500.0, frames=9), chunk(1, 300.0, mesh=250.0)]  # warmup: dropped
    chunks += [chunk(2, 100.0), chunk(3, 100.0), chunk(4, 120.0, shown=False), chunk(5, 200.0, decode=30.0)]
    return {"ok": True, "startup_s": 1.5, "chunks": chunks, "summary": {"time_to_first_frame_s": 0.25}}


def test_metrics_drop_warmup_and_stale_chunks() -> None:
    m = compute_metrics(synthetic_report(), warmup_chunks=2)
    assert m["chunks_measured"] == 3 and m["chunks_total"] == 5
    assert m["period_p50_ms"] == 100.0
    assert m["period_p99_ms"] == 200.0
    assert m["video_fps"] == pytest.approx(36 * 1000 / 400)
    assert m["mesh_ms"] == 80.0 and m["stage0_ms"] == 10.0 and m["pp_overhead_ms"] == 2.0
    assert m["overlap_score"] == pytest.approx(0.8)
    assert m["time_to_first_frame_s"] == 0.25 and m["startup_s"] == 1.5
    assert m["frames_measured"] == 36 and m["recompute_chunks"] == 3


def test_metrics_without_warmup_skip_the_periodless_first_chunk() -> None:
    m = compute_metrics(synthetic_report(), warmup_chunks=0)
    assert m["chunks_measured"] == 5
    assert m["video_fps"] == pytest.approx((12 * 4) * 1000 / 700)


def test_metrics_of_an_empty_report_are_none() -> None:
    m = compute_metrics({"chunks": []}, warmup_chunks=2)
    assert all(m[k] is None for k in METRIC_KEYS)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0


def test_config_parsing_and_defaults() -> None:
    assert parse_configs("pp1:2, tp:1") == [BenchConfig("pp1", 2), BenchConfig("tp", 1)]
    for bad in ("pp2:1", "tp", "tp:0", "tp:x"):
        with pytest.raises(ValueError):
            BenchConfig.parse(bad)
    assert [c.name for c in default_configs("cpu")] == ["pp1:2", "tp:2", "tp:1", "pp1:1"]
    assert [c.name for c in default_configs("cuda", 4)] == ["pp1:3", "tp:4", "tp:3", "tp:1", "pp1:2", "tp:2", "pp1:1"]
    assert [c.name for c in default_configs("cuda", 2)] == ["pp1:1", "tp:2", "tp:1"]
    eight = default_configs("cuda", 8)
    assert all(c.nproc <= 8 for c in eight) and len(set(eight)) == len(eight) and eight[0].name == "pp1:7"
    assert [c.name for c in default_configs("cuda", 1)] == ["tp:1"]
    assert default_configs("cuda", 0) == []


def test_peak_memory_events() -> None:
    here = peak_memory("cpu")
    assert here["max_rss_bytes"] > 0 and peak_bytes(here) == here["max_rss_bytes"]
    events = [{"event": "peak_memory", "rank": 1, "max_rss_bytes": 5, "cuda_max_allocated_bytes": 7},
              {"event": "chunk", "rank": 0}, {"event": "peak_memory", "rank": 0, "max_rss_bytes": 3}]
    peaks = peaks_by_rank(events)
    assert sorted(peaks) == [0, 1] and peak_bytes(peaks[1]) == 7 and peak_bytes(peaks[0]) == 3


def test_run_bench_writes_json_and_markdown(tmp_path) -> None:
    seen: list[LaunchOptions] = []

    def fake_launch(lo: LaunchOptions, stop: threading.Event) -> RunReport:
        seen.append(lo)
        rep = synthetic_report()
        events = [{"event": "peak_memory", "rank": r, "max_rss_bytes": 2**20 * (r + 1)} for r in range(lo.nproc)]
        ok = lo.topology == "pp1"
        return RunReport(ok=ok, exit_code=0 if ok else 1, wall_s=1.0, chunks=rep["chunks"], events=events,
                         report=rep, failure=None if ok else "rank 0 (leader): boom", log_tail=["x"])

    opts = BenchOptions(preset="tiny", configs=parse_configs("pp1:2,tp:1"), chunks=4, drop_chunks=2,
                        out_dir=str(tmp_path), label="unit")
    result = run_bench(opts, launch_fn=fake_launch, log=lambda s: None)
    assert [lo.chunks for lo in seen] == [6, 6] and seen[0].nproc == 3 and seen[0].dtype == "float32"
    data = json.loads((tmp_path / "bench-unit.json").read_text())
    assert data == json.loads(json.dumps(result, default=str))
    assert data["machine"]["cpu_count"] >= 1 and data["run"]["preset"] == "tiny"
    assert "hostname" not in json.dumps(data["machine"]).lower()
    first = data["configs"][0]
    assert all(first["metrics"][k] is not None for k in METRIC_KEYS)
    assert sorted(first["peak_memory"]) == ["0", "1", "2"] and first["periods_ms"][1] == 300.0
    assert data["configs"][1]["ok"] is False and data["configs"][1]["log_tail"] == ["x"]
    md = (tmp_path / "bench-unit.md").read_text()
    assert md == markdown(data)
    assert "| PP1 front + TP=2 (`pp1:2`) | 3 | 100.0 | 200.0 | 90.00 | 80.0 | 10.0 | 2.00 | 0.80 | 0.25 |" in md
    assert "r0 1 / r1 2 / r2 3 MiB" in md and "FAILED: rank 0 (leader): boom" in md and "Overlap = " in md


def test_budget_spent_skips_configurations(tmp_path) -> None:
    def never(lo: LaunchOptions, stop: threading.Event) -> RunReport:
        raise AssertionError("no job may start without budget")

    opts = BenchOptions(configs=parse_configs("tp:1,tp:2"), out_dir=str(tmp_path), label="b", budget_s=0.0)
    result = run_bench(opts, launch_fn=never, log=lambda s: None)
    assert [c["skipped"] for c in result["configs"]] == [True, True]
    assert "skipped (budget)" in (tmp_path / "bench-b.md").read_text()


def test_stop_ends_the_bench_after_the_running_job(tmp_path) -> None:
    stop = threading.Event()
    ran: list[str] = []

    def stopping(lo: LaunchOptions, ev: threading.Event) -> RunReport:
        ran.append(f"{lo.topology}:{lo.tp}")
        ev.set()  # as if SIGTERM arrived while this job ran; launch() drained it
        return RunReport(ok=True, exit_code=0, wall_s=1.0, chunks=synthetic_report()["chunks"])

    opts = BenchOptions(configs=parse_configs("tp:1,tp:2"), out_dir=str(tmp_path), label="s")
    result = run_bench(opts, launch_fn=stopping, log=lambda s: None, stop=stop)
    assert ran == ["tp:1"] and result["run"]["interrupted"] and result["configs"][0]["interrupted"]
    assert "ok (interrupted)" in (tmp_path / "bench-s.md").read_text()
