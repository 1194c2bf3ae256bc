"""``pp1 serve``: serve the model. Starts the job through torchrun (1 front + M mesh ranks, or pure TP),
serves the viewer page and the API on the front rank (http://127.0.0.1:8000 by default), prints every
rank's progress while it loads, and the viewer's URL. Under an external torchrun (``torchrun ... -m pp1
serve ...``) it is the rank entry itself."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from pp1.adapters.launch.serve import ServeOptions, serve_job
from pp1.adapters.rank import options
from pp1.adapters.rank.options import InvalidOption
from pp1.console import EventPrinter


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, options.SERVE)
    p.add_argument("--verbose", "-v", action="store_true", help="show the ranks' logs")


def under_torchrun() -> bool:
    """This process is a rank an external torchrun started (not the user's shell)."""
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def main(args: argparse.Namespace) -> int:
    opts: ServeOptions = options.from_namespace(args, ServeOptions)  # type: ignore[assignment]
    if under_torchrun():  # a rank of an external torchrun: be the rank entry
        from pp1.server.rank import main as rank_entry

        return rank_entry(options.rank_argv(opts, int(os.environ["WORLD_SIZE"]),
                                            commands=frozenset({options.RANK, options.SERVE_RANK})))
    try:
        from pp1.adapters.launch.serve import check_serve_options

        check_serve_options(opts)
    except InvalidOption as exc:
        print(f"pp1 serve: invalid option {exc}", file=sys.stderr)
        return 2
    where = "" if opts.nnodes == 1 else f", host {opts.node_rank if opts.node_rank is not None else '?'} of {opts.nnodes}"
    print(f"pp1 serve: {opts.topology} with {opts.mesh_size()} mesh rank(s), {opts.nproc} process(es){where}, "
          f"device {opts.device}, pipeline {opts.pipeline}, preset {opts.preset}; viewer on http://"
          f"{opts.host}:{opts.port}/ once rank 0 is up; Ctrl-C drains and stops", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            return
        print(f"pp1 serve: {signal.Signals(signum).name}: draining the job...", file=sys.stderr, flush=True)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = serve_job(opts, on_event=EventPrinter(), stop=stop,
                         on_log=(lambda s: print(s, file=sys.stderr)) if args.verbose else None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(f"pp1 serve: {'stopped' if code == 0 else f'FAILED (exit {code})'}", flush=True)
    return code
