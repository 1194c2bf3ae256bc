"""The causal DiT of Wan 2.1 / Krea Realtime Video, one tensor-parallel shard, written once for every
pipeline of this family (the reference with seeded random weights, Krea from its checkpoint):

- ``config.py``: ``DiTConfig``, the shapes and the choices a pipeline makes (QK-norm per head or over
  all heads, the KV window);
- ``segments.py``: the block's math as pure tensor functions cut at the all-reduces (compiled once
  for every block and call by ``pipelines/compiling.py``), FP8 linears;
- ``block.py``: one block's weights (rows / columns of a ``ShardSource``) and its forward;
- ``model.py``: ``DiTShard`` (embeddings, blocks, head, KV cache, compile + precompile);
- ``kv_cache.py``: the token-major rolling KV cache (and the KV attention bias over its slots);
- ``rope.py``, ``masks.py``, ``sharding.py``: RoPE tables, attention masks, the TP split.
"""

from .config import PATCH, DiTConfig
from .model import DiTShard
from .sharding import ShardPlan

__all__ = ["PATCH", "DiTConfig", "DiTShard", "ShardPlan"]
