"""``launch()`` through torchrun (the path ``pp1 run`` and the bench take): a short job ends in
order and its report carries per-chunk timings. torchrun runs in its own session; launch() kills
its process group on any exit path."""

from __future__ import annotations

import pytest

from pp1.adapters.launch.launcher import LaunchOptions, launch, root_failure, torchrun_exitcodes

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


def _exit(rank: int, role: str, code: int, cause: dict | None, pid: int) -> dict:
    return {"event": "exit", "rank": rank, "role": role, "code": code, "cause": cause, "pid": pid, "attempt": 0}


def test_root_failure_prefers_the_rank_that_broke_then_the_blamed_peer_then_a_silent_death() -> None:
    remote0 = {"rank": 0, "phase": "serving", "reason": "channel broke", "kind": "remote", "blame": 1}
    local2 = {"rank": 2, "phase": "voting", "reason": "load failed", "kind": "local", "blame": None}
    events = [_exit(0, "front", 1, remote0, 10), _exit(2, "worker", 1, local2, 12), _exit(1, "leader", 1, None, 11)]
    assert root_failure(events)[0] == 2  # a local cause: the rank that broke
    # only echoes that blame the leader: the leader is named, with what the front saw
    events = [_exit(0, "front", 1, remote0, 10), _exit(2, "worker", 3,
                                                      {**remote0, "rank": 2, "reason": "orphan"}, 12),
              {"event": "phase", "rank": 1, "role": "leader", "pid": 11, "attempt": 0}]
    rank, why = root_failure(events, ["[rank1]: failed (exitcode: -9) local_rank: 1 (pid: 11) of binary: x"])
    assert rank == 1 and "rank 1 (leader)" in why and "killed by SIGKILL" in why, why
    assert root_failure([]) == (None, None)
    assert torchrun_exitcodes(["  exitcode  : -15 (pid: 21261)  (SIGTERM)"]) == {21261: -15}
