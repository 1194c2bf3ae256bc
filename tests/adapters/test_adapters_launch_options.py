"""Bad launch options get a clear error naming the option, and nothing starts."""

import subprocess
import sys

import pytest

from pp1.adapters.launch.launcher import InvalidOption, LaunchOptions, check_faults, check_options


def test_defaults_are_valid() -> None:
    check_options(LaunchOptions())
    check_options(LaunchOptions(topology="tp", tp=1, preset="micro"))


@pytest.mark.parametrize(
    ("kwargs", "option", "needle"),
    [
        ({"tp": 0}, "--tp", "at least one rank"),
        ({"chunks": 0}, "--chunks", "at least one chunk"),
        ({"dtype": "int8"}, "--dtype", "int8"),
        ({"heartbeat_s": 3.0}, "options", "must exceed 3 x heartbeat_s"),
        ({"recompute_every": -1}, "--recompute-every", "greater than or equal to 0"),
        ({"pipeline": "nosuch.module:factory"}, "--pipeline", "not found"),
        ({"pipeline": "no-colon"}, "--pipeline", "package.module:factory"),
        ({"preset": "nope"}, "--preset", "unknown preset 'nope'"),
        ({"device": "cuda", "tp": 64}, "--device", "needs 65 GPUs"),
        # what passed the checks before (issue 11): every duration finite and sane, the seed's range, the
        # mesh against what the pipeline can shard and against the machine
        ({"watchdog_s": float("inf")}, "--watchdog-s", "finite"),
        ({"deadline_floor_s": 1e15}, "--deadline-floor-s", "less than or equal to 86400"),
        ({"timeout_s": float("nan")}, "--timeout-s", "finite"),
        ({"seed": -1}, "--seed", "greater than or equal to 0"),
        ({"seed": 2**63}, "--seed", "less than or equal to"),
        ({"tp": 5, "preset": "micro"}, "--tp", "4 attention heads"),
        ({"tp": 100000}, "--tp", "cannot shard"),
        ({"tp": 5, "pipeline": "pp1.testing.standin:factory"}, "--tp", "not divisible by a mesh of 5"),
        ({"heartbeat_s": 0.001, "watchdog_s": 0.004}, "--heartbeat-s", "greater than or equal to 0.05"),
        ({"deadline_floor_s": 0.001}, "--deadline-floor-s", "greater than or equal to 0.5"),
        ({"warmup_chunks": 1000}, "--warmup-chunks", "less than or equal to 64"),
        ({"ready_timeout_s": 0.0}, "--ready-timeout-s", "positive"),
    ],
)
def test_bad_options_are_refused_with_the_option_named(kwargs: dict, option: str, needle: str) -> None:
    with pytest.raises(InvalidOption) as exc:
        check_options(LaunchOptions(**kwargs))
    assert exc.value.option == option and needle in exc.value.reason


@pytest.mark.timeout(60)
def test_pp1_run_refuses_before_launching(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pp1", "run", "--preset", "nope"], capture_output=True, text=True,
                          timeout=50, cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid option --preset" in proc.stderr and "torchrun" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("spec", "words"), [
    ("rank=1,at=chunck:3,do=kill", "unknown point"),
    ("rank=1,at=chunk:3,do=explode", "unknown action"),
    ("rank=3,at=load,do=fail", "the job has ranks 0..2"),
    ("rank=1,at=load", "needs rank=, at= and do="),
])
def test_a_fault_drill_that_cannot_fire_is_refused_naming_pp1_fault(spec: str, words: str) -> None:
    with pytest.raises(InvalidOption) as exc:
        check_faults(spec, 3)
    assert exc.value.option == "PP1_FAULT" and words in exc.value.reason
    with pytest.raises(InvalidOption, match="PP1_FAULT"):
        check_options(LaunchOptions(tp=2, env={"PP1_FAULT": spec}))


def test_a_fault_drill_that_can_fire_passes() -> None:
    check_faults("rank=2,at=chunk:3,do=stall:5;rank=0,at=ready,do=kill", 3)
    check_faults(None, 3)
