"""``pp1 serve``'s launcher: the job through torchrun, with the server on the front rank.

On one host (the default): ``torchrun --standalone --nproc-per-node 1+M`` (pure TP: M). Across hosts:
one ``pp1 serve`` per host, each a torchrun agent of the same rendezvous (``--nnodes``,
``--rdzv-endpoint``; ``--nproc-per-node``: the front's host runs 1, the mesh's M). ``--max-restarts``
goes to torchrun: a failed job comes back (every rank restarts) and the viewer page reconnects.
Ranks run ``python -m pp1.server.rank`` (the rank entry plus the server on the rank that hosts the
front). Under an external torchrun, ``pp1 serve`` runs that entry directly (no launcher).

The launcher prints every rank's progress and the viewer's URL; SIGINT / SIGTERM drain the job (SIGTERM
to torchrun, forwarded to every rank: the front stops admitting, drains, SHUTDOWN, exit 0).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pp1.adapters.launch.launcher import LaunchOptions, check_options, supervise
from pp1.adapters.rank import options
from pp1.adapters.rank.options import InvalidOption

SERVE_ENTRY = "pp1.server.rank"


@dataclass
class ServeOptions(LaunchOptions):
    """``pp1 serve``'s options: the table's, as LaunchOptions (``then`` is serve)."""

    after_chunks: str = "serve"

    def local_nproc(self) -> int:
        return self.nproc_per_node if self.nproc_per_node is not None else self.nproc

    def torchrun_args(self) -> list[str]:
        args = [f"--nproc-per-node={self.local_nproc()}", f"--max-restarts={self.max_restarts}"]
        if self.nnodes == 1 and self.rdzv_endpoint is None:
            return ["--standalone", *args]
        args += [f"--nnodes={self.nnodes}", f"--rdzv-backend={self.rdzv_backend}", f"--rdzv-endpoint={self.rdzv_endpoint}",
                 f"--rdzv-id={self.rdzv_id}"]
        if self.node_rank is not None:
            args.append(f"--node-rank={self.node_rank}")
        return args

    def serve_command(self) -> list[str]:
        rank_args = options.rank_argv(self, world_size=None, commands=frozenset({options.RANK, options.SERVE_RANK}))
        return [self.python, "-m", "torch.distributed.run", *self.torchrun_args(), "-m", SERVE_ENTRY, *rank_args,
                *self.extra_args]


def check_serve_options(opts: ServeOptions) -> None:
    """What the launcher refuses before anything starts (the job's checks, then the server's and torchrun's)."""
    check_options(opts)
    if not 0 <= opts.port <= 65535:
        raise InvalidOption("--port", f"must be in 0..65535, got {opts.port}")
    if not (opts.fps > 0 and opts.fps <= 240):
        raise InvalidOption("--fps", f"must be in (0, 240], got {opts.fps}")
    if not 1 <= opts.max_viewers <= 256:
        raise InvalidOption("--max-viewers", f"must be in 1..256, got {opts.max_viewers}")
    if not 0 <= opts.max_restarts <= 100:
        raise InvalidOption("--max-restarts", f"must be in 0..100, got {opts.max_restarts}")
    if opts.nnodes < 1:
        raise InvalidOption("--nnodes", f"must be >= 1, got {opts.nnodes}")
    if opts.nnodes > 1 and not opts.rdzv_endpoint:
        raise InvalidOption("--rdzv-endpoint", "a job on several hosts needs the rendezvous HOST:PORT")
    if opts.nnodes > 1 and opts.nproc_per_node is None:
        raise InvalidOption("--nproc-per-node", "on several hosts each host says how many ranks it runs")
    if opts.nproc_per_node is not None and not 1 <= opts.nproc_per_node <= opts.nproc:
        raise InvalidOption("--nproc-per-node", f"must be in 1..{opts.nproc} (the job's ranks), got "
                            f"{opts.nproc_per_node}")
    if opts.rdzv_backend == "static" and opts.nnodes > 1 and opts.node_rank is None:
        raise InvalidOption("--node-rank", "the static rendezvous needs each host's rank (the front's host: 0)")


def serve_job(opts: ServeOptions, on_event: Callable[[dict[str, Any]], None] | None = None,
              on_log: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> int:
    """Run the job until it ends (drained: 0; failed for good: non-zero)."""
    check_serve_options(opts)
    sup = supervise(opts.serve_command(), {**os.environ, **opts.env}, timeout_s=None, on_event=on_event,
                    on_log=on_log, stop=stop, stop_bound_s=60.0)
    exits = [e for e in sup.events if e.get("event") == "exit"]
    attempts = {e.get("attempt", 0) for e in exits} or {0}
    last = max(attempts)
    # a SIGTERM to the launcher or to torchrun drains the job (torchrun then exits non-zero): the ranks' exits tell
    last_exits = [e for e in exits if e.get("attempt", 0) == last]
    drained = len(last_exits) == opts.local_nproc() and all(e.get("code") == 0 for e in last_exits)
    if sup.code == 0 or drained:
        return 0
    if not sup.asked_to_stop:
        for line in sup.tail[-25:]:
            print(line, file=sys.stderr)
    return sup.code or 1
