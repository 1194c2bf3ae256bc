"""The `pp1` command. Subcommands live in their own modules and are imported lazily,
so `pp1 run`, `pp1 bench` and `pp1 diagrams` never import the server's packages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help). Each module has add_arguments(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pp1.serve_cmd", "serve the model: the job through torchrun, the viewer page and API on rank 0"),
    "run": ("pp1.run_cmd", "launch the whole job through torchrun and drive N chunks headless"),
    "bench": ("pp1.bench_cmd", "run configurations one after another; write JSON and a Markdown table"),
    "diagrams": ("pp1.diagrams_cmd", "write the state diagrams in specs/ (--check: fail when they drift)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pp1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # a subcommand whose module is not there yet / lacks a dependency
            p.set_defaults(_missing=f"{name}: unavailable ({exc})")
            continue
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = getattr(args, "_missing", None)
    if missing:
        print(f"pp1 {missing}", file=sys.stderr)
        return 2
    return int(args._main(args) or 0)


def entry() -> None:
    """The program (console script, ``python -m pp1``): main, then out at once. Everything was printed and
    closed; the interpreter's own teardown of torch takes seconds on a busy host, and a job's launcher must
    be gone with its job (the fault drills time every process of the job)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
