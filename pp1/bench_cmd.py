"""``pp1 bench``: run configurations one after another; write JSON and a Markdown table (the bench:
``pp1.adapters.launch.bench``). ``pp1 bench --hop``: the protocol hop against the raw transport
(``pp1.adapters.launch.hop``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from pp1.adapters.launch.bench import (
    DEFAULT_OUT,
    BenchOptions,
    default_configs,
    gpu_count,
    markdown,
    parse_configs,
    run_bench,
)
from pp1.adapters.launch.hop import HopBenchOptions, parse_presets, run_hop
from pp1.adapters.launch.hop import markdown as hop_markdown
from pp1.adapters.launch.launcher import InvalidOption, check_options
from pp1.adapters.rank import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default=None,
                   help="comma list of TOPOLOGY:M, e.g. pp1:2,tp:2,tp:1 (pp1: front + TP=M; tp: pure TP=M). "
                        "Default: CPU pp1:2,tp:2,tp:1,pp1:1; CUDA: all that fit the visible GPUs")
    p.add_argument("--chunks", type=int, default=10, help="measured chunks per configuration (default 10)")
    p.add_argument("--warmup-chunks", dest="drop_chunks", type=int, default=2,
                   help="chunks driven first and dropped from the statistics (default 2)")
    p.add_argument("--out", dest="out_dir", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--label", default=None, help="file name part: bench-<label>.json/.md (default <device>-<preset>)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="bound on the whole bench: the running job is cut at it, later ones are skipped")
    p.add_argument("--hop", action="store_true",
                   help="measure the protocol hop instead: front -> leader -> front round trips of a chunk envelope "
                        "(the generator a no-op) against raw torch.distributed round trips of the same bytes "
                        "(2 ranks, TP=1); writes bench-hop-<device>.json/.md")
    p.add_argument("--hop-presets", default=None, metavar="P1,P2",
                   help="--hop: one row per preset (default: --preset)")
    options.add_hop_arguments(p)
    options.add_arguments(p, options.BENCH)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return options.from_namespace(  # type: ignore[return-value]
        args, BenchOptions, configs=parse_configs(args.configs) if args.configs else None, chunks=args.chunks,
        drop_chunks=args.drop_chunks, out_dir=args.out_dir, label=args.label, budget_s=args.budget_s)


def hop_options_from_args(args: argparse.Namespace) -> HopBenchOptions:
    label = args.label
    return options.from_namespace(  # type: ignore[return-value]
        args, HopBenchOptions, presets=parse_presets(args.hop_presets) if args.hop_presets else None,
        hop=options.hop_from_namespace(args), out_dir=args.out_dir, label=label)


def _on_signal(stop: threading.Event) -> Any:
    def on_signal(signum: int, _frame: Any) -> None:
        """First signal: drain the running job (its ranks get SIGTERM through torchrun), run no more.
        Second: give up at once (launch() kills torchrun)."""
        if stop.is_set():
            raise KeyboardInterrupt(signal.Signals(signum).name)
        print(f"pp1 bench: {signal.Signals(signum).name}: draining the running job, then stopping",
              file=sys.stderr, flush=True)
        stop.set()

    return on_signal


def main_hop(args: argparse.Namespace) -> int:
    try:
        opts = hop_options_from_args(args)
        for preset in opts.resolved_presets():
            check_options(opts.launch_options(preset))
    except InvalidOption as exc:
        print(f"pp1 bench: invalid option {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pp1 bench: {exc}", file=sys.stderr)
        return 2
    path = os.path.join(opts.out_dir, f"bench-{opts.resolved_label()}")
    return _run_and_report(path, lambda stop: run_hop(opts, stop=stop), hop_markdown, "rows")


def _run_and_report(path: str, run: Callable[[threading.Event], dict[str, Any]],
                    render: Callable[[dict[str, Any]], str], rows: str) -> int:
    """Run a bench (SIGINT / SIGTERM stop it after what is under way), print its table and where it was
    written. Exit 0 when every row of ``result[rows]`` is ok, 1 when one is not, 130 when interrupted."""
    stop = threading.Event()
    old = {s: signal.signal(s, _on_signal(stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run(stop)
    except KeyboardInterrupt:
        print(f"pp1 bench: interrupted; what was measured is in {path}.json / .md", file=sys.stderr, flush=True)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(render(result), flush=True)
    print(f"pp1 bench: wrote {path}.json and {path}.md", flush=True)
    if result["run"].get("interrupted"):
        return 130
    return 0 if all(r["ok"] for r in result[rows]) else 1


def main(args: argparse.Namespace) -> int:
    if args.hop:
        return main_hop(args)
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        print(f"pp1 bench: {exc}", file=sys.stderr)
        return 2
    if opts.chunks < 2:
        print("pp1 bench: --chunks must be >= 2 (a period needs two chunks)", file=sys.stderr)
        return 2
    if opts.configs is not None and opts.device == "cuda":
        have = gpu_count()
        too_big = [c.name for c in opts.configs if c.nproc > have]
        if too_big:
            print(f"pp1 bench: {', '.join(too_big)} need more GPUs than the {have} visible", file=sys.stderr)
            return 2
    if opts.device == "cuda" and not opts.configs and gpu_count() == 0:
        print("pp1 bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    try:  # every configuration's options, before the first job starts
        for cfg in opts.configs or default_configs(opts.device, gpu_count()):
            check_options(opts.launch_options(cfg))
    except InvalidOption as exc:
        print(f"pp1 bench: invalid option {exc}", file=sys.stderr)
        return 2
    path = os.path.join(opts.out_dir, f"bench-{opts.resolved_label()}")
    return _run_and_report(path, lambda stop: run_bench(opts, stop=stop), markdown, "configs")
