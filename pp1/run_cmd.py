"""``pp1 run``: launch the whole job through torchrun, drive N chunks headless, print timings (the launcher:
``pp1.adapters.launch.launcher``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from pp1.adapters.launch.launcher import InvalidOption, LaunchOptions, check_options, launch
from pp1.adapters.rank import options
from pp1.console import EventPrinter


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, options.RUN)
    p.add_argument("--verbose", "-v", action="store_true", help="show the ranks' logs")


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    return options.from_namespace(args, LaunchOptions)  # type: ignore[return-value]


def main(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    try:
        check_options(opts)
    except InvalidOption as exc:
        print(f"pp1 run: invalid option {exc}", file=sys.stderr)
        return 2
    printer = EventPrinter()
    print(f"pp1 run: {opts.topology} with {opts.tp} mesh rank(s), {opts.nproc} process(es), device {opts.device}, "
          f"preset {opts.preset}, {opts.chunks} chunks, context {opts.context_source}"
          f"{''.join(f', prompt change {c}' for c in opts.prompt_changes)}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            return
        print("pp1 run: stopping (draining the job)...", file=sys.stderr, flush=True)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rep = launch(opts, on_event=printer, on_log=(lambda s: print(s, file=sys.stderr)) if args.verbose else None,
                     stop=stop)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rep.ok:
        print(f"pp1 run: ok ({rep.wall_s:.1f} s)", flush=True)
        return 0
    if not args.verbose:
        for line in rep.log_tail[-25:]:
            print(line, file=sys.stderr)
    print(f"pp1 run: FAILED (exit {rep.exit_code}): {rep.failure}", file=sys.stderr, flush=True)
    return rep.exit_code or 1
