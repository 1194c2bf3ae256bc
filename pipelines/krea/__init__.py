"""Krea Realtime Video 14B (Wan 2.1 T2V 14B, causal, chunk by chunk) from the released checkpoint:
``--pipeline pp1.pipelines.krea:factory``. See pipelines/krea/README.md."""

from .config import MODELS, KreaModelConfig, KreaOptions, KreaRun, get_model
from .factory import KreaFactory, factory

__all__ = ["MODELS", "KreaFactory", "KreaModelConfig", "KreaOptions", "KreaRun", "factory", "get_model"]
