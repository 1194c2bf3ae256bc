"""Hypothesis settings of the model test: "ci" (default) and "deep" (PP1_HYPOTHESIS_PROFILE=deep).

Applied per test class (not globally) so other Hypothesis tests keep their own settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

PROFILES: dict[str, settings] = {
    # CI: derandomized (the same examples every run, no flakes), >= 500 examples per topology.
    "ci": settings(max_examples=500, stateful_step_count=8, derandomize=True, database=None, **_COMMON),
    # mutation: the ci examples without shrinking (scripts/mutate_fsm.py: a failure is all it needs).
    "mutation": settings(max_examples=500, stateful_step_count=8, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON),
    # quick: a smoke run while developing (seconds).
    "quick": settings(max_examples=60, stateful_step_count=8, derandomize=True, database=None, **_COMMON),
    # deep: random, many more and longer runs (minutes).
    "deep": settings(max_examples=5000, stateful_step_count=40, **_COMMON),
}

PROFILE_ENV = "PP1_HYPOTHESIS_PROFILE"


def profile_name() -> str:
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}; expected one of {sorted(PROFILES)}")
    return name


def model_settings() -> settings:
    return PROFILES[profile_name()]


def model_timeout_s() -> int:
    """pytest-timeout for one topology's run under the active profile."""
    return 600 if profile_name() == "ci" else 7200
