"""A prompt change with re-encoded context frames on a real 3-rank job (PP1, TP=2, CPU/gloo, stand-in
pipeline): ranks are this test's subprocesses (testing/localjob.py), killed by pid when it ends."""

from __future__ import annotations

import pytest

from pp1.testing.fault_scenarios import BASE_ARGS
from pp1.testing.localjob import LocalJob

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(90)
def test_pp1_prompt_change_with_reencode_context_runs_two_epochs(tmp_path) -> None:
    args = [*BASE_ARGS, "--topology", "pp1", "--tp", "2", "--chunks", "7", "--context-source", "reencode",
            "--prompt-change", "2:a red fox in the snow"]
    job = LocalJob(3, args, workdir=tmp_path)
    with job:
        codes = job.wait_all(60)
    logs = f"codes={codes}\n{job.logs()[-6000:]}"
    assert codes == {0: 0, 1: 0, 2: 0}, logs
    report = job.report()
    assert report["ok"] and report["config"]["context_source"] == "reencode", logs
    chunks = report["chunks"]
    shown = [(c["cache_epoch"], c["chunk_index"]) for c in chunks if c["shown"]]
    stale = [(c["cache_epoch"], c["chunk_index"]) for c in chunks if not c["shown"]]
    # after 2 shown chunks the prompt changes; chunk 2 was in flight: received, dropped, never shown
    assert shown == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)], logs
    assert stale == [(0, 2)] and all(c["frames"] == 0 for c in chunks if not c["shown"])
    assert report["summary"]["epochs"] == 2 and report["summary"]["stale"] == 1 and report["summary"]["chunks"] == 7
    stats = report["stats"]
    assert stats["prompt_changes"] == 1 and stats["hard_cuts"] == 1 and stats["reencoded"] == 2  # epoch 1, chunks 3, 4
    prompt_events = [e for e in job.events(0) if e["event"] == "prompt"]
    assert [e["cache_epoch"] for e in prompt_events] == [1]
