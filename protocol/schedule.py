"""The rules of the chunk schedule, written once and imported by the machines (``pp1.fsm``), the
front's engine, the single-process reference loop (``pp1.pipelines.local_loop``) and the pipelines.

All sizes are in latent frames unless a name says "video frames". No I/O, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Call ids: the startup PING on each channel takes PING_CALL_ID; the front's first envelope after
# it (chunk, heartbeat or shutdown) takes FIRST_CALL_ID, and ids strictly increase from there.
PING_CALL_ID = 0
FIRST_CALL_ID = PING_CALL_ID + 1

# Stage0.decode: T latent frames -> 4T video frames (4T - 3 on an epoch's first chunk: Wan's causal VAE
# decodes the first latent frame of a stream to one video frame).
FRAMES_PER_LATENT = 4

# Samples of the front's rolling p99 of INFER round trips (its result deadline).
DEADLINE_SAMPLES = 200

# The weight tripwire: every mesh rank checksums its weights as held at READY and every this many calls.
WEIGHTS_CHECK_EVERY = 64


def recompute_due(chunk_index: int, every: int) -> bool:
    """Chunk ``chunk_index`` of an epoch rebuilds the KV cache first iff ``every`` > 0, it is not the
    epoch's first chunk, and ``chunk_index % every == 0`` (K=0: never)."""
    return every > 0 and chunk_index > 0 and chunk_index % every == 0


def expected_generator_calls(steps: int, do_kv_recompute: bool) -> int:
    """Generator forward passes of one call: one per denoising step, plus one for a KV recompute."""
    return steps + (1 if do_kv_recompute else 0)


def warmup_context_frames(chunk_index: int, latent_frames: int, window: int) -> int:
    """Context frames of warmup chunk ``chunk_index``: what the chunks before it generated, capped by
    the attention window (like serving)."""
    return min(chunk_index * latent_frames, window)


def video_frames(latent_frames: int, first_chunk: bool) -> int:
    """Video frames a chunk of ``latent_frames`` decodes to."""
    return FRAMES_PER_LATENT * latent_frames - (FRAMES_PER_LATENT - 1 if first_chunk else 0)


def window_start(chunk_index: int, latent_frames: int, context_frames: int) -> int:
    """s: the epoch latent frame where the recompute window of chunk ``chunk_index`` starts (it carries
    epoch latent frames [s, s + context_frames))."""
    return chunk_index * latent_frames - context_frames


def reencode_frame(chunk_index: int, latent_frames: int, context_frames: int) -> int | None:
    """With ``context_source="reencode"``: the epoch latent frame replaced by the VAE re-encode of ONE
    decoded frame (the window's first, s), or None when s == 0: the epoch's own first latent frame
    already is a causal start (one video frame) and is kept (Krea's ``first_context_frame``)."""
    s = window_start(chunk_index, latent_frames, context_frames)
    return s if s > 0 else None


def keyframe_index(latent_frame: int, chunk_index: int, latent_frames: int, decoded_frames: int) -> int | None:
    """The decoded video frame (index into chunk ``chunk_index``'s ``decoded_frames`` frames) that is the
    LAST frame epoch latent frame ``latent_frame`` decoded to, or None when it lies outside the chunk.
    On an epoch's first chunk latent 0 decodes to one frame: frame 0."""
    j = latent_frame - chunk_index * latent_frames
    if not 0 <= j < latent_frames:
        return None
    idx = decoded_frames - 1 - FRAMES_PER_LATENT * (latent_frames - 1 - j)
    return idx if idx >= 0 else None


def oldest_needed_frame(chunk_index: int, latent_frames: int, window: int) -> int:
    """After chunk ``chunk_index`` was received: no later recompute window starts before this epoch
    latent frame (history older than it may be dropped)."""
    return (chunk_index + 1) * latent_frames - window


def decode_before_next(chunk_index: int, latent_frames: int, context_frames: int, decoded_upto: int) -> bool:
    """A re-encode recompute of chunk ``chunk_index`` needs the decoded frame of latent s; when s lies in a
    chunk not decoded yet (latent frames >= ``decoded_upto``), that chunk must be decoded BEFORE the
    recompute is sent (it loses its overlap). With the reference window (6 frames, 3 a chunk) never."""
    s = reencode_frame(chunk_index, latent_frames, context_frames)
    return s is not None and s >= decoded_upto


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None when empty. The one percentile rule of the project (the
    front's deadline, the reports, the bench)."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(k, len(ordered)) - 1])


def p99(samples: Sequence[float]) -> float:
    """Nearest-rank 99th percentile (0.0 for no samples)."""
    return percentile(samples, 99) or 0.0
