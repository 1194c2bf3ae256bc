"""Bad launch options get a clear error naming the option, and nothing starts."""

import subprocess
import sys

import pytest

from pp1.adapters.launch.launcher import InvalidOption, LaunchOptions, check_options


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
