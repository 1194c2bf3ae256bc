"""torch.compile for a pipeline's pure tensor functions ("segments"), compiled once, before serving.

A generator's forward is cut into segments at its collectives (a rank waits for the others only
there); each segment is a pure function of tensors (weights, activations, cache buffers and write
slots all passed in), so ONE graph serves every block of the model and every call:

- ``SegmentCompiler.compile(fn)`` wraps ``fn`` with ``torch.compile(dynamic=False)`` over a fresh
  copy of its code object: Dynamo keeps its graph cache (and recompile limit) per code object, so
  every generator (e.g. the uneven shards of a threaded mesh, or another preset in the same
  process) gets its own, static-shaped graphs and never hits another's recompile limit;
- the token dimension is the only dynamic one (``mark_tokens``, bounded by the largest call): one
  graph covers the chunk, the context of a KV recompute of any length, the first chunk and later ones;
- the backend is Inductor, counted and timed: ``graphs`` (compilations so far) and ``compile_s``.
  A compilation after ``freeze()`` (the generator's precompile is done) is a serve-time recompile:
  counted in ``late_graphs`` and logged, so tests can hold it at zero.

Compilations are serialised by a process-wide lock (the threaded mesh builds its shards at once).
Nothing here calls a collective: a generator precompiles on its own, during load, so a failure is
a load failure of that rank (the load vote carries the cause) and never leaves a peer waiting.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

log = logging.getLogger("pp1.pipelines.compiling")

F = TypeVar("F", bound=Callable[..., Any])
_LOCK = threading.RLock()


class CompileError(RuntimeError):
    """A segment failed to compile (or its precompile run failed); names the segment."""


def fresh_function(fn: F) -> F:
    """A copy of ``fn`` with its own code object (so its own Dynamo cache), same behaviour."""
    code = fn.__code__.replace()
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy  # type: ignore[return-value]


DYNAMIC_TOKENS = True  # False: one static graph per token count (an experiment knob of pipelines/speed.py)


def mark_tokens(tensors: Iterable[torch.Tensor | None], max_tokens: int | None = None) -> None:
    """Make dim 0 (the tokens) of each tensor dynamic for the next compilation it takes part in,
    in [2, max_tokens]: the bound lets Inductor index with 32-bit integers (an unbounded dynamic
    size makes it fall back to 64-bit index arithmetic, several times slower in gather-like kernels)."""
    if not DYNAMIC_TOKENS:
        return
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_dynamic(t, 0, min=2, max=max_tokens)


def inductor_patches() -> dict[str, Any]:
    """Inductor settings of every segment: ``deterministic`` (where this torch has it) makes Inductor
    pick reduction configs by rule instead of by timing them on the device, so every rank of a mesh
    (and every run) compiles the same kernels and sums in the same order: replicated activations
    stay bit-identical across ranks, as the contract requires. Measured on one H200: as fast."""
    import torch._inductor.config as inductor_config

    return {"deterministic": True} if hasattr(inductor_config, "deterministic") else {}


class SegmentCompiler:
    """Compiles the segments of one generator and accounts for the compilations."""

    def __init__(self, name: str = "generator", max_tokens: int | None = None) -> None:
        self.name = name
        self.max_tokens = max_tokens  # the largest token count a call brings (bounds the dynamic dim)
        self.graphs = 0
        self.late_graphs = 0  # compilations after freeze(): serve-time recompiles
        self.compile_s = 0.0  # Inductor time (the backend), summed
        self._frozen = False

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        t0 = time.perf_counter()
        compiled = compile_fx(gm, example_inputs, config_patches=inductor_patches())
        self.compile_s += time.perf_counter() - t0
        self.graphs += 1
        if self._frozen:
            self.late_graphs += 1
            log.warning("%s: a segment compiled again while serving (graph %d); a shape or layout the "
                        "precompile did not cover", self.name, self.graphs)
        return compiled

    def compile(self, fn: F, token_args: tuple[int, ...] = ()) -> F:
        """``fn`` compiled (one graph, no graph breaks); ``token_args``: positions of the arguments whose
        dim 0 is the token count (marked dynamic while precompiling)."""
        compiled = torch.compile(fresh_function(fn), backend=self._backend, dynamic=False, fullgraph=True)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._frozen:
                return compiled(*args, **kwargs)
            mark_tokens((args[i] for i in token_args), self.max_tokens)
            with _LOCK:  # the first calls compile: one at a time per process
                try:
                    return compiled(*args, **kwargs)
                except Exception as exc:
                    raise CompileError(f"{self.name}: compiling {fn.__name__} failed: "
                                       f"{type(exc).__name__}: {exc}") from exc

        call.__name__ = f"compiled_{fn.__name__}"
        return call  # type: ignore[return-value]

    def freeze(self) -> None:
        """Precompile done: any later compilation is a serve-time recompile (counted, logged)."""
        self._frozen = True
