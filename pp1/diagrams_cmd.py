"""`pp1 diagrams`: write the state diagrams of every protocol machine under specs/diagrams/, or
(``--check``) fail when the committed files drift from the machines' tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pp1.fsm.diagrams import all_diagrams

DEFAULT_SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
SUBDIR = "diagrams"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 listing every file that differs, is missing or is extra",
    )
    parser.add_argument(
        "--specs-dir",
        type=Path,
        default=DEFAULT_SPECS_DIR,
        help=f"the specs folder; files go to <specs-dir>/{SUBDIR}/ (default: {DEFAULT_SPECS_DIR})",
    )


def drift(target: Path, expected: dict[str, str]) -> list[str]:
    """One line per file of ``target`` that is not what ``expected`` says (sorted by name)."""
    present = {p.name for p in target.glob("*.md")} if target.is_dir() else set()
    out = []
    for name in sorted(set(expected) | present):
        path = target / name
        if name not in present:
            out.append(f"missing: {path}")
        elif name not in expected:
            out.append(f"extra: {path}")
        elif path.read_text(encoding="utf-8") != expected[name]:
            out.append(f"differs: {path}")
    return out


def main(args: argparse.Namespace) -> int:
    target = Path(args.specs_dir) / SUBDIR
    expected = all_diagrams()
    problems = drift(target, expected)
    if args.check:
        if problems:
            print(f"pp1 diagrams: {len(problems)} file(s) out of date; run `pp1 diagrams`:", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
        print(f"pp1 diagrams: {len(expected)} files up to date in {target}")
        return 0
    target.mkdir(parents=True, exist_ok=True)
    for name, text in expected.items():
        path = target / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for line in problems:
        if line.startswith("extra: "):
            stale = Path(line.removeprefix("extra: "))
            stale.unlink()
            print(f"removed {stale}")
    return 0
