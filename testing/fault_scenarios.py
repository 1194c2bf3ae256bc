"""Fault scenarios on a local CPU/gloo job (stand-in pipeline), shared by the multi-process tests
and the fault table: start the ranks, inject the fault (PP1_FAULT, or a signal after an event),
wait for every rank to exit, and time each survivor from the fault to its exit."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pp1.testing.localjob import LocalJob

H, W, FLOOR, GRACE = 0.25, 1.5, 1.5, 0.2  # heartbeat, watchdog, deadline floor, front's fail grace (s)
STALL_S = 5.0

BASE_ARGS = [
    "--pipeline", "pp1.testing.standin:factory", "--heartbeat-s", str(H), "--watchdog-s", str(W),
    "--deadline-floor-s", str(FLOOR), "--pg-timeout-s", "60", "--ready-timeout-s", "60",
    "--fail-grace-s", str(GRACE), "--warmup-chunks", "1", "--teardown-s", "2",
]


@dataclass
class Scenario:
    """``signal_on``: (rank, event) to wait for, then ``wait_s``, then ``signal`` (rank, sig)."""

    name: str
    world: int
    args: list[str]
    fault: str = ""
    rank_args: dict[int, list[str]] = field(default_factory=dict)
    signal_on: tuple[int, str] | None = None
    wait_s: float = 0.0
    signal: tuple[int, int] | None = None
    faulty_rank: int | None = None  # the rank the fault kills or stalls (not a survivor)
    expect: dict[int, str] = field(default_factory=dict)  # rank -> "zero" | "nonzero" | "killed"
    bound_s: dict[int, float] = field(default_factory=dict)  # rank -> detection bound from the fault (s)
    timeout_s: float = 60.0


@dataclass
class ScenarioResult:
    scenario: Scenario
    codes: dict[int, int | None]
    detect_s: dict[int, float]
    alive_before_signal: list[int]
    job: LocalJob
    wall_s: float

    def survivors(self) -> list[int]:
        return [r for r in self.codes if r != self.scenario.faulty_rank]

    def problems(self) -> list[str]:
        """What broke the scenario's expectations (empty: as expected)."""
        out = []
        for r, code in self.codes.items():
            want = self.scenario.expect.get(r)
            if code is None:
                out.append(f"rank {r} did not exit (hangs)")
            elif want == "zero" and code != 0:
                out.append(f"rank {r} exited {code}, expected 0")
            elif want == "nonzero" and code == 0:
                out.append(f"rank {r} exited 0, expected non-zero")
            elif want == "killed" and code != -signal.SIGKILL:
                out.append(f"rank {r} exited {code}, expected SIGKILL")
        for r, bound in self.scenario.bound_s.items():
            t = self.detect_s.get(r)
            if t is None:
                out.append(f"rank {r}: no exit time after the fault")
            elif t > bound:
                out.append(f"rank {r} exited {t:.2f} s after the fault > bound {bound:.2f} s")
        return out

    def record(self) -> dict[str, Any]:
        return {"scenario": self.scenario.name, "codes": self.codes, "detect_s": self.detect_s,
                "wall_s": self.wall_s, "problems": self.problems()}


def run_scenario(sc: Scenario, workdir: Path | None = None) -> ScenarioResult:
    t0 = time.monotonic()
    env = {"PP1_FAULT": sc.fault} if sc.fault else {}
    job = LocalJob(sc.world, list(sc.args), rank_args=sc.rank_args, env=env, workdir=workdir)
    alive: list[int] = []
    with job:
        if sc.signal_on is not None:
            rank, event = sc.signal_on
            job.wait_event(rank, event, sc.timeout_s)
            time.sleep(sc.wait_s)
            alive = job.alive()
            if sc.signal is not None:
                job.send_signal(*sc.signal)
        codes = job.wait_all(sc.timeout_s)
    return ScenarioResult(sc, codes, job.detection_times(), alive, job, time.monotonic() - t0)


SLACK = 4.0  # CPU contention on a shared 2-core box


def _pp1(extra: list[str]) -> list[str]:
    return [*BASE_ARGS, "--topology", "pp1", "--tp", "2", *extra]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "kill_leader_mid_chunk", 3, _pp1(["--chunks", "6"]), fault="rank=1,at=relayed:2,do=kill", faulty_rank=1,
            expect={0: "nonzero", 1: "killed", 2: "nonzero"}, bound_s={0: GRACE + SLACK, 2: SLACK},
        ),
        Scenario(
            "kill_worker_mid_chunk", 3, _pp1(["--chunks", "6"]), fault="rank=2,at=chunk:2,do=kill", faulty_rank=2,
            expect={0: "nonzero", 1: "nonzero", 2: "killed"}, bound_s={0: GRACE + SLACK, 1: SLACK},
        ),
        Scenario(
            "kill_front_idle", 3, _pp1(["--chunks", "2", "--after-chunks", "idle"]), fault="rank=0,at=idle,do=kill",
            faulty_rank=0, expect={0: "killed", 1: "nonzero", 2: "nonzero"}, bound_s={1: SLACK, 2: SLACK},
        ),
        Scenario(
            "kill_front_mid_chunk", 3, _pp1(["--chunks", "6"]), fault="rank=0,at=sent:2,do=kill", faulty_rank=0,
            expect={0: "killed", 1: "nonzero", 2: "nonzero"}, bound_s={1: SLACK, 2: SLACK},
        ),
        Scenario(
            "leader_stall", 3, _pp1(["--chunks", "6"]), fault=f"rank=1,at=chunk:2,do=stall:{STALL_S}", faulty_rank=1,
            expect={0: "nonzero", 1: "nonzero", 2: "nonzero"},
            # the front must give up at its deadline, well before the stalled leader wakes up
            bound_s={0: min(2 * FLOOR + GRACE + 1.0, STALL_S - 0.5), 2: W + SLACK, 1: STALL_S + SLACK},
        ),
        Scenario(
            "sigterm_idle", 3, _pp1(["--chunks", "2", "--after-chunks", "idle"]), signal_on=(0, "idle"), wait_s=0.5,
            signal=(0, signal.SIGTERM), expect={0: "zero", 1: "zero", 2: "zero"},
            bound_s={0: SLACK, 1: SLACK, 2: SLACK},
        ),
    ]
}
