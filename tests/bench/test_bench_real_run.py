"""One small real ``pp1 bench`` run (single-process TP=1 on the ``micro`` preset, a few chunks): the
JSON and Markdown files are written with every metric. The bench runs as a subprocess in its own
session, killed by pid (process group) in a finally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiproc

METRIC_KEYS = ("period_p50_ms", "period_p99_ms", "video_fps", "mesh_ms", "stage0_ms", "pp_overhead_ms",
               "overlap_score", "time_to_first_frame_s")


@pytest.mark.timeout(90)
def test_real_bench_writes_every_metric(tmp_path) -> None:
    cmd = [sys.executable, "-m", "pp1", "bench", "--preset", "micro", "--configs", "tp:1", "--chunks", "3",
           "--warmup-chunks", "1", "--out", str(tmp_path), "--label", "real", "--timeout-s", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = proc.communicate(timeout=80)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out[-4000:]
    data = json.loads((tmp_path / "bench-real.json").read_text())
    (cfg,) = data["configs"]
    assert cfg["ok"] and cfg["config"] == "tp:1" and cfg["metrics"]["chunks_measured"] == 3
    assert all(isinstance(cfg["metrics"][k], (int, float)) for k in METRIC_KEYS), cfg["metrics"]
    assert cfg["peak_memory"]["0"]["peak_bytes"] > 0
    assert data["machine"]["torch"] and data["run"]["preset"] == "micro"
    md = (tmp_path / "bench-real.md").read_text()
    assert "single process (TP=1) (`tp:1`)" in md and "| ok |" in md and "Overlap = " in md
    assert "| config | ranks | period p50 (ms)" in out
