"""``launch()`` through torchrun (the path ``pp1 run`` and the bench take): a short job ends in
order and its report carries per-chunk timings. torchrun runs in its own session; launch() kills
its process group on any exit path."""

from __future__ import annotations

import pytest

from pp1.adapters.launch.launcher import LaunchOptions, _first_failure, launch

pytestmark = pytest.mark.multiproc


@pytest.mark.timeout(120)
def test_launch_through_torchrun_reports_chunks(tmp_path) -> None:
    opts = LaunchOptions(pipeline="pp1.testing.standin:factory", tp=2, chunks=3, heartbeat_s=0.25, watchdog_s=2.0,
                         timeout_s=100, report_json=str(tmp_path / "r.json"))
    events: list[dict] = []
    rep = launch(opts, on_event=events.append)
    assert rep.ok and rep.exit_code == 0, (rep.failure, rep.log_tail[-30:])
    assert [c["chunk_index"] for c in rep.chunks] == [0, 1, 2]
    assert all(c["mesh_ms"] > 0 and c["decode_ms"] >= 0 for c in rep.chunks)
    assert rep.summary["chunks"] == 3 and rep.startup_s is not None
    kinds = {e["event"] for e in events}
    assert {"phase", "ready", "chunk", "summary", "exit"} <= kinds
    assert sorted(e["rank"] for e in events if e["event"] == "exit") == [0, 1, 2]


def test_first_failure_prefers_the_rank_that_broke() -> None:
    events = [
        {"event": "failed", "rank": 0, "role": "front", "t": 2.0, "reason": "rank 0 failed in voting (remote): x"},
        {"event": "failed", "rank": 2, "role": "worker", "t": 3.0, "reason": "rank 2 failed in voting (local): y"},
    ]
    assert _first_failure(events)[0] == 2
    assert _first_failure([]) == (None, None)
