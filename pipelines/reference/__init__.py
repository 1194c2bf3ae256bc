"""The built-in reference pipeline: a seeded, random-weight causal DiT with Wan 2.1 / Krea shapes."""

from .factory import ReferenceFactory, factory
from .presets import PRESETS, ReferenceConfig, get_preset

__all__ = ["PRESETS", "ReferenceConfig", "ReferenceFactory", "factory", "get_preset"]
