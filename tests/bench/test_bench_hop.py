"""One small real ``pp1 bench --hop`` run (front + leader on gloo, the ``micro`` preset, a few round trips):
the hop table's JSON and Markdown are written with both series, their ratio and the bytes of each
direction. No timing is asserted. The bench runs as a subprocess in its own session, killed by pid (process
group) in a finally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(120)
def test_real_hop_bench_writes_the_hop_table(tmp_path) -> None:
    cmd = [sys.executable, "-m", "pp1", "bench", "--hop", "--preset", "micro", "--hop-iterations", "5",
           "--hop-warmup", "2", "--out", str(tmp_path), "--label", "hop-real", "--timeout-s", "90"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out[-4000:]
    data = json.loads((tmp_path / "bench-hop-real.json").read_text())
    assert data["kind"] == "hop" and data["run"]["iterations"] == 5 and data["run"]["presets"] == ["micro"]
    assert data["target"] == {"ratio_at_most": 1.5, "at": ["p50", "p10"]}
    (row,) = data["rows"]
    assert row["ok"] and row["preset"] == "micro"
    for series in ("protocol", "raw", "runtime"):
        assert row[series]["n"] == 5 and row[series]["p50_ms"] > 0, row[series]
        assert len(row["samples_ms"][series]) == 5
    assert row["ratio_p50"] > 0 and row["ratio_p10"] > 0 and isinstance(row["target_met"], bool)
    env, res = row["envelope"], row["result"]
    assert env["control_bytes"] > 32 and env["tensor_bytes"] > 0 and res["tensor_bytes"] > 0
    assert [t["name"] for t in env["tensors"]] == ["conditioning", "noise", "context_frames"]
    assert row["messages_per_direction"] == {"envelope": 5, "result": 3}
    md = (tmp_path / "bench-hop-real.md").read_text()
    assert "| preset | envelope bytes" in md and "| `micro` |" in md and "| ok |" in md
