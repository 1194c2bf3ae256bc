"""Registers the model test's Hypothesis profiles as "pp1-model-ci" / "pp1-model-deep" (the test
classes apply the one named by PP1_HYPOTHESIS_PROFILE themselves; nothing is loaded globally)."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from model_profiles import PROFILES  # noqa: E402

for _name, _profile in PROFILES.items():
    settings.register_profile(f"pp1-model-{_name}", _profile)

import logging  # noqa: E402

# The lifecycle and front machines define ``start`` themselves; transitions warns once per machine built.
logging.getLogger("transitions").setLevel(logging.ERROR)
